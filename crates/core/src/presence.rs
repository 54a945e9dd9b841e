//! Device presence: what a device's status becomes when adb discovery or a host agent
//! reports what it sees, or when a host falls silent. A pure decision, proved by its
//! table of tests; `repo::presence` carries it out.
//!
//! The rule that keeps operators in charge: a report only moves a device that is
//! `online`, or `offline` because a report (not an operator) said so. A device in
//! `maintenance`, `retired`, or taken offline by hand stays as it is, whatever adb says.

use crate::model::{DeviceStatus, StatusSource};

/// What a report says of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Listed and ready (adb state `device`).
    Ready,
    /// Listed in another state (`unauthorized`, `offline`, `recovery`, ...): the adb
    /// state word.
    NotReady(String),
    /// Not listed.
    Missing,
    /// Its host is offline: the reason.
    HostDown(String),
}

/// A device's status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The status.
    pub status: DeviceStatus,
    /// Why, when it is not plainly online.
    pub reason: Option<String>,
    /// Who set it.
    pub source: StatusSource,
}

/// The status a device moves to on a report by `reporter` (`Discovery` or `Host`,
/// described as `by`: "adb devices", "host lab-3"), or `None` when it stays.
pub fn next(current: &Presence, seen: &Seen, reporter: StatusSource, by: &str) -> Option<Presence> {
    let automatic = current.source != StatusSource::Operator;
    let movable = match current.status {
        DeviceStatus::Online => true,
        DeviceStatus::Offline => automatic,
        DeviceStatus::Maintenance | DeviceStatus::Retired => false,
    };
    if !movable {
        return None;
    }
    let target = match seen {
        Seen::Ready => Presence { status: DeviceStatus::Online, reason: None, source: reporter },
        Seen::NotReady(state) => offline(reporter, not_ready(state, by)),
        Seen::Missing => offline(reporter, format!("not listed by {by}")),
        Seen::HostDown(why) => offline(reporter, why.clone()),
    };
    // An online device that was online by an operator's word stays "operator" until it
    // changes: only a change is written (and evented).
    let changed = target.status != current.status || (target.status == DeviceStatus::Offline && target != *current);
    changed.then_some(target)
}

fn offline(source: StatusSource, reason: String) -> Presence {
    Presence { status: DeviceStatus::Offline, reason: Some(reason), source }
}

/// Says what an adb state word means for the lab.
fn not_ready(state: &str, by: &str) -> String {
    let hint = match state {
        "unauthorized" => ": accept the USB debugging prompt on the phone (or check the adb keys)",
        "authorizing" | "connecting" => ": still connecting",
        "offline" => ": adb lost the connection (replug the cable or restart adb)",
        "recovery" | "bootloader" | "sideload" | "rescue" => ": not booted into Android",
        s if s.starts_with("no permissions") => ": the adb user may not open the USB device (udev rules)",
        _ => "",
    };
    format!("{by} reports it {state}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceStatus::*;
    use StatusSource::{Discovery as D, Host as H, Operator as O};

    fn p(status: DeviceStatus, source: StatusSource, reason: Option<&str>) -> Presence {
        Presence { status, source, reason: reason.map(str::to_string) }
    }

    #[test]
    fn reports_move_only_what_reports_own() {
        let ready = Seen::Ready;
        let missing = Seen::Missing;
        let unauth = Seen::NotReady("unauthorized".into());
        let by = "adb devices";
        type Row<'a> = (Presence, &'a Seen, Option<(DeviceStatus, StatusSource)>);
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // online devices follow the report
            (p(Online, O, None), &ready, None),
            (p(Online, O, None), &missing, Some((Offline, D))),
            (p(Online, D, None), &unauth, Some((Offline, D))),
            // offline by a report: back when seen ready
            (p(Offline, D, Some("not listed by adb devices")), &ready, Some((Online, D))),
            (p(Offline, H, Some("host lab is offline")), &ready, Some((Online, D))),
            // ...and its reason follows what is seen now
            (p(Offline, D, Some("not listed by adb devices")), &unauth, Some((Offline, D))),
            (p(Offline, D, Some("not listed by adb devices")), &missing, None),
            // an operator's decision stands
            (p(Offline, O, Some("cracked screen")), &ready, None),
            (p(Maintenance, O, None), &missing, None),
            (p(Maintenance, O, None), &ready, None),
            (p(Retired, O, None), &ready, None),
        ];
        for (current, seen, want) in table {
            let got = next(&current, seen, D, by).map(|n| (n.status, n.source));
            assert_eq!(got, want, "{current:?} seen {seen:?}");
        }
    }

    #[test]
    fn reasons_say_what_to_do() {
        let now = p(Online, O, None);
        let n = next(&now, &Seen::NotReady("unauthorized".into()), D, "adb devices").unwrap();
        assert_eq!(
            n.reason.as_deref(),
            Some(
                "adb devices reports it unauthorized: accept the USB debugging prompt on the phone (or check the adb keys)"
            )
        );
        let n = next(&now, &Seen::Missing, H, "host lab-3").unwrap();
        assert_eq!(n.reason.as_deref(), Some("not listed by host lab-3"));
        let n = next(&now, &Seen::HostDown("host lab-3 is offline: no heartbeat for 30 s".into()), H, "").unwrap();
        assert_eq!((n.status, n.reason.as_deref()), (Offline, Some("host lab-3 is offline: no heartbeat for 30 s")));
    }
}
