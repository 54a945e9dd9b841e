//! Cron expressions, evaluated in a schedule's IANA time zone, written once.
//!
//! Accepted forms:
//! - the standard five fields `min hour day-of-month month day-of-week` (`0 2 * * 1-5`),
//!   day of week 0-7 with Sunday 0 or 7, or names `SUN`..`SAT`;
//! - six fields, the same with a seconds field first (`*/10 * * * * *`);
//! - `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly` (`@annually`).
//!
//! The `cron` crate wants seconds first and numbers Sunday 1..Saturday 7; this module
//! translates the day-of-week field by expanding it to an explicit list.
//!
//! Daylight saving: the expression is matched against local wall-clock time, then each
//! local time becomes an instant. A local time skipped by a spring-forward gap fires at
//! the end of the gap (so a daily 02:30 still fires that day, at 03:00); a local time
//! repeated by a fall-back overlap fires once, at its first occurrence. No tick ever
//! fires twice and no day is skipped.

use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct CronExpr {
    source: String,
    /// One schedule, or two when both day fields are restricted: standard cron fires
    /// when EITHER matches (`0 0 1 * MON` = the 1st and every Monday), while the
    /// crate requires both.
    schedules: Vec<cron::Schedule>,
}

impl CronExpr {
    /// Parses five fields, six with seconds first, or a macro; the error says what is
    /// wrong (`minute 61 is out of range`).
    pub fn parse(expr: &str) -> Result<CronExpr, String> {
        let trimmed = expr.trim();
        if trimmed.is_empty() {
            return Err("must not be empty".into());
        }
        let sixes: Vec<String> = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => vec!["0 0 0 1 1 *".to_string()],
            "@monthly" => vec!["0 0 0 1 * *".to_string()],
            "@weekly" => vec!["0 0 0 * * 1".to_string()], // Sunday, in the crate's numbering
            "@daily" | "@midnight" => vec!["0 0 0 * * *".to_string()],
            "@hourly" => vec!["0 0 * * * *".to_string()],
            s if s.starts_with('@') => {
                return Err(format!(
                    "unknown macro {trimmed:?} (expected @hourly, @daily, @weekly, @monthly or @yearly)"
                ));
            }
            _ => {
                let fields: Vec<&str> = trimmed.split_whitespace().collect();
                let (sec, rest) = match fields.len() {
                    5 => ("0", &fields[..]),
                    6 => (fields[0], &fields[1..]),
                    n => {
                        return Err(format!(
                            "expected 5 fields (min hour day month weekday) or 6 with seconds first, got {n}"
                        ));
                    }
                };
                check_range("second", sec, 0, 59)?;
                check_range("minute", rest[0], 0, 59)?;
                check_range("hour", rest[1], 0, 23)?;
                check_range("day of month", rest[2], 1, 31)?;
                let dow = translate_dow(rest[4])?;
                let restricted = |f: &str| f != "*" && f != "?";
                if restricted(rest[2]) && restricted(rest[4]) {
                    vec![
                        format!("{sec} {} {} {} {} *", rest[0], rest[1], rest[2], rest[3]),
                        format!("{sec} {} {} * {} {dow}", rest[0], rest[1], rest[3]),
                    ]
                } else {
                    vec![format!("{sec} {} {} {} {} {dow}", rest[0], rest[1], rest[2], rest[3])]
                }
            }
        };
        let mut schedules = Vec::with_capacity(sixes.len());
        for six in &sixes {
            schedules.push(cron::Schedule::from_str(six).map_err(|e| format!("invalid cron expression: {e}"))?);
        }
        // An expression that can never match (31 February) is an error too.
        if schedules.iter().all(|s| s.after(&Utc::now()).next().is_none()) {
            return Err("never matches any date".into());
        }
        Ok(CronExpr { source: trimmed.to_string(), schedules })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first fire instant strictly after `after`, in zone `tz`.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedules.iter().filter_map(|s| next_of(s, tz, after)).min()
    }

    /// Every fire instant in `(after, until]`, at most `limit` of them.
    pub fn between(&self, tz: Tz, after: DateTime<Utc>, until: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < limit {
            match self.next_after(tz, cursor) {
                Some(t) if t <= until => {
                    out.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        out
    }
}

fn next_of(schedule: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Local wall-clock time, matched as if it were UTC (the crate only sees naive time).
    let local_after = after.with_timezone(&tz).naive_local();
    // Inside the second occurrence of a fall-back overlap, local times of the first
    // occurrence map to instants before `after`: the strict check skips them, so a
    // repeated local time never fires twice.
    let start = Utc.from_utc_datetime(&local_after);
    for naive in schedule.after(&start).take(100_000) {
        let instant = local_to_instant(tz, naive.naive_utc());
        if instant > after {
            return Some(instant);
        }
    }
    None
}

/// A local wall-clock time as an instant: the earliest if repeated (fall-back), the
/// end of the gap if skipped (spring-forward).
fn local_to_instant(tz: Tz, naive: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earliest, _) => earliest.with_timezone(&Utc),
        LocalResult::None => {
            // Walk forward minute by minute to the first local time that exists: the
            // instant the clocks jumped to.
            let mut probe = naive.with_second(0).and_then(|p| p.with_nanosecond(0)).unwrap_or(naive);
            for _ in 0..(24 * 60) {
                probe += Duration::minutes(1);
                if let LocalResult::Single(t) | LocalResult::Ambiguous(t, _) = tz.from_local_datetime(&probe) {
                    return t.with_timezone(&Utc);
                }
            }
            Utc.from_utc_datetime(&naive)
        }
    }
}

