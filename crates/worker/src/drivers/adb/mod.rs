//! The `adb` driver: every built-in module as adb commands on a phone, always with
//! `-s SERIAL`, each call with its own timeout (`process`), every device argument
//! quoted for the phone's shell (`shell`), results parsed from the real output formats
//! (`parse`), and per Android version the method that works there (`net`, `telephony`,
//! `device`). `docs/drivers.md` lists the exact commands and their sources.
//!
//! Verdict or error: what the device answered (100% loss, unknown host, no network in
//! airplane mode) is a verdict; what kept the command from running (adb missing, the
//! device gone, offline or unauthorized, `error: closed`, a killed call) is an
//! infrastructure error, retried and counted by the breaker; a device that offers no
//! method is `unsupported`, neither retried nor counted.

mod device;
mod net;
pub mod parse;
pub mod process;
pub mod shell;
mod telephony;

use std::time::Duration;

use futures::{FutureExt, future::BoxFuture};
use serde_json::Value;
use switchboard_core::{catalog::ModuleSpec, repo::presence::Listed};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use process::{Adb, Limits, Output};
use shell::Line;

use super::{Captures, Driver, DriverError, ModuleCall, Verdict};

/// Knobs of the adb driver.
#[derive(Debug, Clone, Copy)]
pub struct AdbSettings {
    /// The longest a single adb call may take (a module makes several).
    pub call_timeout: Duration,
    /// The cap of a stored capture.
    pub capture_max_bytes: usize,
    /// How often state is polled while waiting (boot, call state, delivery).
    pub poll: Duration,
}

/// The adb driver.
#[derive(Debug, Clone)]
pub struct AdbDriver {
    adb: Adb,
    settings: AdbSettings,
}

/// One module to run on a phone.
pub struct Task<'a> {
    /// The adb serial.
    pub serial: &'a str,
    /// The module.
    pub module: &'static ModuleSpec,
    /// Its validated parameters.
    pub params: &'a Value,
    /// Stops the module.
    pub cancel: CancellationToken,
    /// When its time is up.
    pub deadline: Instant,
    /// Where it leaves captures.
    pub captures: Captures,
}

impl AdbDriver {
    /// A driver running the adb at `path`.
    pub fn new(path: &str, settings: AdbSettings) -> AdbDriver {
        AdbDriver { adb: Adb::new(path), settings }
    }

    /// Runs a module on the phone with `task.serial` (the worker's driver and the host
    /// agent both come here).
    pub async fn run(&self, task: Task<'_>) -> Result<Verdict, DriverError> {
        let mut cx = Cx {
            adb: &self.adb,
            s: self.settings,
            serial: task.serial,
            p: task.params,
            cancel: &task.cancel,
            deadline: task.deadline,
            captures: &task.captures,
            sdk: 0,
        };
        cx.sdk = cx.read_sdk().await?;
        if cx.sdk < MIN_SDK {
            return Err(DriverError::Unsupported(format!(
                "API {}: Switchboard drives Android 7.0 (API {MIN_SDK}) and later; older adbd has no shell protocol v2 \
                 and does not return the remote exit status",
                cx.sdk
            )));
        }
        match task.module.id {
            "ping" => net::ping(&cx).await,
            "airplane_mode" => net::airplane_mode(&cx).await,
            "mobile_data" => net::mobile_data(&cx).await,
            "wifi" => net::wifi(&cx).await,
            "send_sms" => telephony::send_sms(&cx).await,
            "voice_call" => telephony::voice_call(&cx).await,
            "reboot" => device::reboot(&cx).await,
            "device_info" => device::info(&cx).await,
            "capture_logs" => device::capture_logs(&cx).await,
            other => Err(DriverError::Unknown(other.to_string())),
        }
    }

