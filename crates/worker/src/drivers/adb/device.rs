//! Device modules over adb: `reboot`, `device_info` and `capture_logs`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Cx, Limits, parse, remote_error, shell::Line};
use crate::drivers::{Capture, DriverError, Verdict};

/// `adb -s SERIAL reboot`, then (with `wait_boot`) polls until the phone runs a new
/// boot (`/proc/sys/kernel/random/boot_id` changed) and `getprop sys.boot_completed`
/// prints `1`. `adb reboot` returns before the phone goes down, so for a moment the old
/// boot still says `1`: the boot id tells them apart. While the phone reboots it
/// vanishes, comes back `offline`, then answers before the framework is up: those adb
/// errors are expected here and waited out; the module's deadline is not.
pub(super) async fn reboot(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let wait = cx.bool("wait_boot")?;
    let before = boot_id(cx).await?;
    let started = Instant::now();
    let timeout = cx.s.call_timeout.min(cx.left()).max(Duration::from_millis(200));
    let out = cx.adb.device(cx.serial, &["reboot"], Limits::call(timeout), cx.cancel).await?;
    if out.code != Some(0) {
        return Err(remote_error("adb reboot", &out));
    }
    if !wait {
        return Ok(Verdict::Passed(json!({"rebooted": true, "boot_ms": null, "waited": false})));
    }
    let until = Instant::now() + cx.left_less(Duration::from_millis(500));
    loop {
        cx.pause(cx.s.poll).await?;
        let last_seen = match booted_again(cx, &before).await {
            Ok(None) => {
                let boot_ms = started.elapsed().as_millis() as u64;
                return Ok(Verdict::Passed(json!({"rebooted": true, "boot_ms": boot_ms, "waited": true})));
            }
            Ok(Some(why)) => why,
            Err(DriverError::Interrupted) => return Err(DriverError::Interrupted),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= until {
            let r = json!({"rebooted": true, "boot_ms": null, "waited": true, "last_seen": last_seen,
                           "reason": format!("did not finish booting within {} s", started.elapsed().as_secs())});
            return Ok(Verdict::Failed(r));
        }
    }
}

async fn boot_id(cx: &Cx<'_>) -> Result<String, DriverError> {
    cx.read(Line::new("cat").arg("/proc/sys/kernel/random/boot_id")).await
}

/// `None` once the phone runs a new boot that completed; else what it still says.
async fn booted_again(cx: &Cx<'_>, before: &str) -> Result<Option<String>, DriverError> {
    let probe = Duration::from_secs(5);
    let now = cx.sh_for(Line::new("cat").arg("/proc/sys/kernel/random/boot_id"), probe).await?;
    if now.stdout.trim() == before {
        return Ok(Some("still the boot before the reboot".into()));
    }
    let done = cx.sh_for(Line::new("getprop").arg("sys.boot_completed"), probe).await?;
    Ok((done.stdout.trim() != "1").then(|| "sys.boot_completed not set yet".into()))
}

/// The full `getprop` listing (one call), `dumpsys battery` and
/// `dumpsys telephony.registry`'s signal strength.
pub(super) async fn info(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let props = parse::getprop(&cx.read(Line::new("getprop")).await?);
    let prop = |k: &str| props.get(k).filter(|v| !v.is_empty()).cloned();
    let battery_out = cx.sh(Line::new("dumpsys").arg("battery")).await?;
    let battery = parse::battery(&battery_out.stdout);
    let registry = parse::registry(&cx.sh(Line::new("dumpsys").arg("telephony.registry")).await?.stdout);
    let mut r = json!({
        "serial": prop("ro.serialno"),
        "model": prop("ro.product.model"),
        "manufacturer": prop("ro.product.manufacturer"),
        "os_version": prop("ro.build.version.release"),
        "api_level": prop("ro.build.version.sdk").and_then(|v| v.parse::<u32>().ok()),
        "fingerprint": prop("ro.build.fingerprint"),
        "network_operator": prop("gsm.operator.alpha"),
        "battery": battery,
        "battery_pct": battery.as_ref().and_then(|b| b.level_pct),
        "signal": registry.signal,
    });
    if battery.is_none() {
        r["battery_note"] =
            json!(format!("dumpsys battery printed no battery state: {}", first_line(&battery_out.both())));
    }
    if let Some(denied) = registry.denied {
        r["signal_note"] = json!(denied);
    }
    if r["model"].is_null() && r["api_level"].is_null() {
        return Err(DriverError::Unreachable("getprop answered no build properties (the device is not ready)".into()));
    }
    Ok(Verdict::Passed(r))
}

fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output")
}

/// `logcat -d -v threadtime -b BUFFER -t EPOCH.000`: the log of the last `duration_s`
/// seconds by the device's clock (`-t` takes an epoch time from API 24; before, the
/// whole buffer is dumped), stored as a capture of at most the cap, newest lines kept.
pub(super) async fn capture_logs(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let (duration, buffer) = (cx.u64("duration_s")?, cx.str("buffer")?);
    let sdk = cx.sdk;
    let mut line = Line::new("logcat").args(["-d", "-v", "threadtime", "-b", buffer]);
    if sdk >= 24 {
        let now: u64 = cx
            .read(Line::new("date").arg("+%s"))
            .await?
            .parse()
            .map_err(|_| DriverError::Driver("`date +%s` did not print an epoch time".into()))?;
        line = line.arg("-t").arg(format!("{}.000", now.saturating_sub(duration)));
    }
    let cap = cx.s.capture_max_bytes;
    let limits = Limits {
        timeout: cx.s.call_timeout.min(cx.left()).max(Duration::from_millis(200)),
        max_stdout: cap,
        keep_tail: true,
    };
    let out = cx.adb.shell(cx.serial, &line, limits, cx.cancel).await?;
    if out.code != Some(0) {
        return Err(remote_error("logcat", &out));
    }
    let text = keep_whole_lines(out.stdout, out.truncated);
    let stats = parse::logcat(&text);
    let name = format!("logcat-{buffer}.txt");
    let mut r = json!({"buffer": buffer, "bytes": text.len(), "truncated": out.truncated, "capture": name,
                       "since_s": if sdk >= 24 { json!(duration) } else { Value::Null }});
    if let (Some(obj), Value::Object(s)) = (r.as_object_mut(), json!(stats)) {
        obj.extend(s);
    }
    cx.captures.push(Capture {
        name,
        content_type: "text/plain; charset=utf-8".into(),
        text,
        truncated: out.truncated,
    });
    Ok(Verdict::Passed(r))
}

/// A tail cut at the cap starts mid-line: drop that partial first line.
fn keep_whole_lines(text: String, truncated: bool) -> String {
    if !truncated {
        return text;
    }
    match text.find('\n') {
        Some(i) => text[i + 1..].to_string(),
        None => text,
    }
}
