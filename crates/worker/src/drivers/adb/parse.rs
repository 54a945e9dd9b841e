//! Parsers of the real output formats of adb and the Android tools the modules run.
//! Each is written from the format's source (AOSP adb, iputils, BatteryService,
//! TelephonyRegistry, liblog, the `service` and `content` tools), and its tests use
//! real captures; `docs/drivers.md` names the sources.

use std::collections::HashMap;

use serde::Serialize;
use switchboard_core::repo::presence::Listed;

/// `adb devices -l`: `SERIAL<padding> STATE [usb:…] [product:…] [model:…] [device:…]
/// [transport_id:N]`, or the short `SERIAL\tSTATE`, after the `List of devices
/// attached` header. The state may hold spaces (`no permissions (…); see […]`): it runs
/// up to the first known `key:` field. A device without a serial is listed as `(no
/// serial number)`.
pub fn devices(text: &str) -> Vec<Listed> {
    const KEYS: [&str; 5] = ["usb:", "product:", "model:", "device:", "transport_id:"];
    const NO_SERIAL: &str = "(no serial number)";
    let mut out = Vec::new();
    let body = text.lines().skip_while(|l| !l.starts_with("List of devices attached")).skip(1);
    for line in body {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with("* ") {
            continue;
        }
        let split = match line.strip_prefix(NO_SERIAL) {
            Some(rest) => Some((NO_SERIAL, rest)),
            None => line.split_once([' ', '\t']),
        };
        let Some((serial, rest)) = split else { continue };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let first_field = words.iter().position(|w| KEYS.iter().any(|k| w.starts_with(k))).unwrap_or(words.len());
        let state = words[..first_field].join(" ");
        if state.is_empty() {
            continue;
        }
        let field = |key: &str| words[first_field..].iter().find_map(|w| w.strip_prefix(key)).map(str::to_string);
        out.push(Listed {
            serial: serial.to_string(),
            state,
            model: field("model:"),
            product: field("product:"),
            device: field("device:"),
            usb: field("usb:"),
        });
    }
    out
}

/// The statistics block iputils' `ping` prints at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PingStats {
    /// Packets transmitted.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// Duplicate replies (`+N duplicates`).
    pub duplicates: u64,
    /// ICMP errors (`+N errors`).
    pub errors: u64,
    /// Packet loss, percent (as printed).
    pub loss_pct: f64,
    /// `time Nms`: how long ping ran.
    pub time_ms: Option<u64>,
    /// `rtt min/avg/max/mdev`, when a reply came.
    pub rtt_ms: Option<Rtt>,
}

/// Round-trip times, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rtt {
    /// Fastest.
    pub min: f64,
    /// Mean.
    pub avg: f64,
    /// Slowest.
    pub max: f64,
    /// Mean deviation (iputils only).
    pub mdev: Option<f64>,
}

/// `N packets transmitted, M received[, +D duplicates][, +E errors], P% packet loss,
/// time Tms` and `rtt min/avg/max/mdev = a/b/c/d ms` (iputils `finish()`; busybox's
/// `round-trip min/avg/max = a/b/c ms` is read too).
pub fn ping(text: &str) -> Option<PingStats> {
    let stats = text.lines().find(|l| l.contains(" packets transmitted, "))?;
    let mut s =
        PingStats { sent: 0, received: 0, duplicates: 0, errors: 0, loss_pct: 0.0, time_ms: None, rtt_ms: None };
    let mut saw_loss = false;
    for part in stats.split(", ").map(str::trim) {
        let (num, what) = part.split_once(' ').unwrap_or((part, ""));
        match what {
            "packets transmitted" => s.sent = num.parse().ok()?,
            "received" | "packets received" => s.received = num.parse().ok()?,
            "duplicates" => s.duplicates = num.trim_start_matches('+').parse().ok()?,
            "errors" => s.errors = num.trim_start_matches('+').parse().ok()?,
            "packet loss" => {
                s.loss_pct = num.strip_suffix('%')?.parse().ok()?;
                saw_loss = true;
            }
            _ if part.starts_with("time ") => s.time_ms = part[5..].trim_end_matches("ms").parse().ok(),
            _ => {}
        }
    }
    if !saw_loss {
        return None;
    }
    s.rtt_ms = text.lines().find_map(|l| {
        let (head, values) = l.split_once(" = ")?;
        if !(head.starts_with("rtt ") || head.starts_with("round-trip ")) {
            return None;
        }
        let nums: Vec<f64> = values.trim_end_matches(" ms").split('/').filter_map(|v| v.trim().parse().ok()).collect();
        (nums.len() >= 3).then(|| Rtt { min: nums[0], avg: nums[1], max: nums[2], mdev: nums.get(3).copied() })
    });
    Some(s)
}

