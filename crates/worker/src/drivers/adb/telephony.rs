//! Telephony modules over adb: `send_sms` and `voice_call`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Adb, Cx, Limits, parse, remote_error, shell::Line};
use crate::drivers::{DriverError, Verdict};

/// The `isms` binder call that sends a text on an SDK level, or `None` where Switchboard
/// knows no method it trusts. The transaction number and argument list change with the
/// release (see docs/drivers.md for the sources): API 24-25 `isms 7` as
/// `com.android.mms`, API 26-28 `isms 7` as `com.android.mms.service`. From API 29 the
/// calling package must belong to the calling uid and the layout changes every release.
pub fn isms_call(sdk: u32, to: &str, body: &str) -> Option<Line> {
    let (sub, package) = match sdk {
        24..=25 => ("1", "com.android.mms"),
        26..=28 => ("0", "com.android.mms.service"),
        _ => return None,
    };
    Some(
        Line::new("service")
            .args(["call", "isms", "7", "i32", sub, "s16", package, "s16", to, "s16", "null", "s16", body])
            .args(["s16", "null", "s16", "null"]),
    )
}

/// Segments the message takes: GSM-7 (160 alone, 153 per part) when every character is
/// ASCII, else UCS-2 (70, 67). An estimate: the GSM alphabet differs from ASCII at the
/// edges.
fn segments(body: &str) -> usize {
    let (single, part) = if body.is_ascii() { (160, 153) } else { (70, 67) };
    let n = body.chars().count();
    if n <= single { 1 } else { n.div_ceil(part) }
}

/// The whole SMS provider: `content://sms/sent` holds only type 2, and a message that
/// failed (type 5) or waits (4 outbox, 6 queued) must be seen too.
const SMS: &str = "content://sms";

/// The provider's outgoing rows (types 2, 4, 5, 6), newest first, or why they cannot be
/// read. Only the exit status and stderr say so: stdout holds message bodies, which may
/// say anything.
async fn sent_box(cx: &Cx<'_>) -> Result<Result<Vec<parse::SmsRow>, String>, DriverError> {
    let line = Line::new("content").args(["query", "--uri", SMS, "--projection", "_id:type:status:date:address:body"]);
    let out = cx.sh(line).await?;
    if out.code != Some(0) || out.stderr.contains("Exception") || out.stderr.contains("Permission Denial") {
        let first = out.both().lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output").to_string();
        return Ok(Err(format!("the SMS provider cannot be read here: {first}")));
    }
    let mut rows: Vec<_> =
        parse::sms_rows(&out.stdout).into_iter().filter(|r| matches!(r.kind, 2 | 4 | 5 | 6)).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.id));
    Ok(Ok(rows))
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Sends through the `isms` service on the SDK levels where its layout is known, else
/// answers `unsupported`. With `expect_delivery`, confirms the message from the
/// device's SMS provider (sent box: type, status) within the module timeout, and says
/// in the result what it could and could not see; it never claims a delivery it did
/// not see.
pub(super) async fn send_sms(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let (to, body, expect) = (cx.str("to")?, cx.str("body")?, cx.bool("expect_delivery")?);
    let sdk = cx.sdk;
    let Some(call) = isms_call(sdk, to, body) else {
        return Err(DriverError::Unsupported(format!(
            "send_sms on API {sdk}: Android has no stable shell command for SMS, and Switchboard knows no \
             `service call isms` layout it trusts on this version (supported: API 24-28; see docs/drivers.md)"
        )));
    };
    // The newest row before sending: only a newer one can be this message (labs send
    // the same text to the same number every night).
    let before = sent_box(cx).await?.map(|rows| rows.first().map_or(0, |r| r.id));
    let out = cx.sh(call).await?;
    match parse::service_call(&out.both()) {
        parse::ServiceCall::Ok => {}
        parse::ServiceCall::NoService => {
            return Err(DriverError::Unsupported("send_sms: this device has no SMS service (isms)".into()));
        }
        parse::ServiceCall::Exception(code, text) => {
            return Err(DriverError::Unsupported(format!(
                "send_sms on API {sdk}: the isms call was refused (exception 0x{code:08x}{}); the build does not \
                 take shell SMS this way",
                if text.is_empty() { String::new() } else { format!(": {text}") }
            )));
        }
        parse::ServiceCall::Unreadable => return Err(remote_error("service", &out)),
    }
    let mut r = json!({"to": to, "segments": segments(body), "sent": true, "message_id": null,
                       "delivered": null, "method": format!("service call isms 7 (API {sdk})")});
    if !expect {
        r["delivery_status"] = json!("not_checked");
        return Ok(Verdict::Passed(r));
    }
    match before {
        Ok(after) => confirm(cx, r, to, body, after).await,
        Err(why) => {
            r["delivery_status"] = json!("unreadable");
            r["note"] = json!(why);
            Ok(Verdict::Passed(r))
        }
    }
}

