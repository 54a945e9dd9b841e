//! Network modules over adb: `ping`, `airplane_mode`, `mobile_data` and `wifi`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Cx, parse, remote_error, shell::Line};
use crate::drivers::{DriverError, Verdict};

/// `ping -c COUNT -i INTERVAL HOST` (`ping6` for an IPv6 address). The statistics block
/// and the exit status decide: 0 or 1 with statistics is a verdict by `max_loss_pct`;
/// exit 2 with `unknown host` or `Network is unreachable` is a failed verdict (the
/// device answered); no statistics otherwise is a driver error.
pub(super) async fn ping(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let host = cx.str("host")?;
    let count = cx.u64("count")?;
    let interval_ms = cx.u64("interval_ms")?;
    let max_loss = cx.f64("max_loss_pct")?;
    let program = if host.contains(':') { "ping6" } else { "ping" };
    let interval = format!("{}", interval_ms as f64 / 1000.0);
    let line = Line::new(program).arg("-c").arg(count.to_string()).arg("-i").arg(&interval).arg(host);
    // ping runs count × interval, then waits up to 10 s for late replies; DNS first.
    let timeout = Duration::from_millis(count * interval_ms) + Duration::from_secs(15);
    let out = cx.sh_for(line, timeout).await?;
    let base = json!({"host": host, "exit_status": out.code});
    let text = out.both();
    let Some(stats) = parse::ping(&out.stdout) else {
        let reason = if text.contains("unknown host") {
            "unknown host: the device could not resolve it"
        } else if text.contains("Network is unreachable") {
            "network unreachable: the device has no route (airplane mode, no data, no Wi-Fi)"
        } else {
            return Err(remote_error(program, &out));
        };
        let mut r = base;
        r["sent"] = json!(0);
        r["received"] = json!(0);
        r["loss_pct"] = json!(100.0);
        r["rtt_ms"] = Value::Null;
        r["reason"] = json!(reason);
        return Ok(Verdict::Failed(r));
    };
    let mut r = base;
    merge(&mut r, json!(stats));
    if stats.loss_pct > max_loss {
        r["reason"] = json!(format!("packet loss {}% above max_loss_pct {max_loss}", stats.loss_pct));
        return Ok(Verdict::Failed(r));
    }
    Ok(Verdict::Passed(r))
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// Waits (polling) until `read` answers `want`, or `within` is over; the last answer.
async fn settle<F, Fut>(cx: &Cx<'_>, want: bool, within: Duration, read: F) -> Result<bool, DriverError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, DriverError>>,
{
    let until = tokio::time::Instant::now() + within.min(cx.left_less(Duration::from_secs(1)));
    loop {
        let now = read().await?;
        if now == want || tokio::time::Instant::now() >= until {
            return Ok(now);
        }
        cx.pause(cx.s.poll).await?;
    }
}

async fn setting(cx: &Cx<'_>, name: &str) -> Result<String, DriverError> {
    cx.read(Line::new("settings").args(["get", "global", name])).await
}

/// `1`/`0` (and `2`/`3` for wifi_on's airplane variants) as on/off.
fn on(v: &str) -> Result<bool, DriverError> {
    match v {
        "0" => Ok(false),
        "1" | "2" | "3" => Ok(true),
        other => Err(DriverError::Driver(format!("unexpected setting value {other:?}"))),
    }
}

/// API 30+: `cmd connectivity airplane-mode enable|disable`, read back with
/// `cmd connectivity airplane-mode`. API 24-29: `settings put global airplane_mode_on`
/// and the `AIRPLANE_MODE` broadcast, which the shell user may not send there
/// (`SecurityException`; the radios stay on): unsupported unless adbd is root.
pub(super) async fn airplane_mode(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let want = cx.bool("enabled")?;
    let sdk = cx.sdk;
    let modern = sdk >= 30;
    if !modern && !cx.is_root().await? {
        return Err(DriverError::Unsupported(format!(
            "airplane_mode on API {sdk}: Android 7 to 10 refuse the AIRPLANE_MODE broadcast to the shell user \
             (SecurityException) and the radios stay on; use a rooted build (adb root) or Android 11+"
        )));
    }
    let read = || async {
        if modern {
            let v = cx.read(Line::new("cmd").args(["connectivity", "airplane-mode"])).await?;
            match v.as_str() {
                "enabled" => Ok(true),
                "disabled" => Ok(false),
                other => Err(DriverError::Driver(format!("cmd connectivity airplane-mode said {other:?}"))),
            }
        } else {
            on(&setting(cx, "airplane_mode_on").await?)
        }
    };
    let before = read().await?;
    let method = if modern {
        let verb = if want { "enable" } else { "disable" };
        cx.read(Line::new("cmd").args(["connectivity", "airplane-mode", verb])).await?;
        "cmd connectivity airplane-mode"
    } else {
        let flag = if want { "1" } else { "0" };
        cx.read(Line::new("settings").args(["put", "global", "airplane_mode_on", flag])).await?;
        let state = if want { "true" } else { "false" };
        let line =
            Line::new("am").args(["broadcast", "-a", "android.intent.action.AIRPLANE_MODE", "--ez", "state", state]);
        let out = cx.sh(line).await?;
        if out.both().contains("SecurityException") {
            return Err(DriverError::Unsupported(format!(
                "airplane_mode on API {sdk}: the AIRPLANE_MODE broadcast was refused (SecurityException)"
            )));
        }
        "settings + AIRPLANE_MODE broadcast"
    };
    let after = settle(cx, want, Duration::from_secs(10), read).await?;
    let r = json!({"airplane_mode": after, "changed": before != after, "verified": after == want,
                   "method": method, "api_level": sdk});
    Ok(verdict(r, after == want, || format!("airplane mode is still {} after the change", on_off(after))))
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn verdict(mut r: Value, ok: bool, why: impl FnOnce() -> String) -> Verdict {
    if ok {
        Verdict::Passed(r)
    } else {
        r["reason"] = json!(why());
        Verdict::Failed(r)
    }
}

/// `svc data enable|disable` (`cmd phone data …` on API 30+), read back from
/// `settings get global mobile_data`, with the data connection state from
/// `dumpsys telephony.registry`.
pub(super) async fn mobile_data(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let want = cx.bool("enabled")?;
    let sdk = cx.sdk;
    let read = || async { on(&setting(cx, "mobile_data").await?) };
    let before = read().await?;
    let verb = if want { "enable" } else { "disable" };
    let (line, method) = if sdk >= 30 {
        (Line::new("cmd").args(["phone", "data", verb]), "cmd phone data")
    } else {
        (Line::new("svc").args(["data", verb]), "svc data")
    };
    let out = cx.sh(line).await?;
    if out.code != Some(0) {
        return Err(remote_error(method, &out));
    }
    let after = settle(cx, want, Duration::from_secs(10), read).await?;
    if after != want && sdk < 26 && !cx.is_root().await? {
        return Err(DriverError::Unsupported(format!(
            "mobile_data on API {sdk}: `svc data` needs root below Android 8 and the setting did not change"
        )));
    }
    let registry = parse::registry(&cx.sh(Line::new("dumpsys").arg("telephony.registry")).await?.stdout);
    let data_state = registry.data_states.first().map(|s| match s {
        0 => "disconnected",
        1 => "connecting",
        2 => "connected",
        3 => "suspended",
        _ => "unknown",
    });
    let r = json!({"mobile_data": after, "changed": before != after, "verified": after == want,
                   "data_state": data_state, "method": method, "api_level": sdk});
    Ok(verdict(r, after == want, || format!("mobile data is still {} after the change", on_off(after))))
}

/// `svc wifi enable|disable`, read back from `settings get global wifi_on`; with an
/// `ssid`, waits for `cmd wifi status` (Android 11+) to say `Wifi is connected to
/// "SSID"`. The SSID never reaches the device: it is compared here.
pub(super) async fn wifi(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let want = cx.bool("enabled")?;
    let ssid = cx.p.get("ssid").and_then(Value::as_str);
    let read = || async { on(&setting(cx, "wifi_on").await?) };
    let before = read().await?;
    let verb = if want { "enable" } else { "disable" };
    let out = cx.sh(Line::new("svc").args(["wifi", verb])).await?;
    if out.code != Some(0) {
        return Err(remote_error("svc wifi", &out));
    }
    let after = settle(cx, want, Duration::from_secs(10), read).await?;
    let mut r = json!({"wifi": after, "changed": before != after, "verified": after == want,
                       "ssid": null, "rssi_dbm": null});
    if after != want {
        return Ok(verdict(r, false, || format!("Wi-Fi is still {} after the change", on_off(after))));
    }
    let (Some(expected), true) = (ssid, want) else { return Ok(Verdict::Passed(r)) };
    if cx.sdk < 30 {
        r["ssid_checked"] = json!(false);
        r["note"] = json!("the SSID check needs `cmd wifi status` (Android 11+); Wi-Fi is on, the network unchecked");
        return Ok(Verdict::Passed(r));
    }
    let until = tokio::time::Instant::now() + cx.left_less(Duration::from_secs(2));
    let status = loop {
        let status = parse::wifi_status(&cx.read(Line::new("cmd").args(["wifi", "status"])).await?);
        if status.ssid.as_deref() == Some(expected) || tokio::time::Instant::now() >= until {
            break status;
        }
        cx.pause(cx.s.poll).await?;
    };
    r["ssid"] = json!(status.ssid);
    r["rssi_dbm"] = json!(status.rssi_dbm);
    r["ssid_checked"] = json!(true);
    let joined = status.ssid.as_deref() == Some(expected);
    Ok(verdict(r, joined, || match &status.ssid {
        Some(other) => format!("connected to {other:?}, not {expected:?}"),
        None => format!("did not join {expected:?} before the timeout"),
    }))
}