/// The full `getprop` listing: `[key]: [value]` lines.
pub fn getprop(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once("]: [")?;
            Some((k.strip_prefix('[')?.to_string(), v.strip_suffix(']')?.to_string()))
        })
        .collect()
}

/// `dumpsys battery`, as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Battery {
    /// Charge, percent of `scale`.
    pub level_pct: Option<i64>,
    /// `charging`, `discharging`, `not_charging`, `full` or `unknown`.
    pub status: Option<&'static str>,
    /// `good`, `overheat`, `dead`, `over_voltage`, `failure`, `cold` or `unknown`.
    pub health: Option<&'static str>,
    /// Degrees Celsius (the dump says tenths).
    pub temperature_c: Option<f64>,
    /// Millivolts.
    pub voltage_mv: Option<i64>,
    /// What powers it: `ac`, `usb`, `wireless`, `dock`, or `none`.
    pub plugged: &'static str,
}

/// `dumpsys battery`: an indented `key: value` block under `Current Battery Service
/// state:` (two spaces in BatteryService, four in older builds), ended by the first
/// blank or unindented line; fields vary by version, so each is optional.
pub fn battery(text: &str) -> Option<Battery> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("Current Battery Service state:"));
    lines.next()?;
    let mut kv = HashMap::new();
    for l in lines {
        if l.trim().is_empty() || !l.starts_with(' ') {
            break;
        }
        if let Some((k, v)) = l.trim().split_once(": ") {
            kv.insert(k.to_string(), v.trim().to_string());
        }
    }
    let int = |k: &str| kv.get(k).and_then(|v| v.parse::<i64>().ok());
    let yes = |k: &str| kv.get(k).is_some_and(|v| v == "true");
    let level_pct = match (int("level"), int("scale")) {
        (Some(l), Some(s)) if s > 0 => Some(l * 100 / s),
        (l, _) => l,
    };
    // BatteryManager.BATTERY_STATUS_* and BATTERY_HEALTH_* codes.
    let status = int("status").map(|c| match c {
        2 => "charging",
        3 => "discharging",
        4 => "not_charging",
        5 => "full",
        _ => "unknown",
    });
    let health = int("health").map(|c| match c {
        2 => "good",
        3 => "overheat",
        4 => "dead",
        5 => "over_voltage",
        6 => "failure",
        7 => "cold",
        _ => "unknown",
    });
    let plugged =
        [("AC powered", "ac"), ("USB powered", "usb"), ("Wireless powered", "wireless"), ("Dock powered", "dock")]
            .iter()
            .find(|(k, _)| yes(k))
            .map_or("none", |(_, v)| v);
    Some(Battery {
        level_pct,
        status,
        health,
        temperature_c: int("temperature").map(|t| t as f64 / 10.0),
        voltage_mv: int("voltage"),
        plugged,
    })
}

/// What `dumpsys telephony.registry` says, as read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Registry {
    /// `mCallState=` per SIM: 0 idle, 1 ringing, 2 off-hook.
    pub call_states: Vec<i64>,
    /// `mDataConnectionState=` per SIM: 0 disconnected, 1 connecting, 2 connected, 3 suspended.
    pub data_states: Vec<i64>,
    /// The first SIM's signal strength.
    pub signal: Option<Signal>,
    /// The dump was refused (`Permission Denial: can't dump telephony.registry …`).
    pub denied: Option<String>,
}

/// A signal strength reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signal {
    /// `lte`, `nr`, `gsm`, `wcdma`, `tdscdma` or `cdma`.
    pub technology: String,
    /// The technology's main figure, dBm (RSRP for LTE, SS-RSRP for NR, RSSI for GSM,
    /// RSCP for WCDMA/TD-SCDMA).
    pub dbm: Option<i64>,
    /// Bars, 0 to 4 (Android 10+).
    pub level: Option<i64>,
}

