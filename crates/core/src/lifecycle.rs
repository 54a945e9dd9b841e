//! The run state machine, written once.
//!
//! `decide` is a pure function: given what a locked run row says (`RunState`) and what
//! someone wants (`Command`), it answers what happens (`Decision`). The repositories
//! carry a decision out with one SQL writer per kind of change (`runs::start`,
//! `runs::requeue`, `runs::end`, `runs::request_cancel`, `runs::set_paused`), always
//! inside the transaction that locked the row, so two deciders never race.
//!
//! SPEC §2: `queued → running → succeeded | failed | errored | timed_out | cancelled`.
//! Terminal states never change; `running` returns to `queued` only through a retry or
//! a recovery, and each return increments `attempt`.

use crate::model::{RunKind, RunStatus};

/// What the lifecycle needs to know about a run (read from its locked row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    /// Its status.
    pub status: RunStatus,
    /// Module, workflow or campaign.
    pub kind: RunKind,
    /// The current attempt.
    pub attempt: i32,
    /// Its attempt budget.
    pub max_attempts: i32,
    /// A workflow paused between steps.
    pub paused: bool,
    /// A cancel was requested while it ran.
    pub cancel_requested: bool,
    /// A campaign child not yet admitted.
    pub held: bool,
}

/// Builds a `RunState` from any row (a `query!` record) that has its columns.
macro_rules! run_state {
    ($row:expr) => {
        $crate::lifecycle::RunState {
            status: $row.status,
            kind: $row.kind,
            attempt: $row.attempt,
            max_attempts: $row.max_attempts,
            paused: $row.paused,
            cancel_requested: $row.cancel_requested,
            held: $row.held,
        }
    };
}
pub(crate) use run_state;

/// How an attempt ended, as its worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The module (every step) passed.
    Passed,
    /// A verdict: a check failed.
    Failed,
    /// An infrastructure error; `retryable` unless retrying cannot help (an unknown
    /// module, say).
    Error {
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// The time budget ran out.
    TimedOut,
    /// Interrupted by a cancel.
    Cancelled,
    /// Its worker is stopping: back to the queue without spending an attempt.
    HandBack,
}

/// Why a run that could never start ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandon {
    /// It waited longer than its queue-wait limit.
    QueueWait,
    /// No device that could ever serve it is left.
    Unservable,
    /// Its stored snapshot or selector cannot be read.
    Unreadable,
}

/// What someone wants done to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A worker wants to start it; `due`: its retry time (if any) has come.
    Claim {
        /// Whether `not_before` has passed.
        due: bool,
    },
    /// The holding worker renews its lease; `holds`: the row names this worker and
    /// attempt (the fencing token).
    Renew {
        /// Whether the caller holds the current attempt.
        holds: bool,
    },
    /// The holding worker reports how the attempt ended.
    Finish {
        /// Whether the caller holds the current attempt.
        holds: bool,
        /// How it ended.
        ending: Ending,
    },
    /// Its lease expired: the worker died, froze or was cut off.
    Recover,
    /// A user (or its campaign) cancels it.
    Cancel,
    /// Pause a workflow between steps.
    Pause,
    /// Resume a paused workflow.
    Resume,
    /// Start a new run of the same snapshot.
    Retry,
    /// End a queued run that can never start.
    Abandon(Abandon),
}

/// What happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `queued → running`, leased to the claimer.
    Start,
    /// Still queued: its retry backoff has not ended.
    NotYet,
    /// The lease is extended; the holder is told what was requested meanwhile.
    Hold {
        /// Stop: the run was cancelled.
        cancel_requested: bool,
        /// Wait before the next step.
        paused: bool,
    },
    /// `running → queued` with `attempt + 1`, the lease cleared, `paused` kept.
    Requeue {
        /// Whether the attempt counts against `max_attempts` (a hand-back does not).
        spend_attempt: bool,
        /// Whether the next attempt waits a backoff (`not_before`).
        backoff: bool,
    },
    /// The terminal status, written once.
    End(RunStatus),
    /// Running: its holder is asked to stop; the run ends when it does.
    RequestCancel,
    /// The workflow's `paused` flag becomes this.
    SetPaused(bool),
    /// A new run of the same snapshot is created (`trigger: retry`).
    NewRun,
    /// Nothing changes.
    Refuse(Refusal),
}