    /// `adb devices -l`, parsed, within `timeout`. A listing that cannot be trusted is
    /// an error, never an empty list: no header, or an adb server that just started
    /// (USB still enumerating, its first answer often lists nothing).
    pub async fn list_devices(
        &self,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Vec<Listed>, DriverError> {
        let args = ["devices", "-l"].map(String::from);
        let out = self.adb.checked(&args, Limits::call(timeout), cancel).await?;
        if out.code != Some(0) {
            return Err(DriverError::Driver(format!("adb devices failed: {}", out.stderr.trim())));
        }
        if out.stderr.contains("daemon started successfully") {
            return Err(DriverError::Driver("the adb server just started; its first listing is not trusted".into()));
        }
        if !out.stdout.contains("List of devices attached") {
            return Err(DriverError::Driver(format!("adb devices printed no device list: {:?}", out.stdout.trim())));
        }
        Ok(parse::devices(&out.stdout))
    }

    /// The longest a plain adb call may take.
    pub fn call_timeout(&self) -> Duration {
        self.settings.call_timeout
    }
}

impl Driver for AdbDriver {
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>> {
        async move {
            let task = Task {
                serial: &call.device.serial,
                module: call.module,
                params: call.params,
                cancel: call.cancel.clone(),
                deadline: call.deadline,
                captures: call.captures.clone(),
            };
            self.run(task).await
        }
        .boxed()
    }
}

/// What a module's code works with.
struct Cx<'a> {
    adb: &'a Adb,
    s: AdbSettings,
    serial: &'a str,
    p: &'a Value,
    cancel: &'a CancellationToken,
    deadline: Instant,
    captures: &'a Captures,
    /// The phone's `ro.build.version.sdk`, read first.
    sdk: u32,
}

/// Android 7.0: adbd has shell protocol v2 (the remote exit status) from here.
const MIN_SDK: u32 = 24;

impl Cx<'_> {
    /// Time left before the module's deadline.
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Time left, less a margin for what still follows (cleanup, the answer).
    fn left_less(&self, margin: Duration) -> Duration {
        self.left().saturating_sub(margin)
    }

    /// Runs a line in the device's shell with the usual call timeout.
    async fn sh(&self, line: Line) -> Result<Output, DriverError> {
        self.sh_for(line, self.s.call_timeout).await
    }

    /// Runs a line with its own timeout (never past the deadline).
    async fn sh_for(&self, line: Line, timeout: Duration) -> Result<Output, DriverError> {
        let timeout = timeout.min(self.left()).max(Duration::from_millis(200));
        self.adb.shell(self.serial, &line, Limits::call(timeout), self.cancel).await
    }

    /// The trimmed stdout of a line that must succeed (exit 0).
    async fn read(&self, line: Line) -> Result<String, DriverError> {
        let what = line.render();
        let out = self.sh(line).await?;
        if out.code != Some(0) {
            return Err(remote_error(&what, &out));
        }
        Ok(out.stdout.trim().to_string())
    }

    /// `ro.build.version.sdk`.
    async fn read_sdk(&self) -> Result<u32, DriverError> {
        let v = self.read(Line::new("getprop").arg("ro.build.version.sdk")).await?;
        // getprop can answer an empty line early in boot (Mobly retries it too).
        v.parse().map_err(|_| DriverError::Unreachable(format!("cannot read the SDK level yet (getprop said {v:?})")))
    }

    /// Whether adbd runs as root (`adb root` on a userdebug build).
    async fn is_root(&self) -> Result<bool, DriverError> {
        Ok(self.read(Line::new("id").arg("-u")).await? == "0")
    }

    /// Waits, unless the module is stopped.
    async fn pause(&self, d: Duration) -> Result<(), DriverError> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.cancel.cancelled() => Err(DriverError::Interrupted),
        }
    }

    fn str(&self, key: &str) -> Result<&str, DriverError> {
        self.p.get(key).and_then(Value::as_str).ok_or_else(|| bad_param(key, "a string"))
    }

    fn bool(&self, key: &str) -> Result<bool, DriverError> {
        self.p.get(key).and_then(Value::as_bool).ok_or_else(|| bad_param(key, "a boolean"))
    }

    fn u64(&self, key: &str) -> Result<u64, DriverError> {
        self.p.get(key).and_then(Value::as_u64).ok_or_else(|| bad_param(key, "a whole number"))
    }

    fn f64(&self, key: &str) -> Result<f64, DriverError> {
        self.p.get(key).and_then(Value::as_f64).ok_or_else(|| bad_param(key, "a number"))
    }
}