/// Reads `dumpsys telephony.registry`: one `mCallState=N` line per SIM (indented under
/// `Phone Id=N` in recent dumps), `mDataConnectionState=`, and `mSignalStrength=`,
/// whose format changed in Android 10.
pub fn registry(text: &str) -> Registry {
    let mut r = Registry::default();
    if let Some(l) = text.lines().find(|l| l.starts_with("Permission Denial")) {
        r.denied = Some(l.trim().to_string());
        return r;
    }
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("mCallState=") {
            r.call_states.extend(v.trim().parse::<i64>().ok());
        } else if let Some(v) = line.strip_prefix("mDataConnectionState=") {
            r.data_states.extend(v.trim().parse::<i64>().ok());
        } else if let Some(v) = line.strip_prefix("mSignalStrength=")
            && r.signal.is_none()
        {
            r.signal = signal(v);
        }
    }
    r
}

/// `SignalStrength` as printed: Android 10+ `SignalStrength:{mCdma=…,mGsm=…,mLte=…,
/// mNr=…,primary=CellSignalStrengthLte,…}`; Android 9 and before a flat list of ints
/// (`0 gsm, 1 gsmBer, … 7 lteRssi, 8 lteRsrp, …`). `2147483647` means unavailable.
pub fn signal(v: &str) -> Option<Signal> {
    let unavailable = |n: i64| n == i64::from(i32::MAX) || n == i64::from(i32::MIN);
    if let Some(primary) = v.split("primary=").nth(1) {
        let class = primary.split([',', '}']).next()?.trim();
        let tech = class.strip_prefix("CellSignalStrength")?.to_ascii_lowercase();
        let after = v.split(&format!("m{}=", capitalise(&tech))).nth(1)?;
        let end = [",mCdma=", ",mGsm=", ",mWcdma=", ",mTdscdma=", ",mLte=", ",mNr=", ",primary="]
            .iter()
            .filter_map(|m| after.find(m))
            .min()
            .unwrap_or(after.len());
        let fields = key_values(&after[..end]);
        let main = match tech.as_str() {
            "lte" => "rsrp",
            "nr" => "ssRsrp",
            "gsm" => "rssi",
            "cdma" => "cdmaDbm",
            _ => "rscp",
        };
        let get = |k: &str| fields.get(k).copied().filter(|n| !unavailable(*n));
        return Some(Signal { technology: tech, dbm: get(main), level: get("level").or_else(|| get("mLevel")) });
    }
    let nums: Vec<i64> =
        v.trim_start_matches("SignalStrength:").split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let lte_rsrp = nums.get(8).copied().filter(|n| !unavailable(*n) && *n < 0);
    if let Some(rsrp) = lte_rsrp {
        return Some(Signal { technology: "lte".into(), dbm: Some(rsrp), level: None });
    }
    // GSM signal strength is in ASU (0-31, 99 unknown): dBm = 2·ASU − 113.
    let asu = nums.first().copied().filter(|a| (0..=31).contains(a))?;
    Some(Signal { technology: "gsm".into(), dbm: Some(2 * asu - 113), level: None })
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

/// `key=value` and `key = value` pairs with integer values.
fn key_values(s: &str) -> HashMap<&str, i64> {
    let words: Vec<&str> = s.split([' ', ',', '{', '}']).filter(|w| !w.is_empty()).collect();
    let mut out = HashMap::new();
    for (i, w) in words.iter().enumerate() {
        if let Some((k, v)) = w.split_once('=')
            && !k.is_empty()
        {
            if let Ok(n) = v.parse() {
                out.insert(k, n);
            } else if v.is_empty()
                && let Some(n) = words.get(i + 1).and_then(|n| n.parse().ok())
            {
                out.insert(k, n);
            }
        } else if words.get(i + 1) == Some(&"=")
            && let Some(n) = words.get(i + 2).and_then(|n| n.parse().ok())
        {
            out.insert(*w, n);
        }
    }
    out
}

/// What a logcat excerpt holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LogStats {
    /// Log lines (threadtime format; buffer separators not counted).
    pub lines: u64,
    /// Lines of priority `E`.
    pub errors: u64,
    /// Lines of priority `F` (and `A`, assert).
    pub fatal: u64,
    /// `FATAL EXCEPTION` lines (Java crashes).
    pub crashes: u64,
    /// The first line's `MM-DD HH:MM:SS.mmm`.
    pub first_at: Option<String>,
    /// The last line's.
    pub last_at: Option<String>,
}

