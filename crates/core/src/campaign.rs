//! Campaign admission, decided purely: given where a campaign run's children stand,
//! what happens next (`plan`), and how the campaign run ends (`ending`).
//! `repo::campaign_runs::advance` locks the campaign run, counts, asks, and writes.

use crate::model::{ChildCounts, RunStatus};

/// Where a running campaign run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Its children by status (held children count as queued).
    pub counts: ChildCounts,
    /// Queued children not yet admitted.
    pub held: i64,
    /// Most children admitted at once.
    pub max_parallel: i64,
    /// Stop admitting after the first failure.
    pub stop_on_failure: bool,
    /// A user cancelled the campaign run.
    pub cancel_requested: bool,
    /// Its time budget ran out.
    pub timed_out: bool,
}

/// Why a campaign stops early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A user cancelled it.
    Cancelled,
    /// Its time budget ran out.
    TimedOut,
    /// A child failed and the campaign says `stop_on_failure`.
    FirstFailure,
}

impl Stop {
    /// The reason recorded on the children it cancels.
    pub fn reason(self) -> &'static str {
        match self {
            Stop::Cancelled => "campaign_cancelled",
            Stop::TimedOut => "campaign_timed_out",
            Stop::FirstFailure => "stop_on_failure",
        }
    }

    /// The message recorded on the children it cancels.
    pub fn message(self) -> &'static str {
        match self {
            Stop::Cancelled => "the campaign was cancelled",
            Stop::TimedOut => "the campaign ran out of time",
            Stop::FirstFailure => "not started: the campaign stopped at its first failure",
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Cancel every queued child (held or admitted); with `interrupt`, ask the running
    /// ones to stop too (a failure lets them finish).
    Stop {
        /// Why.
        why: Stop,
        /// Whether running children are asked to stop.
        interrupt: bool,
    },
    /// Admit up to this many held children, in item order.
    Admit(i64),
}

/// Decides the next step of a campaign run.
pub fn plan(p: &Progress) -> Plan {
    let stop = if p.cancel_requested {
        Some(Stop::Cancelled)
    } else if p.timed_out {
        Some(Stop::TimedOut)
    } else if p.stop_on_failure && p.counts.failures() > 0 {
        Some(Stop::FirstFailure)
    } else {
        None
    };
    match stop {
        Some(why) => Plan::Stop { why, interrupt: why != Stop::FirstFailure },
        None => {
            let admitted_open = p.counts.open() - p.held;
            Plan::Admit((p.max_parallel - admitted_open).clamp(0, p.held))
        }
    }
}

/// How the campaign run ends, once no child is open (`None` while some are).
pub fn ending(p: &Progress) -> Option<RunStatus> {
    if p.counts.open() > 0 {
        return None;
    }
    // A timeout that stopped nothing (every child had succeeded by then) is no failure.
    Some(if p.cancel_requested {
        RunStatus::Cancelled
    } else if p.counts.succeeded == p.counts.total {
        RunStatus::Succeeded
    } else if p.timed_out {
        RunStatus::TimedOut
    } else {
        RunStatus::Failed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(queued: i64, held: i64, running: i64, succeeded: i64, failed: i64) -> Progress {
        let mut counts = ChildCounts::default();
        counts.add(RunStatus::Queued, queued);
        counts.add(RunStatus::Running, running);
        counts.add(RunStatus::Succeeded, succeeded);
        counts.add(RunStatus::Failed, failed);
        Progress { counts, held, max_parallel: 2, stop_on_failure: false, cancel_requested: false, timed_out: false }
    }

    #[test]
    fn admits_up_to_max_parallel_in_flight() {
        assert_eq!(plan(&progress(5, 5, 0, 0, 0)), Plan::Admit(2));
        assert_eq!(plan(&progress(4, 4, 1, 0, 0)), Plan::Admit(1));
        assert_eq!(plan(&progress(4, 3, 1, 0, 0)), Plan::Admit(0), "one admitted but queued, one running");
        assert_eq!(plan(&progress(1, 1, 0, 4, 0)), Plan::Admit(1));
        assert_eq!(plan(&progress(0, 0, 0, 5, 0)), Plan::Admit(0));
    }

    #[test]
    fn stops_for_cancel_timeout_and_first_failure() {
        let cancelled = Progress { cancel_requested: true, ..progress(3, 3, 2, 0, 0) };
        assert_eq!(plan(&cancelled), Plan::Stop { why: Stop::Cancelled, interrupt: true });
        let late = Progress { timed_out: true, ..progress(3, 3, 2, 0, 0) };
        assert_eq!(plan(&late), Plan::Stop { why: Stop::TimedOut, interrupt: true });
        let failing = Progress { stop_on_failure: true, ..progress(3, 3, 1, 0, 1) };
        assert_eq!(plan(&failing), Plan::Stop { why: Stop::FirstFailure, interrupt: false });
        let tolerant = progress(3, 3, 0, 0, 1);
        assert_eq!(plan(&tolerant), Plan::Admit(2), "without stop_on_failure a failure changes nothing");
    }

    #[test]
    fn ends_only_when_no_child_is_open() {
        assert_eq!(ending(&progress(1, 1, 0, 3, 0)), None);
        assert_eq!(ending(&progress(0, 0, 1, 3, 0)), None);
        assert_eq!(ending(&progress(0, 0, 0, 4, 0)), Some(RunStatus::Succeeded));
        assert_eq!(ending(&progress(0, 0, 0, 3, 1)), Some(RunStatus::Failed));
        let cancelled = Progress { cancel_requested: true, timed_out: true, ..progress(0, 0, 0, 3, 0) };
        assert_eq!(ending(&cancelled), Some(RunStatus::Cancelled), "a cancel wins over a timeout");
        let late = Progress { timed_out: true, ..progress(0, 0, 0, 3, 1) };
        assert_eq!(ending(&late), Some(RunStatus::TimedOut));
        let done_in_time = Progress { timed_out: true, ..progress(0, 0, 0, 4, 0) };
        assert_eq!(ending(&done_in_time), Some(RunStatus::Succeeded), "a timeout that stopped nothing");
    }
}
