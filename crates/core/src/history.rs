//! What the run history is read by: a time window and filters, parsed once at the edge.
//! The figures themselves are computed in SQL (`repo::dashboard`), over the views the
//! migrations own (`v_run_history`, `v_step_history`).

use std::{fmt, str::FromStr, time::Duration};

use crate::{ids::ScheduleId, model::RunKind};

/// A look-back window (`24h`, `7d`, `30m`, `2w`): the runs that finished in it. It
/// prints as it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(Duration, u64, char);

impl Window {
    /// The shortest window (one minute).
    pub const MIN: Duration = Duration::from_secs(60);
    /// The longest window (400 days: a year with room).
    pub const MAX: Duration = Duration::from_secs(400 * 86_400);

    /// Its length.
    pub fn duration(self) -> Duration {
        self.0
    }

    /// Its length in seconds, as the queries take it.
    pub fn seconds(self) -> f64 {
        self.0.as_secs_f64()
    }
}

impl Default for Window {
    /// 24 hours.
    fn default() -> Window {
        Window(Duration::from_secs(86_400), 24, 'h')
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Window, String> {
        let bad = || format!("must be a number and a unit (m, h, d or w), e.g. 24h or 7d; got {s:?}");
        let unit = s.chars().last().ok_or_else(bad)?;
        let secs: u64 = match unit {
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        let length = Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?);
        if !(Window::MIN..=Window::MAX).contains(&length) {
            return Err(format!("must be between 1m and 400d; got {s:?}"));
        }
        Ok(Window(length, n, unit))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.1, self.2)
    }
}

/// Which runs a history figure covers.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Runs that finished in this window.
    pub window: Window,
    /// Runs on devices of this pool (or, never placed, whose selector asked for it).
    pub pool: Option<String>,
    /// Runs on devices with this label.
    pub label: Option<String>,
    /// Runs this schedule started.
    pub schedule_id: Option<ScheduleId>,
    /// Runs of this kind; without it, module and workflow runs (campaign children
    /// included), never campaign parents, so a campaign's outcome is not counted twice.
    pub kind: Option<RunKind>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_their_units_and_bounds() {
        let cases: &[(&str, Option<u64>)] = &[
            ("24h", Some(86_400)),
            ("7d", Some(604_800)),
            ("30m", Some(1_800)),
            ("2w", Some(1_209_600)),
            ("1m", Some(60)),
            ("400d", Some(34_560_000)),
            ("401d", None),
            ("0h", None),
            ("59s", None),
            ("h", None),
            ("", None),
            ("24", None),
            ("-1h", None),
            ("1.5h", None),
            ("99999999999999999999w", None),
            ("18446744073709551615w", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<Window>().ok().map(|w| w.duration().as_secs());
            assert_eq!(got, *want, "{text:?}");
        }
    }

    #[test]
    fn windows_print_as_they_were_written() {
        for text in ["24h", "1d", "7d", "30m", "2w", "90m", "14d"] {
            assert_eq!(text.parse::<Window>().unwrap().to_string(), *text);
        }
        assert_eq!(Window::default().to_string(), "24h");
    }
}