/// Why nothing changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not claimable (someone else has it, it is held, paused, a campaign, or ended):
    /// a duplicate delivery, acked and forgotten.
    NotClaimable,
    /// The caller no longer holds the run (fencing): its write is refused.
    NotHeld,
    /// The run already ended (409 for users).
    Terminal(RunStatus),
    /// The command needs a running run (409).
    NotRunning(RunStatus),
    /// Only workflow runs can be paused (409).
    NotAWorkflow(RunKind),
    /// It already is paused (409).
    AlreadyPaused,
    /// It is not paused (409).
    NotPaused,
    /// A retry needs a finished run (409).
    StillActive(RunStatus),
}

/// Decides what `command` does to a run in `state`.
pub fn decide(state: RunState, command: Command) -> Decision {
    use Decision::*;
    use RunStatus::{Queued, Running};
    let s = state;
    match command {
        Command::Claim { due } => match s.status {
            Queued if s.kind != RunKind::Campaign && !s.held && !s.paused => {
                if due {
                    Start
                } else {
                    NotYet
                }
            }
            _ => Refuse(Refusal::NotClaimable),
        },
        Command::Renew { holds } => {
            if s.status == Running && holds {
                Hold { cancel_requested: s.cancel_requested, paused: s.paused }
            } else {
                Refuse(Refusal::NotHeld)
            }
        }
        Command::Finish { holds, ending } => {
            if s.status == Running && holds {
                finish(s, ending)
            } else {
                Refuse(Refusal::NotHeld)
            }
        }
        Command::Recover => match s.status {
            Running if s.kind != RunKind::Campaign => {
                if s.cancel_requested {
                    End(RunStatus::Cancelled)
                } else if s.attempt < s.max_attempts {
                    Requeue { spend_attempt: true, backoff: false }
                } else {
                    End(RunStatus::Errored)
                }
            }
            other => Refuse(Refusal::NotRunning(other)),
        },
        Command::Cancel => match s.status {
            Queued => End(RunStatus::Cancelled),
            Running => RequestCancel,
            terminal => Refuse(Refusal::Terminal(terminal)),
        },
        Command::Pause => match (s.kind, s.status) {
            (RunKind::Workflow, Running) if s.paused => Refuse(Refusal::AlreadyPaused),
            (RunKind::Workflow, Running) => SetPaused(true),
            (RunKind::Workflow, status) => Refuse(Refusal::NotRunning(status)),
            (kind, _) => Refuse(Refusal::NotAWorkflow(kind)),
        },
        // A paused workflow handed back by a stopping worker waits queued, still
        // paused: it can be resumed there too.
        Command::Resume => match (s.kind, s.status) {
            (RunKind::Workflow, Queued | Running) if s.paused => SetPaused(false),
            (RunKind::Workflow, Queued | Running) => Refuse(Refusal::NotPaused),
            (RunKind::Workflow, status) => Refuse(Refusal::NotRunning(status)),
            (kind, _) => Refuse(Refusal::NotAWorkflow(kind)),
        },
        Command::Retry => {
            if s.status.is_terminal() {
                NewRun
            } else {
                Refuse(Refusal::StillActive(s.status))
            }
        }
        Command::Abandon(_) => match s.status {
            Queued if !s.held => End(RunStatus::Errored),
            Queued => Refuse(Refusal::NotClaimable),
            other => Refuse(Refusal::NotRunning(other)),
        },
    }
}

