//! Circuit-breaker arithmetic, written once. State lives in Postgres (`devices`); this
//! module only decides: what a finished run says about its device (`effect`), and what
//! the breaker becomes (`next`). `repo::devices::release` carries the decision out.

use chrono::{DateTime, Duration, Utc};

use crate::{lifecycle::Ending, model::BreakerState, run_error::ErrorKind};

/// What a finished run says about its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The module ran (passed or failed verdict): the device works.
    Healthy,
    /// An infrastructure error or timeout.
    Failure,
    /// Cancelled or handed back: says nothing about the device.
    Neutral,
}

/// What a run's ending says about its device. Only runs that touch the device judge
/// it (a `sleep` run says nothing, and never closes a half-open breaker), and a
/// missing driver is the deployment's fault, not the device's.
pub fn effect(ending: Ending, touched_device: bool, error: Option<ErrorKind>) -> Effect {
    if !touched_device {
        return Effect::Neutral;
    }
    match ending {
        Ending::Passed | Ending::Failed => Effect::Healthy,
        Ending::TimedOut => Effect::Failure,
        Ending::Error { .. } => match error {
            Some(ErrorKind::DeviceUnreachable | ErrorKind::DriverError | ErrorKind::Timeout) => Effect::Failure,
            _ => Effect::Neutral,
        },
        Ending::Cancelled | Ending::HandBack => Effect::Neutral,
    }
}

/// A device's breaker columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerRow {
    /// Closed, open or half-open.
    pub state: BreakerState,
    /// Consecutive infrastructure errors.
    pub failures: i32,
    /// Consecutive openings; each one doubles the cooldown.
    pub trips: i32,
    /// While open: when a probe may run.
    pub open_until: Option<DateTime<Utc>>,
}

/// A change of state worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened (or re-opened after a failed probe).
    Opened,
    /// The breaker closed.
    Closed,
}

/// Longest cooldown, however often the breaker re-opens.
pub const MAX_COOLDOWN_S: i64 = 3600;

/// The breaker after a run on the device ends with `effect`.
pub fn next(
    row: BreakerRow,
    effect: Effect,
    threshold: i32,
    cooldown_s: i64,
    now: DateTime<Utc>,
) -> (BreakerRow, Option<Transition>) {
    match effect {
        Effect::Healthy => {
            let transition = (row.state != BreakerState::Closed).then_some(Transition::Closed);
            (BreakerRow { state: BreakerState::Closed, failures: 0, trips: 0, open_until: None }, transition)
        }
        Effect::Failure => {
            let failures = row.failures.saturating_add(1);
            let must_open =
                row.state == BreakerState::HalfOpen || row.state == BreakerState::Open || failures >= threshold.max(1);
            if must_open {
                let trips = row.trips.saturating_add(1);
                let factor = 1i64 << (trips - 1).clamp(0, 20);
                let cooldown = (cooldown_s.max(1).saturating_mul(factor)).min(MAX_COOLDOWN_S.max(cooldown_s));
                let row = BreakerRow {
                    state: BreakerState::Open,
                    failures,
                    trips,
                    open_until: Some(now + Duration::seconds(cooldown)),
                };
                (row, Some(Transition::Opened))
            } else {
                (BreakerRow { failures, ..row }, None)
            }
        }
        Effect::Neutral => {
            if row.state == BreakerState::HalfOpen {
                // The probe said nothing: probe again at once.
                (BreakerRow { state: BreakerState::Open, open_until: Some(now), ..row }, None)
            } else {
                (row, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> BreakerRow {
        BreakerRow { state: BreakerState::Closed, failures: 0, trips: 0, open_until: None }
    }

    #[test]
    fn opens_after_threshold_and_doubles_cooldown() {
        let now = Utc::now();
        let (r, t) = next(closed(), Effect::Failure, 3, 60, now);
        assert_eq!((r.state, r.failures, t), (BreakerState::Closed, 1, None));
        let (r, _) = next(r, Effect::Failure, 3, 60, now);
        let (r, t) = next(r, Effect::Failure, 3, 60, now);
        assert_eq!((r.state, t), (BreakerState::Open, Some(Transition::Opened)));
        assert_eq!(r.open_until, Some(now + Duration::seconds(60)));
        // The probe fails: open again, twice as long.
        let probe = BreakerRow { state: BreakerState::HalfOpen, ..r };
        let (r, t) = next(probe, Effect::Failure, 3, 60, now);
        assert_eq!((r.state, t, r.trips), (BreakerState::Open, Some(Transition::Opened), 2));
        assert_eq!(r.open_until, Some(now + Duration::seconds(120)));
        // The probe passes: closed, counters reset.
        let (r, t) = next(BreakerRow { state: BreakerState::HalfOpen, ..r }, Effect::Healthy, 3, 60, now);
        assert_eq!((r, t), (closed(), Some(Transition::Closed)));
    }

    #[test]
    fn verdicts_reset_and_neutral_keeps() {
        let now = Utc::now();
        let (r, _) = next(closed(), Effect::Failure, 3, 60, now);
        let (r2, t) = next(r, Effect::Neutral, 3, 60, now);
        assert_eq!((r2, t), (r, None));
        let (r3, t) = next(r, Effect::Healthy, 3, 60, now);
        assert_eq!((r3, t), (closed(), None));
    }

    #[test]
    fn only_runs_that_touch_the_device_judge_it() {
        use ErrorKind::*;
        let error = |kind| (Ending::Error { retryable: true }, Some(kind));
        let table = [
            ((Ending::Passed, None), Effect::Healthy),
            ((Ending::Failed, None), Effect::Healthy),
            ((Ending::TimedOut, Some(Timeout)), Effect::Failure),
            (error(DeviceUnreachable), Effect::Failure),
            (error(DriverError), Effect::Failure),
            (error(DriverUnavailable), Effect::Neutral),
            (error(Unsupported), Effect::Neutral),
            (error(Interrupted), Effect::Neutral),
            ((Ending::Cancelled, Some(Cancelled)), Effect::Neutral),
            ((Ending::HandBack, Some(WorkerStopping)), Effect::Neutral),
        ];
        for ((ending, kind), want) in table {
            assert_eq!(effect(ending, true, kind), want, "{ending:?} {kind:?}");
            assert_eq!(effect(ending, false, kind), Effect::Neutral, "untouched {ending:?} {kind:?}");
        }
    }

    #[test]
    fn cooldown_is_capped() {
        let now = Utc::now();
        let row = BreakerRow { state: BreakerState::HalfOpen, failures: 50, trips: 40, open_until: None };
        let (r, _) = next(row, Effect::Failure, 3, 60, now);
        assert_eq!(r.open_until, Some(now + Duration::seconds(MAX_COOLDOWN_S)));
    }
}