/// One threadtime line: `MM-DD HH:MM:SS.mmm  PID  TID P TAG     : message`
/// (`"%s.%03ld %5d %5d %c %-8s: "` in liblog): its timestamp and priority.
pub fn threadtime(line: &str) -> Option<(&str, char)> {
    let b = line.as_bytes();
    let shape = b.len() >= 20
        && b[2] == b'-'
        && b[5] == b' '
        && b[8] == b':'
        && b[11] == b':'
        && b[14] == b'.'
        && b[..18].iter().enumerate().all(|(i, c)| matches!(i, 2 | 5 | 8 | 11 | 14) || c.is_ascii_digit());
    if !shape {
        return None;
    }
    let mut rest = line[18..].split_whitespace();
    let (_pid, _tid) = (rest.next()?.parse::<i64>().ok()?, rest.next()?.parse::<i64>().ok()?);
    let prio = rest.next()?.chars().next()?;
    "VDIWEFAS".contains(prio).then_some((&line[..18], prio))
}

/// Counts an excerpt's lines by priority; `--------- beginning of main` separators are
/// not lines.
pub fn logcat(text: &str) -> LogStats {
    let mut s = LogStats::default();
    for line in text.lines() {
        let Some((at, prio)) = threadtime(line) else { continue };
        s.lines += 1;
        match prio {
            'E' => s.errors += 1,
            'F' | 'A' => s.fatal += 1,
            _ => {}
        }
        if line.contains("FATAL EXCEPTION") {
            s.crashes += 1;
        }
        if s.first_at.is_none() {
            s.first_at = Some(at.to_string());
        }
        s.last_at = Some(at.to_string());
    }
    s
}

/// What `service call` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceCall {
    /// `Result: Parcel(00000000 …)`: no exception.
    Ok,
    /// The parcel's first word is an exception code (`ffffffff` = SecurityException);
    /// with the UTF-16 text the dump shows, if any.
    Exception(u32, String),
    /// `service: Service NAME does not exist`.
    NoService,
    /// Anything else.
    Unreadable,
}

/// Reads `service call`'s answer: `Result: Parcel(00000000    '....')` on success, a
/// multi-line hex dump starting `0x00000000: ffffffff` for an exception.
pub fn service_call(text: &str) -> ServiceCall {
    if text.contains("does not exist") && text.contains("Service ") {
        return ServiceCall::NoService;
    }
    let Some(body) = text.split("Parcel(").nth(1) else { return ServiceCall::Unreadable };
    let body = body.trim_start();
    let body = body.strip_prefix("0x00000000:").unwrap_or(body).trim_start();
    let Some(code) = body.get(..8).and_then(|w| u32::from_str_radix(w, 16).ok()) else {
        return ServiceCall::Unreadable;
    };
    if code == 0 {
        return ServiceCall::Ok;
    }
    // The quoted column shows the exception message as UTF-16 with dots between letters.
    let text: String = body
        .lines()
        .filter_map(|l| l.rsplit_once('\'').and_then(|(head, _)| head.rsplit_once('\'')).map(|(_, q)| q.to_string()))
        .collect::<String>()
        .chars()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| c.iter().find(|ch| **ch != '.').copied())
        .collect();
    ServiceCall::Exception(code, text.trim().to_string())
}

/// One row of `content query --uri content://sms/sent --projection
/// _id:type:status:date:address:body` (body last: it may hold `, ` and newlines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmsRow {
    /// Provider id.
    pub id: i64,
    /// `Telephony.Sms.MESSAGE_TYPE_*`: 2 sent, 4 outbox, 5 failed, 6 queued.
    pub kind: i64,
    /// `Telephony.Sms.STATUS_*`: -1 none, 0 complete, 32 pending, 64 failed.
    pub status: i64,
    /// Epoch milliseconds.
    pub date: i64,
    /// The recipient.
    pub address: String,
    /// The text.
    pub body: String,
}