/// Params were validated at enqueue; params that no longer read are a driver error.
fn bad_param(key: &str, what: &str) -> DriverError {
    DriverError::Driver(format!("params.{key} is not {what} (the run's snapshot is damaged)"))
}

/// A device command that should have worked and did not. Early in boot the framework's
/// services are missing (`cmd: Can't find service: phone`): the device is not ready,
/// an infrastructure error like any other.
fn remote_error(what: &str, out: &Output) -> DriverError {
    let text = out.both();
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output");
    let program = what.split_whitespace().next().unwrap_or(what);
    if text.contains("Can't find service") {
        return DriverError::Unreachable(format!("the device is not ready (still booting?): {first}"));
    }
    DriverError::Driver(format!("`{program}` failed on the device (exit {:?}): {first}", out.code))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use switchboard_core::catalog;

    use super::*;

    /// The fake adb of the black-box tests (tests/fake_adb/adb), behind a wrapper
    /// that gives it its own state file.
    fn fake(phones: serde_json::Value) -> (AdbDriver, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sb-adb-unit-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.json");
        std::fs::write(&state, json!({"devices": phones}).to_string()).unwrap();
        let fake = format!("{}/../../tests/fake_adb/adb", env!("CARGO_MANIFEST_DIR"));
        let wrapper = dir.join("adb");
        std::fs::write(&wrapper, format!("#!/bin/sh\nFAKE_ADB_STATE='{}' exec '{fake}' \"$@\"\n", state.display()))
            .unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let settings = AdbSettings {
            call_timeout: Duration::from_secs(10),
            capture_max_bytes: 1 << 20,
            poll: Duration::from_millis(50),
        };
        (AdbDriver::new(wrapper.to_str().unwrap(), settings), state)
    }

    fn commands(state: &std::path::Path) -> Vec<Vec<String>> {
        let log = std::fs::read_to_string(state.with_extension("json.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|e| serde_json::from_value(e["argv"].clone()).ok())
            .collect()
    }

    async fn run(adb: &AdbDriver, module: &str, params: serde_json::Value) -> Result<Verdict, DriverError> {
        let task = Task {
            serial: "U1",
            module: catalog::find(module).unwrap(),
            params: &params,
            cancel: CancellationToken::new(),
            deadline: Instant::now() + Duration::from_secs(20),
            captures: Captures::default(),
        };
        adb.run(task).await
    }

    /// Params that validation would refuse, straight to the driver: each still reaches
    /// the phone as one word, and the phone runs nothing else.
    #[tokio::test]
    async fn hostile_params_reach_the_phone_as_one_word_each() {
        let (adb, state) = fake(json!({"U1": {"sdk": 27}}));
        let host = "8.8.8.8; reboot $(id) `id` && echo pwned";
        let params = json!({"host": host, "count": 1, "interval_ms": 1000, "max_loss_pct": 0});
        let Ok(Verdict::Failed(r)) = run(&adb, "ping", params).await else { panic!("a verdict") };
        assert!(r["reason"].as_str().unwrap().starts_with("unknown host"), "{r}");
        let body = "it's $(reboot); `id` | sh";
        let params = json!({"to": "+33612345678", "body": body, "expect_delivery": false});
        assert!(matches!(run(&adb, "send_sms", params).await, Ok(Verdict::Passed(_))));
        let ran = commands(&state);
        assert!(ran.contains(&["ping", "-c", "1", "-i", "1", host].map(String::from).to_vec()), "{ran:?}");
        assert!(ran.iter().any(|c| c.len() == 18 && c[13] == body), "the body is one argument: {ran:?}");
        for c in &ran {
            assert!(!["reboot", "id", "echo", "sh"].contains(&c[0].as_str()), "the phone ran {c:?}");
        }
        let _ = std::fs::remove_dir_all(state.parent().unwrap());
    }
}