/// Parses a time zone name (IANA), with a precise error.
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| {
        format!("unknown time zone {name:?} (expected an IANA name such as UTC, Europe/Paris or America/New_York)")
    })
}

/// Checks numbers in a simple field (lists, ranges, steps of numbers) against bounds,
/// so `61 * * * *` names the minute field. Anything else is left to the crate.
fn check_range(name: &str, field: &str, min: u32, max: u32) -> Result<(), String> {
    for part in field.split(',') {
        let base = part.split('/').next().unwrap_or(part);
        if base == "*" || base == "?" {
            continue;
        }
        for bound in base.split('-') {
            if let Ok(n) = bound.parse::<u32>()
                && (n < min || n > max)
            {
                return Err(format!("{name} {n} is out of range {min}-{max}"));
            }
        }
    }
    Ok(())
}

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn dow_number(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return if n <= 7 { Ok(n % 7) } else { Err(format!("day of week {n} is out of range 0-7")) };
    }
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|p| p as u32)
        .ok_or_else(|| format!("day of week {s:?} is not a number 0-7 or a name SUN-SAT"))
}

/// Crontab day of week (Sunday 0 or 7) -> the cron crate's (Sunday 1 .. Saturday 7),
/// as an explicit list.
fn translate_dow(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let mut days = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("day of week step {s:?} is not a number"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err("day of week step must be at least 1".into());
        }
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let lo = dow_number(a)?;
            // `5-7` means Friday to Sunday: 7 stays 7 as a range end.
            let hi = if b.trim() == "7" { 7 } else { dow_number(b)? };
            if hi < lo {
                return Err(format!("day of week range {range:?} goes backwards"));
            }
            (lo, hi)
        } else {
            let d = dow_number(range)?;
            (d, if part.contains('/') { 6 } else { d })
        };
        let mut d = lo;
        while d <= hi {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    let list: Vec<String> = (0..7).filter(|d| days[*d]).map(|d| (d + 1).to_string()).collect();
    Ok(list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, NaiveDate, Weekday};

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// Fire times of a daily 02:30 schedule over three days around `day`.
    fn daily_0230(tz: &str, from: &str) -> Vec<DateTime<Utc>> {
        let c = CronExpr::parse("30 2 * * *").unwrap();
        let tz = parse_tz(tz).unwrap();
        c.between(tz, utc(from), utc(from) + Duration::days(3), 10)
    }

    #[test]
    fn weekdays_at_two_means_monday_to_friday() {
        let c = CronExpr::parse("0 2 * * 1-5").unwrap();
        let ticks = c.between(Tz::UTC, utc("2026-11-22T00:00:00Z"), utc("2026-11-29T23:59:59Z"), 20);
        let days: Vec<Weekday> = ticks.iter().map(|t| t.weekday()).collect();
        assert_eq!(days, [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri]);
        assert!(ticks.iter().all(|t| t.hour() == 2 && t.minute() == 0));
    }

    #[test]
    fn sunday_is_zero_or_seven_and_names_work() {
        for expr in ["0 9 * * 0", "0 9 * * 7", "0 9 * * SUN", "0 9 * * sun"] {
            let c = CronExpr::parse(expr).unwrap();
            let t = c.next_after(Tz::UTC, utc("2026-11-23T00:00:00Z")).unwrap();
            assert_eq!(t.weekday(), Weekday::Sun, "{expr}");
        }
        let c = CronExpr::parse("0 9 * * 5-7").unwrap();
        let days: Vec<Weekday> = c
            .between(Tz::UTC, utc("2026-11-23T00:00:00Z"), utc("2026-11-30T00:00:00Z"), 10)
            .iter()
            .map(|t| t.weekday())
            .collect();
        assert_eq!(days, [Weekday::Fri, Weekday::Sat, Weekday::Sun]);
        let c = CronExpr::parse("0 9 * * */2").unwrap();
        let days: Vec<Weekday> = c
            .between(Tz::UTC, utc("2026-11-22T00:00:00Z"), utc("2026-11-29T00:00:00Z"), 10)
            .iter()
            .map(|t| t.weekday())
            .collect();
        assert_eq!(days, [Weekday::Sun, Weekday::Tue, Weekday::Thu, Weekday::Sat]);
    }

    #[test]
    fn day_of_month_or_day_of_week_like_standard_cron() {
        // The 1st of the month and every Monday (standard cron ORs the two day fields).
        let c = CronExpr::parse("0 0 1 * 1").unwrap();
        let t = c.between(Tz::UTC, utc("2026-11-28T00:00:00Z"), utc("2026-12-10T00:00:00Z"), 10);
        assert_eq!(t, [utc("2026-11-30T00:00:00Z"), utc("2026-12-01T00:00:00Z"), utc("2026-12-07T00:00:00Z")]);
    }

    #[test]
    fn six_fields_and_macros() {
        let c = CronExpr::parse("*/10 * * * * *").unwrap();
        assert_eq!(c.next_after(Tz::UTC, utc("2026-11-22T10:00:01Z")).unwrap(), utc("2026-11-22T10:00:10Z"));
        let c = CronExpr::parse("@hourly").unwrap();
        assert_eq!(c.next_after(Tz::UTC, utc("2026-11-22T10:20:00Z")).unwrap(), utc("2026-11-22T11:00:00Z"));
        let c = CronExpr::parse("@daily").unwrap();
        assert_eq!(c.next_after(Tz::UTC, utc("2026-11-22T10:20:00Z")).unwrap(), utc("2026-11-23T00:00:00Z"));
        let c = CronExpr::parse("@weekly").unwrap();
        assert_eq!(c.next_after(Tz::UTC, utc("2026-11-23T10:20:00Z")).unwrap(), utc("2026-11-29T00:00:00Z"));
        let c = CronExpr::parse("@monthly").unwrap();
        assert_eq!(c.next_after(Tz::UTC, utc("2026-11-22T10:20:00Z")).unwrap(), utc("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        assert_eq!(CronExpr::parse("61 * * * *").unwrap_err(), "minute 61 is out of range 0-59");
        assert!(CronExpr::parse("not cron").unwrap_err().starts_with("expected 5 fields"));
        assert!(CronExpr::parse("* * * * * * * *").is_err());
        assert!(CronExpr::parse("@fortnightly").unwrap_err().starts_with("unknown macro"));
        assert!(CronExpr::parse("0 0 * * 9").unwrap_err().contains("day of week 9"));
        assert!(CronExpr::parse("0 0 30 2 *").is_err(), "30 February never happens");
        assert!(parse_tz("Mars/Olympus").unwrap_err().contains("unknown time zone"));
    }

    #[test]
    fn paris_spring_forward_fires_once_that_day_at_the_end_of_the_gap() {
        // 2026-03-29: 02:00 CET -> 03:00 CEST; 02:30 does not exist.
        let t = daily_0230("Europe/Paris", "2026-03-27T12:00:00Z");
        assert_eq!(t, [utc("2026-03-28T01:30:00Z"), utc("2026-03-29T01:00:00Z"), utc("2026-03-30T00:30:00Z")]);
    }

    #[test]
    fn paris_fall_back_fires_once_at_the_first_occurrence() {
        // 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 happens twice.
        let t = daily_0230("Europe/Paris", "2026-10-23T12:00:00Z");
        assert_eq!(t, [utc("2026-10-24T00:30:00Z"), utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]);
        // Asked from inside the second occurrence, it does not fire again that day.
        let c = CronExpr::parse("30 2 * * *").unwrap();
        let tz = parse_tz("Europe/Paris").unwrap();
        assert_eq!(c.next_after(tz, utc("2026-10-25T01:15:00Z")).unwrap(), utc("2026-10-26T01:30:00Z"));
    }

    #[test]
    fn new_york_spring_forward_and_fall_back() {
        // 2026-03-08: 02:00 EST -> 03:00 EDT.
        let t = daily_0230("America/New_York", "2026-03-06T12:00:00Z");
        assert_eq!(t, [utc("2026-03-07T07:30:00Z"), utc("2026-03-08T07:00:00Z"), utc("2026-03-09T06:30:00Z")]);
        // 2026-11-01: 02:00 EDT -> 01:00 EST; 02:30 happens once, 01:30 twice.
        let t = daily_0230("America/New_York", "2026-10-30T12:00:00Z");
        assert_eq!(t, [utc("2026-10-31T06:30:00Z"), utc("2026-11-01T07:30:00Z"), utc("2026-11-02T07:30:00Z")]);
        let c = CronExpr::parse("30 1 * * *").unwrap();
        let tz = parse_tz("America/New_York").unwrap();
        let t = c.between(tz, utc("2026-10-31T12:00:00Z"), utc("2026-11-02T12:00:00Z"), 10);
        assert_eq!(t, [utc("2026-11-01T05:30:00Z"), utc("2026-11-02T06:30:00Z")]);
    }

    #[test]
    fn every_minute_through_a_gap_never_goes_backwards() {
        let c = CronExpr::parse("* * * * *").unwrap();
        let tz = parse_tz("Europe/Paris").unwrap();
        let t = c.between(tz, utc("2026-03-29T00:58:00Z"), utc("2026-03-29T01:03:00Z"), 10);
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(t.first().unwrap(), &utc("2026-03-29T00:59:00Z"));
        assert_eq!(t[1], utc("2026-03-29T01:00:00Z"), "02:00-02:59 local collapse into 03:00 CEST");
        let _ = NaiveDate::from_ymd_opt(2026, 3, 29);
    }
}
