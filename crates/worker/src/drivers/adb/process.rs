//! Runs the adb executable: from an argv (never through a host shell), every call with
//! a timeout of its own, in a process group of its own so that a hung call is killed
//! with all its children, and nothing is left behind when a call is dropped (a run
//! cancelled or out of time).
//!
//! What adb prints on stderr when *it* fails (the device is gone, offline,
//! unauthorized, the connection closed) is an infrastructure error; anything else,
//! including a non-zero exit status, is the remote command's answer: `adb shell`
//! returns the remote exit status (shell protocol v2).

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::shell::Line;
use crate::drivers::DriverError;

/// At most this much stderr is kept (adb's errors are a few lines).
const STDERR_CAP: usize = 64 * 1024;

/// The adb executable.
#[derive(Debug, Clone)]
pub struct Adb {
    path: PathBuf,
}

/// What a call printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Standard output, `\r` removed (old adb without the shell protocol wrote `\r\n`).
    pub stdout: String,
    /// Standard error, `\r` removed.
    pub stderr: String,
    /// The exit status (`None`: the call was stopped, see `Limits::stop_after`).
    pub code: Option<i32>,
    /// Whether stdout went past its cap (and only part of it is here).
    pub truncated: bool,
}

impl Output {
    /// Stdout and stderr, for messages.
    pub fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// How long a call may take and how much it may print.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The call is killed (an infrastructure error) after this long.
    pub timeout: Duration,
    /// Stdout kept; past it, the oldest bytes are dropped (`keep_tail`) or the call
    /// is stopped.
    pub max_stdout: usize,
    /// Keep the newest `max_stdout` bytes instead of the first ones.
    pub keep_tail: bool,
}

impl Limits {
    /// A plain call: `timeout`, 4 MiB of stdout.
    pub fn call(timeout: Duration) -> Limits {
        Limits { timeout, max_stdout: 4 * 1024 * 1024, keep_tail: false }
    }
}

/// A spawned call's process group: killed (SIGKILL, every member) when dropped, so a
/// cancelled call leaves nothing running.
struct Group(Option<u32>);