/// Reads `content query` rows (`Row: N _id=…, type=…, …, body=…`); `No result found.`
/// is none.
pub fn sms_rows(text: &str) -> Vec<SmsRow> {
    let mut rows = Vec::new();
    let mut chunks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("Row: ") {
            chunks.push(line.to_string());
        } else if let Some(last) = chunks.last_mut() {
            last.push('\n');
            last.push_str(line);
        }
    }
    for chunk in chunks {
        let Some(fields) = chunk.split_once(' ').and_then(|(_, r)| r.split_once(' ')).map(|(_, r)| r) else { continue };
        let (head, body) = fields.split_once(", body=").unwrap_or((fields, ""));
        let kv: HashMap<&str, &str> = head.split(", ").filter_map(|p| p.split_once('=')).collect();
        let int = |k: &str| kv.get(k).and_then(|v| v.parse::<i64>().ok());
        let (Some(id), Some(kind)) = (int("_id"), int("type")) else { continue };
        rows.push(SmsRow {
            id,
            kind,
            status: int("status").unwrap_or(-1),
            date: int("date").unwrap_or(0),
            address: kv.get("address").unwrap_or(&"").to_string(),
            body: body.to_string(),
        });
    }
    rows
}

/// `cmd wifi status` (Android 11+, `WifiShellCommand`): enabled, and the network it is
/// connected to (`Wifi is connected to "SSID"`, then `WifiInfo: SSID: "…", …, RSSI: -55, …`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WifiStatus {
    /// `Wifi is enabled` / `Wifi is disabled`.
    pub enabled: Option<bool>,
    /// The connected network's SSID, unquoted.
    pub ssid: Option<String>,
    /// Its RSSI, dBm.
    pub rssi_dbm: Option<i64>,
}