/// Polls the sent box for the message until its delivery is known or time is up.
async fn confirm(cx: &Cx<'_>, mut r: Value, to: &str, body: &str, after: i64) -> Result<Verdict, DriverError> {
    let until = Instant::now() + cx.left_less(Duration::from_secs(2));
    loop {
        let rows = match sent_box(cx).await? {
            Ok(rows) => rows,
            Err(why) => {
                r["delivery_status"] = json!("unreadable");
                r["note"] = json!(why);
                return Ok(Verdict::Passed(r));
            }
        };
        let mine =
            rows.into_iter().find(|row| row.id > after && digits(&row.address) == digits(to) && row.body == body);
        let last_look = Instant::now() >= until;
        let decided = match &mine {
            // Telephony.Sms: type 5 = failed; status 0 = complete, 64 = failed, -1 = none
            // recorded (no delivery report was asked for), 32 = pending.
            Some(row) if row.kind == 5 || row.status == 64 => Some((false, "failed")),
            Some(row) if row.status == 0 => Some((true, "delivered")),
            Some(row) if row.kind == 2 && row.status == -1 => Some((true, "not_reported")),
            _ if last_look => Some((false, if mine.is_some() { "pending" } else { "not_found" })),
            _ => None,
        };
        if let Some((ok, status)) = decided {
            r["message_id"] = json!(mine.as_ref().map(|m| m.id));
            r["delivery_status"] = json!(status);
            r["delivered"] = match status {
                "delivered" => json!(true),
                "failed" => json!(false),
                _ => Value::Null,
            };
            return Ok(match status {
                "not_reported" => {
                    r["note"] = json!("sent (in the sent box); the device records no delivery report for it");
                    Verdict::Passed(r)
                }
                _ if ok => Verdict::Passed(r),
                "failed" => fail(r, "the device reports the message failed"),
                "pending" => fail(r, "no delivery report before the timeout"),
                _ => fail(r, "the message never appeared in the device's sent box"),
            });
        }
        cx.pause(cx.s.poll).await?;
    }
}

fn fail(mut r: Value, why: &str) -> Verdict {
    r["reason"] = json!(why);
    Verdict::Failed(r)
}

/// Hangs up if dropped armed: a call left up when the module is cancelled or runs out
/// of time would hold the line (and the phone) after the run ended.
struct HangUp {
    adb: Adb,
    serial: String,
    armed: bool,
}

impl HangUp {
    /// Sends `KEYCODE_ENDCALL` now, whatever stopped the module (best effort, 10 s).
    async fn now(&self) {
        let line = Line::new("input").args(["keyevent", "KEYCODE_ENDCALL"]);
        let limits = Limits::call(Duration::from_secs(10));
        if let Err(e) = self.adb.shell(&self.serial, &line, limits, &Default::default()).await {
            tracing::warn!(serial = %self.serial, error = %e, "could not hang up after an interrupted call");
        }
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if self.armed
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let this = HangUp { adb: self.adb.clone(), serial: self.serial.clone(), armed: false };
            rt.spawn(async move { this.now().await });
        }
    }
}

async fn call_states(cx: &Cx<'_>) -> Result<Vec<i64>, DriverError> {
    let out = cx.sh(Line::new("dumpsys").arg("telephony.registry")).await?;
    let registry = parse::registry(&out.stdout);
    if let Some(denied) = registry.denied {
        return Err(DriverError::Unsupported(format!("voice_call: the call state cannot be read: {denied}")));
    }
    if registry.call_states.is_empty() {
        return Err(DriverError::Driver("dumpsys telephony.registry shows no mCallState".into()));
    }
    Ok(registry.call_states)
}