impl Group {
    fn kill(&self) {
        if let Some(pid) = self.0 {
            // SAFETY: killpg only sends a signal; the group id is our child's pid, which
            // `process_group(0)` made the leader of a group of its own.
            unsafe {
                libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Adb {
    /// The adb at `path` (a name is looked up on `PATH`).
    pub fn new(path: impl Into<PathBuf>) -> Adb {
        Adb { path: path.into() }
    }

    /// `adb -s SERIAL shell LINE`: the device's shell runs the quoted line. An adb
    /// failure is an error; the remote command's exit status is in the output.
    pub async fn shell(
        &self,
        serial: &str,
        line: &Line,
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<Output, DriverError> {
        let args = ["-s", serial, "shell", &line.render()].map(String::from);
        self.checked(&args, limits, cancel).await
    }

    /// `adb -s SERIAL ARGS...` (an adb command, not a shell one: `reboot`).
    pub async fn device(
        &self,
        serial: &str,
        args: &[&str],
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<Output, DriverError> {
        let mut all = vec!["-s".to_string(), serial.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.checked(&all, limits, cancel).await
    }

    /// `adb ARGS...` with adb's own failures turned into errors.
    pub async fn checked(
        &self,
        args: &[String],
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<Output, DriverError> {
        let out = self.run(args, limits, cancel).await?;
        match adb_failure(out.code, &out.stderr) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Runs adb with `args` under `limits`. Killed at the timeout (an error) or when
    /// `cancel` fires (`Interrupted`).
    pub async fn run(
        &self,
        args: &[String],
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Result<Output, DriverError> {
        let mut child = tokio::process::Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let group = Group(child.id());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (mut out, mut err) = (Capped::new(limits.max_stdout, limits.keep_tail), Capped::new(STDERR_CAP, false));
        let started = Instant::now();
        let ended = {
            let collect = async {
                tokio::join!(out.read_from(stdout, &group), err.read_from(stderr, &group));
                child.wait().await
            };
            tokio::select! {
                status = collect => Ended::Exited(status),
                _ = tokio::time::sleep(limits.timeout) => Ended::TimedOut,
                _ = cancel.cancelled() => Ended::Cancelled,
            }
        };
        group.kill();
        let what = describe(args);
        match ended {
            Ended::Exited(Ok(status)) => {
                Ok(Output { stdout: out.text(), stderr: err.text(), code: status.code(), truncated: out.truncated })
            }
            Ended::Exited(Err(e)) => Err(DriverError::Driver(format!("{what}: could not wait for adb: {e}"))),
            Ended::TimedOut => {
                let _ = child.wait().await;
                Err(DriverError::Unreachable(format!(
                    "{what} did not finish within {:.0?} and was killed (after {:.1?})",
                    limits.timeout,
                    started.elapsed()
                )))
            }
            Ended::Cancelled => Err(DriverError::Interrupted),
        }
    }

    fn spawn_error(&self, e: std::io::Error) -> DriverError {
        let path = self.path.display();
        match e.kind() {
            std::io::ErrorKind::NotFound => DriverError::Driver(format!(
                "adb not found at {path:?} (install platform-tools or set SWITCHBOARD_ADB_PATH)"
            )),
            _ => DriverError::Driver(format!("cannot start adb at {path:?}: {e}")),
        }
    }
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

/// `adb -s X shell 'ping …'` → `adb shell ping` (for messages, without the payload).
fn describe(args: &[String]) -> String {
    let mut words = args.iter().filter(|a| !a.starts_with('-'));
    let _serial = if args.first().is_some_and(|a| a == "-s") { words.next() } else { None };
    let sub = words.next().map(String::as_str).unwrap_or("");
    let program = words.next().and_then(|l| l.split_whitespace().next()).unwrap_or("");
    format!("adb {sub} {program}").trim_end().to_string()
}

/// A bounded output buffer.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    keep_tail: bool,
    truncated: bool,
}

impl Capped {
    fn new(cap: usize, keep_tail: bool) -> Capped {
        Capped { buf: Vec::new(), cap, keep_tail, truncated: false }
    }

    /// Reads to the end. Past the cap: drops the oldest bytes (`keep_tail`), or stops
    /// the call (killing its group) and keeps what it has.
    async fn read_from(&mut self, pipe: Option<impl AsyncRead + Unpin>, group: &Group) {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.len() > self.cap {
                self.truncated = true;
                if self.keep_tail {
                    let cut = self.buf.len() - self.cap;
                    self.buf.drain(..cut);
                } else {
                    self.buf.truncate(self.cap);
                    group.kill();
                    return;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).replace('\r', "")
    }
}

/// adb's own failure, read from its exit status and stderr, or `None` when adb ran
/// the command (whatever the command answered). The texts are fixed by adb's source
/// (`transport.cpp`): `adb: ` from `adb shell`, `error: ` from the other commands.
pub fn adb_failure(code: Option<i32>, stderr: &str) -> Option<DriverError> {
    if code == Some(0) {
        return None;
    }
    // Daemon banners (`* daemon not running; starting now at tcp:5037`) go to stderr
    // too; they are not errors.
    let line = stderr.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("* "))?;
    let msg = line.strip_prefix("adb: ").or_else(|| line.strip_prefix("error: "))?;
    let gone = |why: &str| Some(DriverError::Unreachable(format!("adb: {why}")));
    if msg.starts_with("device '") && msg.ends_with("' not found") {
        return gone(&format!("{msg} (unplugged, or listed under another serial)"));
    }
    match msg {
        "device offline" => gone("device offline"),
        "no devices/emulators found" => gone("no devices/emulators found"),
        "closed" => gone("the connection to the device closed (error: closed)"),
        m if m.starts_with("device unauthorized") => {
            gone("device unauthorized: accept the USB debugging prompt on the phone")
        }
        m if m.starts_with("device still ") => gone(m),
        m if m.starts_with("no device with transport id") => gone(m),
        m if m.contains("protocol fault") => gone(m),
        m if m.contains("cannot connect to daemon") || m.contains("failed to start daemon") => {
            Some(DriverError::Driver(format!("the adb server is not running and could not start: {m}")))
        }
        // Anything else is the remote command's own answer (its stderr may start with
        // `error: ` too); the caller reads it.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(code: i32, stderr: &str) -> Option<String> {
        adb_failure(Some(code), stderr).map(|e| format!("{:?}", std::mem::discriminant(&e)) + &e.to_string())
    }

    #[test]
    fn adb_errors_are_infrastructure_and_remote_statuses_are_not() {
        let unreachable = |s: &str| matches!(adb_failure(Some(1), s), Some(DriverError::Unreachable(_)));
        assert!(unreachable("adb: device 'R58M' not found\n"));
        assert!(unreachable("error: device 'R58M' not found\n"));
        assert!(unreachable("adb: device offline\n"));
        assert!(unreachable("error: closed\n"));
        assert!(unreachable("adb: device still authorizing\n"));
        assert!(unreachable(
            "adb: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nTry 'adb kill-server' if that \
             seems wrong.\nOtherwise check for a confirmation dialog on your device.\n"
        ));
        assert!(unreachable(
            "* daemon not running; starting now at tcp:5037\n* daemon started successfully\nadb: device offline\n"
        ));
        assert!(matches!(
            adb_failure(Some(1), "* failed to start daemon\nerror: cannot connect to daemon\n"),
            Some(DriverError::Driver(_))
        ));
        // The remote command's own answers: ping's exit 1 and 2, a shell error.
        assert_eq!(kind(1, ""), None);
        assert_eq!(kind(2, "ping: unknown host nowhere.invalid\n"), None);
        assert_eq!(kind(2, "connect: Network is unreachable\n"), None);
        assert_eq!(kind(0, "* daemon started successfully\n"), None);
        assert_eq!(kind(255, "cmd: Can't find service: phone\n"), None);
        assert_eq!(kind(1, "error: no such option -q\n"), None, "a remote tool's own error text is its answer");
    }

    #[test]
    fn messages_name_the_call_not_the_payload() {
        let args = ["-s", "R58M", "shell", "service call isms 7 s16 'secret body'"].map(String::from);
        assert_eq!(describe(&args), "adb shell service");
        assert_eq!(describe(&["-s", "R58M", "reboot"].map(String::from)), "adb reboot");
        assert_eq!(describe(&["devices", "-l"].map(String::from)), "adb devices");
    }
}