/// How a held attempt's ending moves the run. A run whose cancel was requested never
/// goes back to the queue: it ends `cancelled` instead of being retried or handed back.
fn finish(s: RunState, ending: Ending) -> Decision {
    use Decision::*;
    match ending {
        Ending::Passed => End(RunStatus::Succeeded),
        Ending::Failed => End(RunStatus::Failed),
        Ending::TimedOut => End(RunStatus::TimedOut),
        Ending::Cancelled => End(RunStatus::Cancelled),
        Ending::Error { .. } | Ending::HandBack if s.cancel_requested => End(RunStatus::Cancelled),
        Ending::Error { retryable: true } if s.attempt < s.max_attempts => {
            Requeue { spend_attempt: true, backoff: true }
        }
        Ending::Error { .. } => End(RunStatus::Errored),
        Ending::HandBack => Requeue { spend_attempt: false, backoff: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;
    use RunStatus::*;

    /// The states a run can be in, as the table's rows.
    fn states() -> Vec<(&'static str, RunState)> {
        let base = RunState {
            status: Queued,
            kind: RunKind::Workflow,
            attempt: 1,
            max_attempts: 3,
            paused: false,
            cancel_requested: false,
            held: false,
        };
        vec![
            ("queued", base),
            ("queued paused", RunState { paused: true, ..base }),
            ("queued held", RunState { held: true, ..base }),
            ("running", RunState { status: Running, ..base }),
            ("running paused", RunState { status: Running, paused: true, ..base }),
            ("running cancel", RunState { status: Running, cancel_requested: true, ..base }),
            ("running last", RunState { status: Running, attempt: 3, ..base }),
            ("succeeded", RunState { status: Succeeded, ..base }),
            ("failed", RunState { status: Failed, ..base }),
            ("errored", RunState { status: Errored, ..base }),
            ("timed_out", RunState { status: TimedOut, ..base }),
            ("cancelled", RunState { status: Cancelled, ..base }),
        ]
    }

    fn commands() -> Vec<(&'static str, Command)> {
        use Command::*;
        vec![
            ("claim", Claim { due: true }),
            ("claim early", Claim { due: false }),
            ("renew", Renew { holds: true }),
            ("renew fenced", Renew { holds: false }),
            ("pass", Finish { holds: true, ending: Ending::Passed }),
            ("fail", Finish { holds: true, ending: Ending::Failed }),
            ("error", Finish { holds: true, ending: Ending::Error { retryable: true } }),
            ("fatal", Finish { holds: true, ending: Ending::Error { retryable: false } }),
            ("timeout", Finish { holds: true, ending: Ending::TimedOut }),
            ("cancelled", Finish { holds: true, ending: Ending::Cancelled }),
            ("hand back", Finish { holds: true, ending: Ending::HandBack }),
            ("late pass", Finish { holds: false, ending: Ending::Passed }),
            ("recover", Recover),
            ("cancel", Cancel),
            ("pause", Pause),
            ("resume", Resume),
            ("retry", Retry),
            ("abandon", Abandon(super::Abandon::QueueWait)),
        ]
    }

    /// Every state × every command, as one table (rows: states; columns: commands).
    #[rustfmt::skip]
    fn expected() -> Vec<Vec<Decision>> {
        const NC: Decision = Refuse(Refusal::NotClaimable);
        const NH: Decision = Refuse(Refusal::NotHeld);
        const RQ: Decision = Requeue { spend_attempt: true, backoff: true };
        const RB: Decision = Requeue { spend_attempt: false, backoff: false };
        const RR: Decision = Requeue { spend_attempt: true, backoff: false };
        let nr = |s| Refuse(Refusal::NotRunning(s));
        let t = |s| Refuse(Refusal::Terminal(s));
        let sa = |s| Refuse(Refusal::StillActive(s));
        let hold = |c, p| Hold { cancel_requested: c, paused: p };
        //   claim  early   renew         fenced pass           fail         error          fatal          timeout        cancelled       hand back       late  recover         cancel          pause                        resume                     retry     abandon
        vec![
            vec![Start, NotYet, NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Queued),     End(Cancelled), nr(Queued),                  Refuse(Refusal::NotPaused), sa(Queued), End(Errored)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Queued),     End(Cancelled), nr(Queued),                  SetPaused(false),          sa(Queued), End(Errored)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Queued),     End(Cancelled), nr(Queued),                  Refuse(Refusal::NotPaused), sa(Queued), NC],
            vec![NC,    NC,     hold(false, false), NH, End(Succeeded), End(Failed), RQ,           End(Errored),  End(TimedOut), End(Cancelled), RB,             NH,   RR,             RequestCancel,  SetPaused(true),             Refuse(Refusal::NotPaused), sa(Running), nr(Running)],
            vec![NC,    NC,     hold(false, true), NH, End(Succeeded), End(Failed), RQ,           End(Errored),  End(TimedOut), End(Cancelled), RB,             NH,   RR,             RequestCancel,  Refuse(Refusal::AlreadyPaused), SetPaused(false),        sa(Running), nr(Running)],
            vec![NC,    NC,     hold(true, false), NH, End(Succeeded), End(Failed), End(Cancelled), End(Cancelled), End(TimedOut), End(Cancelled), End(Cancelled), NH,   End(Cancelled), RequestCancel,  SetPaused(true),             Refuse(Refusal::NotPaused), sa(Running), nr(Running)],
            vec![NC,    NC,     hold(false, false), NH, End(Succeeded), End(Failed), End(Errored),  End(Errored),  End(TimedOut), End(Cancelled), RB,             NH,   End(Errored),   RequestCancel,  SetPaused(true),             Refuse(Refusal::NotPaused), sa(Running), nr(Running)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Succeeded),  t(Succeeded),   nr(Succeeded),               nr(Succeeded),             NewRun,   nr(Succeeded)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Failed),     t(Failed),      nr(Failed),                  nr(Failed),                NewRun,   nr(Failed)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Errored),    t(Errored),     nr(Errored),                 nr(Errored),               NewRun,   nr(Errored)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(TimedOut),   t(TimedOut),    nr(TimedOut),                nr(TimedOut),              NewRun,   nr(TimedOut)],
            vec![NC,    NC,     NH,          NH,    NH,            NH,          NH,            NH,            NH,            NH,             NH,             NH,   nr(Cancelled),  t(Cancelled),   nr(Cancelled),               nr(Cancelled),             NewRun,   nr(Cancelled)],
        ]
    }

    #[test]
    fn every_state_and_command_of_a_workflow_run() {
        let (states, commands, table) = (states(), commands(), expected());
        assert_eq!(table.len(), states.len());
        let mut wrong = Vec::new();
        for ((sname, state), row) in states.iter().zip(&table) {
            assert_eq!(row.len(), commands.len(), "row {sname}");
            for ((cname, command), want) in commands.iter().zip(row) {
                let got = decide(*state, *command);
                if got != *want {
                    wrong.push(format!("{sname} × {cname}: got {got:?}, want {want:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn module_and_campaign_runs_differ_only_where_their_kind_matters() {
        for (name, state) in states() {
            for kind in [RunKind::Module, RunKind::Campaign] {
                let s = RunState { kind, ..state };
                for (cname, command) in commands() {
                    let got = decide(s, command);
                    let workflow = decide(state, command);
                    match command {
                        Command::Pause | Command::Resume => {
                            assert_eq!(got, Refuse(Refusal::NotAWorkflow(kind)), "{kind} {name} × {cname}")
                        }
                        // A campaign run is never claimed and has no lease to recover.
                        Command::Claim { .. } if kind == RunKind::Campaign => {
                            assert_eq!(got, Refuse(Refusal::NotClaimable), "{name} × {cname}")
                        }
                        Command::Recover if kind == RunKind::Campaign => {
                            assert_eq!(got, Refuse(Refusal::NotRunning(s.status)), "{name} × {cname}")
                        }
                        _ => assert_eq!(got, workflow, "{kind} {name} × {cname}"),
                    }
                }
            }
        }
    }
}