/// Reads `cmd wifi status`.
pub fn wifi_status(text: &str) -> WifiStatus {
    let mut w = WifiStatus::default();
    for line in text.lines().map(str::trim) {
        if line == "Wifi is enabled" {
            w.enabled = Some(true);
        } else if line == "Wifi is disabled" {
            w.enabled = Some(false);
        } else if let Some(ssid) = line.strip_prefix("Wifi is connected to ") {
            w.ssid = Some(ssid.trim_matches('"').to_string());
        } else if line.starts_with("WifiInfo:") {
            w.rssi_dbm = line.split(", ").find_map(|p| p.strip_prefix("RSSI: ")).and_then(|v| v.parse().ok());
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_real_layouts() {
        let text = "List of devices attached\n\
            27211JEGR06194         unauthorized usb:17825792X transport_id:1\n\
            emulator-5556 device product:sdk_google_phone_x86_64 model:Android_SDK_built_for_x86_64 device:generic_x86_64\n\
            0a388e93      device usb:1-1 product:razor model:Nexus_7 device:flo\n\
            R58M123       no permissions (missing udev rules? user is in the plugdev group); see [http://developer.android.com/tools/device.html] usb:1-2 transport_id:4\n\
            emulator-5554\toffline\n\n";
        let d = devices(text);
        assert_eq!(d.len(), 5);
        assert_eq!(
            (d[0].serial.as_str(), d[0].state.as_str(), d[0].usb.as_deref()),
            ("27211JEGR06194", "unauthorized", Some("17825792X"))
        );
        assert_eq!(d[2].model.as_deref(), Some("Nexus_7"));
        assert_eq!(d[2].product.as_deref(), Some("razor"));
        assert!(d[3].state.starts_with("no permissions (missing udev rules?"));
        assert_eq!(d[3].usb.as_deref(), Some("1-2"));
        assert_eq!((d[4].serial.as_str(), d[4].state.as_str()), ("emulator-5554", "offline"));
        assert!(devices("List of devices attached\n\n").is_empty());
        assert!(devices("27211JEGR06194 device\n").is_empty(), "no header, no listing");
        let wireless = "List of devices attached\nadb-27211JEGR06194-AbCdEf._adb-tls-connect._tcp device product:bluejay model:Pixel_6a device:bluejay transport_id:3\n(no serial number)     offline usb:1-4 transport_id:5\n";
        let d = devices(wireless);
        assert_eq!(d[0].serial, "adb-27211JEGR06194-AbCdEf._adb-tls-connect._tcp");
        assert_eq!((d[1].serial.as_str(), d[1].state.as_str()), ("(no serial number)", "offline"));
    }

    #[test]
    fn ping_iputils_blocks() {
        let ok = "PING google.com (172.217.27.142) 56(84) bytes of data.\n\
            64 bytes from tsa03s02-in-f14.1e100.net (172.217.27.142): icmp_seq=1 ttl=57 time=3.09 ms\n\
            64 bytes from tsa03s02-in-f14.1e100.net (172.217.27.142): icmp_seq=2 ttl=57 time=17.7 ms\n\n\
            --- google.com ping statistics ---\n\
            2 packets transmitted, 2 received, 0% packet loss, time 1003ms\n\
            rtt min/avg/max/mdev = 3.092/10.412/17.732/7.320 ms\n";
        let s = ping(ok).unwrap();
        assert_eq!((s.sent, s.received, s.loss_pct, s.time_ms), (2, 2, 0.0, Some(1003)));
        assert_eq!(s.rtt_ms, Some(Rtt { min: 3.092, avg: 10.412, max: 17.732, mdev: Some(7.32) }));
        let lost = "PING 192.168.178.1 (192.168.178.1) 56(84) bytes of data.\n\n\
            --- 192.168.178.1 ping statistics ---\n\
            3 packets transmitted, 0 received, 100% packet loss, time 1998ms\n";
        let s = ping(lost).unwrap();
        assert_eq!((s.sent, s.received, s.loss_pct, s.rtt_ms), (3, 0, 100.0, None));
        let errs = "1 packets transmitted, 0 received, +1 errors, 100% packet loss, time 0ms\n";
        assert_eq!(ping(errs).unwrap().errors, 1);
        assert_eq!(ping("ping: unknown host facebook.com\n"), None);
    }

    #[test]
    fn getprop_and_battery() {
        let p = getprop("[ro.build.version.sdk]: [34]\n[ro.product.model]: [Pixel 6a]\n[sys.boot_completed]: [1]\n");
        assert_eq!(p["ro.build.version.sdk"], "34");
        assert_eq!(p["ro.product.model"], "Pixel 6a");
        let dump = "Current Battery Service state:\n  AC powered: false\n  USB powered: true\n  Wireless powered: false\n  \
            Dock powered: false\n  Max charging current: 500000\n  status: 5\n  health: 2\n  present: true\n  level: 100\n  \
            scale: 100\n  voltage: 4352\n  temperature: 274\n  technology: Li-ion\n  Charging state: 1\n\n[EventLogBuffer]\n  level: 3\n";
        let b = battery(dump).unwrap();
        assert_eq!(
            b,
            Battery {
                level_pct: Some(100),
                status: Some("full"),
                health: Some("good"),
                temperature_c: Some(27.4),
                voltage_mv: Some(4352),
                plugged: "usb"
            }
        );
        // Tradefed's older four-space layout.
        let old = "Current Battery Service state:\n    AC powered: true\n    status: 2\n    level: 57\n    scale: 100\n    temperature: 301\n";
        let b = battery(old).unwrap();
        assert_eq!((b.level_pct, b.status, b.plugged, b.temperature_c), (Some(57), Some("charging"), "ac", Some(30.1)));
    }

    #[test]
    fn registry_both_signal_formats() {
        let modern = "last known state:\n  Phone Id=0\n    mCallState=2\n    mCallIncomingNumber=\n    mDataConnectionState=2\n    \
            mSignalStrength=SignalStrength:{mCdma=CellSignalStrengthCdma: cdmaDbm=2147483647 cdmaEcio=2147483647 level=0,\
            mGsm=CellSignalStrengthGsm: rssi=2147483647 ber=2147483647 mTa=2147483647 mLevel=0,\
            mLte=CellSignalStrengthLte: rssi=-61 rsrp=-94 rsrq=-11 rssnr=2147483647 cqi=2147483647 ta=2147483647 level=3 parametersUseForLevel=0,\
            mNr=CellSignalStrengthNr:{ csiRsrp = 2147483647 ssRsrp = 2147483647 level = 0 },primary=CellSignalStrengthLte,mMaxLevel=4}\n  \
            Phone Id=1\n    mCallState=0\n";
        let r = registry(modern);
        assert_eq!((r.call_states, r.data_states), (vec![2, 0], vec![2]));
        assert_eq!(r.signal, Some(Signal { technology: "lte".into(), dbm: Some(-94), level: Some(3) }));
        let nr = "mSignalStrength=SignalStrength:{mLte=CellSignalStrengthLte: rsrp=2147483647 level=0,\
            mNr=CellSignalStrengthNr:{ csiRsrp = -90 ssRsrp = -85 ssSinr = 20 level = 4 },primary=CellSignalStrengthNr}";
        assert_eq!(registry(nr).signal, Some(Signal { technology: "nr".into(), dbm: Some(-85), level: Some(4) }));
        let pie = "mSignalStrength=SignalStrength: 99 0 -120 -160 -120 -1 -1 99 -101 -12 300 2147483647 2147483647";
        assert_eq!(registry(pie).signal, Some(Signal { technology: "lte".into(), dbm: Some(-101), level: None }));
        let gsm = "mSignalStrength=SignalStrength: 14 0 -120 -160 -120 -1 -1 99 2147483647 2147483647";
        assert_eq!(registry(gsm).signal.unwrap().dbm, Some(-85));
        let denied = "Permission Denial: can't dump telephony.registry from from pid=123, uid=2000\n";
        assert!(registry(denied).denied.is_some());
    }

    #[test]
    fn logcat_threadtime() {
        let text = "--------- beginning of main\n\
            08-11 09:06:11.470   871  2146 D NetlinkSocketObserver: NeighborEvent{elapsedMs=115464}\n\
            08-11 09:06:12.205  3639  3639 D ICU     : No timezone override file found\n\
            08-11 09:06:13.001  3639  3639 E AndroidRuntime: FATAL EXCEPTION: main\n\
            --------- beginning of system\n\
            08-11 09:06:14.265   878  1218 F libc    : Fatal signal 6\n\
            not a log line\n";
        let s = logcat(text);
        assert_eq!((s.lines, s.errors, s.fatal, s.crashes), (4, 1, 1, 1));
        assert_eq!(
            (s.first_at.as_deref(), s.last_at.as_deref()),
            (Some("08-11 09:06:11.470"), Some("08-11 09:06:14.265"))
        );
    }

    #[test]
    fn service_call_parcels() {
        assert_eq!(service_call("Result: Parcel(00000000    '....')\n"), ServiceCall::Ok);
        let sec = "Result: Parcel(\n  0x00000000: ffffffff 00000014 00650053 00750063 '........S.e.c.u.'\n  \
            0x00000010: 00690072 00790074 00200020 00650044 'r.i.t.y. . .D.e.'\n  0x00000020: 0069006e 00640065 00000000          'n.i.e.d.....    ')\n";
        match service_call(sec) {
            ServiceCall::Exception(code, _) => assert_eq!(code, 0xffff_ffff),
            other => panic!("{other:?}"),
        }
        assert_eq!(service_call("service: Service isms does not exist\n"), ServiceCall::NoService);
        assert_eq!(service_call("garbage"), ServiceCall::Unreadable);
    }

    #[test]
    fn sms_rows_with_commas_and_newlines_in_bodies() {
        let text = "Row: 0 _id=12, type=2, status=-1, date=1764640000000, address=+33612345678, body=hi, there\nsecond line\n\
            Row: 1 _id=11, type=5, status=64, date=1764630000000, address=112, body=x\n";
        let rows = sms_rows(text);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].id, rows[0].kind, rows[0].status), (12, 2, -1));
        assert_eq!(rows[0].body, "hi, there\nsecond line");
        assert_eq!(rows[1].address, "112");
        assert!(sms_rows("No result found.\n").is_empty());
    }

    #[test]
    fn wifi_status_android_11() {
        let text = "Wifi is enabled\nWifi scanning is always available\n==== Primary ClientModeManager instance ====\n\
            Wifi is connected to \"lab-5G\"\nWifiInfo: SSID: \"lab-5G\", BSSID: 02:00:00:00:00:00, MAC: 02:00:00:00:00:00, \
            Security type: 2, Supplicant state: COMPLETED, Wi-Fi standard: 5, RSSI: -55, Link speed: 433Mbps\n";
        assert_eq!(
            wifi_status(text),
            WifiStatus { enabled: Some(true), ssid: Some("lab-5G".into()), rssi_dbm: Some(-55) }
        );
        assert_eq!(wifi_status("Wifi is disabled\nWifi is not connected\n").enabled, Some(false));
    }
}
