//! Tick planning, decided purely: given a due schedule, the ticks between its due time
//! and now, and whether its previous run is still active, what the tick does (`plan`).
//! `service::schedules::tick` locks the schedule, asks, and writes, in one transaction.

use chrono::{DateTime, Duration, Utc};

use crate::model::{Misfire, Overlap};

/// What the planner needs to know about a schedule being ticked.
#[derive(Debug, Clone)]
pub struct TickInput {
    /// Its ticks up to now, oldest first (empty when only a buffered tick is waiting).
    pub ticks: Vec<DateTime<Utc>>,
    /// When the tick is handled.
    pub now: DateTime<Utc>,
    /// A tick handled this late or less is on time; later ones were missed.
    pub grace: Duration,
    /// What to do about missed ticks.
    pub misfire: Misfire,
    /// What to do while the previous run is active.
    pub overlap: Overlap,
    /// A tick held back by `buffer_one`.
    pub buffered_for: Option<DateTime<Utc>>,
    /// Whether a run of the schedule is still queued or running.
    pub active: bool,
}

/// Ticks missed while no scheduler ran, decided as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// How many.
    pub count: usize,
    /// The first missed tick.
    pub first: DateTime<Utc>,
    /// The last missed tick.
    pub last: DateTime<Utc>,
    /// The tick run as a catch-up (`fire_once`).
    pub catch_up: Option<DateTime<Utc>>,
}

/// One decision about one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a run for this tick (`buffered`: it was held back by `buffer_one`).
    Fire {
        /// The tick.
        tick: DateTime<Utc>,
        /// Whether it was the buffered tick.
        buffered: bool,
    },
    /// Skip it: the previous run is still active (`overlap: skip`).
    Skip(DateTime<Utc>),
    /// Keep it for when the active run ends (`overlap: buffer_one`).
    Buffer(DateTime<Utc>),
}

/// Everything a tick does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickPlan {
    /// Missed ticks, if any.
    pub missed: Option<Missed>,
    /// What happens to each tick, in order.
    pub actions: Vec<Action>,
    /// The tick kept for later, after this one.
    pub buffered_for: Option<DateTime<Utc>>,
}

impl TickPlan {
    /// Runs started.
    pub fn fired(&self) -> i64 {
        self.actions.iter().filter(|a| matches!(a, Action::Fire { .. })).count() as i64
    }

    /// Ticks skipped.
    pub fn skipped(&self) -> i64 {
        self.actions.iter().filter(|a| matches!(a, Action::Skip(_))).count() as i64
    }

    /// Missed ticks not caught up.
    pub fn missed_count(&self) -> i64 {
        self.missed.as_ref().map_or(0, |m| m.count as i64 - i64::from(m.catch_up.is_some()))
    }
}

/// Decides a tick. A buffered tick goes first once the run it waited for has ended;
/// then each due tick fires, unless the previous run is active and `overlap` says
/// otherwise (a run this tick started counts as active for the ticks after it).
pub fn plan(input: &TickInput) -> TickPlan {
    let (late, on_time): (Vec<_>, Vec<_>) = input.ticks.iter().partition(|t| input.now - **t > input.grace);
    let missed = match (late.first(), late.last()) {
        (Some(first), Some(last)) => Some(Missed {
            count: late.len(),
            first: *first,
            last: *last,
            catch_up: (input.misfire == Misfire::FireOnce).then_some(*last),
        }),
        _ => None,
    };
    let mut due: Vec<DateTime<Utc>> = missed.iter().filter_map(|m| m.catch_up).collect();
    due.extend(on_time);

    let mut actions = Vec::new();
    let mut active = input.active;
    let mut buffered_for = input.buffered_for;
    if let Some(tick) = buffered_for.filter(|_| !active) {
        actions.push(Action::Fire { tick, buffered: true });
        active = true;
        buffered_for = None;
    }
    for tick in due {
        if input.overlap != Overlap::Allow && active {
            if input.overlap == Overlap::BufferOne && buffered_for.is_none() {
                buffered_for = Some(tick);
                actions.push(Action::Buffer(tick));
            } else {
                actions.push(Action::Skip(tick));
            }
            continue;
        }
        actions.push(Action::Fire { tick, buffered: false });
        active = true;
    }
    TickPlan { missed, actions, buffered_for }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn input(ticks: &[i64], now: i64) -> TickInput {
        TickInput {
            ticks: ticks.iter().map(|s| at(*s)).collect(),
            now: at(now),
            grace: Duration::seconds(1),
            misfire: Misfire::Skip,
            overlap: Overlap::Allow,
            buffered_for: None,
            active: false,
        }
    }

    #[test]
    fn on_time_ticks_fire_and_missed_ones_follow_misfire() {
        let p = plan(&input(&[10], 10));
        assert_eq!(p.actions, [Action::Fire { tick: at(10), buffered: false }]);
        assert_eq!(p.missed, None);

        let skip = plan(&input(&[1, 2, 3, 10], 10));
        assert_eq!(skip.missed, Some(Missed { count: 3, first: at(1), last: at(3), catch_up: None }));
        assert_eq!(skip.actions, [Action::Fire { tick: at(10), buffered: false }]);
        assert_eq!((skip.fired(), skip.missed_count()), (1, 3));

        let once = plan(&TickInput { misfire: Misfire::FireOnce, ..input(&[1, 2, 3, 10], 10) });
        assert_eq!(
            once.actions,
            [Action::Fire { tick: at(3), buffered: false }, Action::Fire { tick: at(10), buffered: false }]
        );
        assert_eq!((once.fired(), once.missed_count()), (2, 2));
    }

    #[test]
    fn overlap_skips_or_buffers_while_a_run_is_active() {
        let skip = plan(&TickInput { overlap: Overlap::Skip, active: true, ..input(&[9, 10], 10) });
        assert_eq!(skip.actions, [Action::Skip(at(9)), Action::Skip(at(10))]);
        assert_eq!(skip.skipped(), 2);

        let buffer = plan(&TickInput { overlap: Overlap::BufferOne, active: true, ..input(&[9, 10], 10) });
        assert_eq!(buffer.actions, [Action::Buffer(at(9)), Action::Skip(at(10))]);
        assert_eq!(buffer.buffered_for, Some(at(9)));

        // A run this tick starts is active for the ticks after it.
        let own = plan(&TickInput { overlap: Overlap::Skip, ..input(&[9, 10], 10) });
        assert_eq!(own.actions, [Action::Fire { tick: at(9), buffered: false }, Action::Skip(at(10))]);
    }

    #[test]
    fn a_buffered_tick_fires_once_the_active_run_ended() {
        let waiting =
            plan(&TickInput { overlap: Overlap::BufferOne, active: true, buffered_for: Some(at(5)), ..input(&[], 8) });
        assert_eq!(waiting.actions, []);
        assert_eq!(waiting.buffered_for, Some(at(5)));

        let go = plan(&TickInput { overlap: Overlap::BufferOne, buffered_for: Some(at(5)), ..input(&[10], 10) });
        assert_eq!(go.actions, [Action::Fire { tick: at(5), buffered: true }, Action::Buffer(at(10))]);
        assert_eq!(go.buffered_for, Some(at(10)));
    }
}