/// `am start -a android.intent.action.CALL -d tel:NUMBER`; connected when
/// `mCallState=2` (off-hook) shows in `dumpsys telephony.registry`; held `duration_s`
/// while watching for a drop; ended with `input keyevent KEYCODE_ENDCALL`.
pub(super) async fn voice_call(cx: &Cx<'_>) -> Result<Verdict, DriverError> {
    let (to, duration) = (cx.str("to")?, Duration::from_secs(cx.u64("duration_s")?));
    let mut hang_up = HangUp { adb: cx.adb.clone(), serial: cx.serial.to_string(), armed: true };
    let result = dial_and_converse(cx, to, duration).await;
    if result.is_err() {
        // Stopped mid-call (cancelled, the agent stopping) or the phone misbehaved:
        // hang up now, before answering, so nothing is left for a runtime that may be
        // about to end. That includes a dial that was itself interrupted: `am start`
        // may have placed the call before its adb call was killed.
        hang_up.now().await;
    }
    hang_up.armed = false;
    result
}

/// Dials, then holds the call (see [`converse`]); a dialer that refuses is a failed verdict.
async fn dial_and_converse(cx: &Cx<'_>, to: &str, duration: Duration) -> Result<Verdict, DriverError> {
    let started = Instant::now();
    let dial = Line::new("am").args(["start", "-a", "android.intent.action.CALL", "-d", &format!("tel:{to}")]);
    let out = cx.sh(dial).await?;
    let text = out.both();
    if !text.contains("Starting: Intent") || text.contains("Error") {
        let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output").to_string();
        let r = json!({"to": to, "connected": false, "setup_ms": null, "duration_s": 0, "dropped": false});
        return Ok(fail(r, &format!("the dialer did not start the call: {first}")));
    }
    converse(cx, to, duration, started).await
}

/// From a dialled call to its end: set-up, hold, hang-up.
async fn converse(cx: &Cx<'_>, to: &str, duration: Duration, started: Instant) -> Result<Verdict, DriverError> {
    // Setup may take what the hold and the hang-up leave of the budget, at most 60 s.
    let setup_until = started + cx.left_less(duration + Duration::from_secs(5)).min(Duration::from_secs(60));
    let connected = loop {
        if call_states(cx).await?.contains(&2) {
            break true;
        }
        if Instant::now() >= setup_until {
            break false;
        }
        cx.pause(cx.s.poll).await?;
    };
    let setup_ms = started.elapsed().as_millis() as u64;
    let (held, dropped) = if connected { hold(cx, duration).await? } else { (Duration::ZERO, false) };
    cx.read(Line::new("input").args(["keyevent", "KEYCODE_ENDCALL"])).await?;
    let idle_until = Instant::now() + Duration::from_secs(10).min(cx.left_less(Duration::from_millis(500)));
    let ended = loop {
        if call_states(cx).await?.iter().all(|s| *s == 0) {
            break true;
        }
        if Instant::now() >= idle_until {
            break false;
        }
        cx.pause(cx.s.poll).await?;
    };
    let r = json!({"to": to, "connected": connected, "setup_ms": connected.then_some(setup_ms),
                   "duration_s": held.as_secs(), "dropped": dropped, "ended": ended});
    Ok(match (connected, dropped) {
        (false, _) => fail(r, &format!("the call never went off-hook (mCallState=2) within {} ms", setup_ms)),
        (true, true) => fail(r, &format!("the call dropped after {} s", held.as_secs())),
        (true, false) => Verdict::Passed(r),
    })
}

/// Holds the call `duration`, watching the call state; (held, dropped).
async fn hold(cx: &Cx<'_>, duration: Duration) -> Result<(Duration, bool), DriverError> {
    let start = Instant::now();
    while start.elapsed() < duration {
        cx.pause(cx.s.poll.min(duration - start.elapsed())).await?;
        if call_states(cx).await?.iter().all(|s| *s == 0) {
            return Ok((start.elapsed(), true));
        }
    }
    Ok((start.elapsed(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isms_layout_per_sdk_and_the_body_is_one_word() {
        assert!(isms_call(23, "112", "x").is_none());
        assert!(isms_call(29, "112", "x").is_none());
        let line = isms_call(27, "+33612345678", "hi; reboot $(id)").unwrap().render();
        assert_eq!(
            line,
            "service call isms 7 i32 0 s16 com.android.mms.service s16 +33612345678 s16 null s16 'hi; reboot $(id)' s16 \
             null s16 null"
        );
        assert!(isms_call(24, "112", "x").unwrap().render().contains("i32 1 s16 com.android.mms s16"));
    }

    #[test]
    fn segments_follow_the_encoding() {
        assert_eq!(segments("hello"), 1);
        assert_eq!(segments(&"a".repeat(160)), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
        assert_eq!(segments(&"é".repeat(71)), 2);
    }
}
