//! A workflow attempt: its steps in order on the one claimed device, each recorded as
//! it goes. A retry resumes at the first step that did not pass (steps that failed
//! with `continue_on_failure` stay done). Pauses are honoured between steps; time
//! spent paused does not count against the run's timeout.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use switchboard_core::{
    CoreResult, catalog,
    db::Detached,
    definition::{FailedStep, WorkflowStep, WorkflowSummary},
    lifecycle::Ending,
    model::{RunStep, StepStatus},
    repo::runs::{self, Claimed, Outcome, Renewal},
    run_error::{ErrorKind, RunError},
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    executor::{Executor, lease_lost, step_span},
    lease::{Attempt, Interrupt},
};

/// What the workflow does between two steps.
enum Between {
    /// Go on with the next step.
    Go,
    /// Stop: the attempt ends here with this outcome and these step records.
    Stop(Outcome, Vec<RunStep>),
}

fn skipped(steps: &[WorkflowStep], from: usize) -> Vec<RunStep> {
    steps
        .iter()
        .enumerate()
        .skip(from)
        .map(|(i, s)| RunStep {
            index: i as i32,
            module: s.module.clone(),
            params: s.params.clone(),
            status: StepStatus::Skipped,
            attempt: 0,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
        })
        .collect()
}

fn summary(
    steps: &[WorkflowStep],
    statuses: &[(usize, StepStatus)],
    failed_step: Option<FailedStep>,
) -> serde_json::Value {
    let s = WorkflowSummary {
        steps: steps.len(),
        passed: statuses.iter().filter(|(_, s)| *s == StepStatus::Passed).count(),
        tolerated_failures: statuses.iter().filter(|(_, s)| *s == StepStatus::Failed).map(|(i, _)| *i).collect(),
        failed_step,
    };
    serde_json::json!(s)
}

/// Runs the steps of a claimed workflow run; returns the attempt's outcome and the
/// step records to write with it.
pub async fn run(
    exec: &Arc<Executor>,
    claimed: &Claimed,
    steps: &[WorkflowStep],
    attempt: &Attempt,
) -> CoreResult<(Outcome, Vec<RunStep>)> {
    let previous = exec.persist(attempt, "the run's steps", || read_steps(exec, claimed)).await?;
    let done = |i: usize| {
        previous.iter().any(|p| {
            p.index == i as i32
                && (p.status == StepStatus::Passed || (p.status == StepStatus::Failed && steps[i].continue_on_failure))
        })
    };
    let first = (0..steps.len()).find(|i| !done(*i)).unwrap_or(steps.len());
    let mut statuses: Vec<(usize, StepStatus)> =
        previous.iter().filter(|p| (p.index as usize) < first).map(|p| (p.index as usize, p.status)).collect();
    let mut deadline = Instant::now() + Duration::from_secs(claimed.run.timeout_s.max(1) as u64);
    let touches = claimed.touches_device();
    let passed = |statuses: &[(usize, StepStatus)]| Outcome {
        ending: Ending::Passed,
        result: Some(summary(steps, statuses, None)),
        error: None,
        touched_device: touches,
    };

    for (i, step) in steps.iter().enumerate().skip(first) {
        let paused_at = Instant::now();
        if let Between::Stop(outcome, records) = between_steps(exec, claimed, steps, i, attempt).await? {
            return Ok((outcome, records));
        }
        deadline += paused_at.elapsed();
        let step_attempt = previous.iter().find(|p| p.index == i as i32).map_or(0, |p| p.attempt) + 1;
        let (outcome, record) = match run_step(exec, claimed, i, step, step_attempt, deadline, attempt).await? {
            Some(done) => done,
            None => return Ok((lease_lost(), vec![])),
        };
        statuses.push((i, record.status));
        match outcome.ending {
            Ending::Passed => {}
            Ending::Failed if step.continue_on_failure => {}
            Ending::Failed => {
                let failed = FailedStep {
                    index: i,
                    module: step.module.clone(),
                    result: outcome.result.clone().unwrap_or(serde_json::Value::Null),
                };
                let outcome = Outcome { result: Some(summary(steps, &statuses, Some(failed))), ..outcome };
                return Ok((outcome, [vec![record], skipped(steps, i + 1)].concat()));
            }
            Ending::Error { retryable } => {
                // Retried from this step, not from the start.
                let error = outcome.error.clone().map(|e| e.at_step(i));
                let mut records = vec![record];
                if !retryable || claimed.attempt >= claimed.run.max_attempts {
                    records.extend(skipped(steps, i + 1));
                }
                return Ok((Outcome { error, ..outcome }, records));
            }
            Ending::HandBack => {
                let record = RunStep { status: StepStatus::Pending, ..record };
                return Ok((outcome, vec![record]));
            }
            Ending::TimedOut | Ending::Cancelled => {
                return Ok((outcome, [vec![record], skipped(steps, i + 1)].concat()));
            }
        }
        if !save_step(exec, claimed, &record, attempt).await? {
            return Ok((lease_lost(), vec![]));
        }
    }
    Ok((passed(&statuses), vec![]))
}

/// The steps earlier attempts recorded, in a task of its own.
fn read_steps(exec: &Executor, claimed: &Claimed) -> Detached<Vec<RunStep>> {
    let (pool, run) = (exec.pool.clone(), claimed.run.id);
    Detached::spawn(async move { runs::steps(&mut *pool.acquire().await?, run).await })
}

/// Records a step while this worker holds the run (`false`: it no longer does),
/// through Postgres blinking (`Executor::persist`).
async fn save_step(exec: &Executor, claimed: &Claimed, step: &RunStep, attempt: &Attempt) -> CoreResult<bool> {
    exec.persist(attempt, "a step", || {
        let (pool, owner, claimed, step) = (exec.pool.clone(), exec.owner.clone(), claimed.clone(), step.clone());
        Detached::spawn(async move { runs::record_step(&pool, &claimed, &owner, &step).await })
    })
    .await
    .inspect(|_| exec.engine.queue.feed_changed())
}

/// Before step `i`: honours a cancel and a pause (waiting while paused), checking the
/// run in Postgres, and gives up when the lease can no longer be trusted.
async fn between_steps(
    exec: &Executor,
    claimed: &Claimed,
    steps: &[WorkflowStep],
    i: usize,
    attempt: &Attempt,
) -> CoreResult<Between> {
    let mut slow: Option<Detached<Renewal>> = None;
    loop {
        if attempt.interrupt.is_cancelled() {
            return Ok(interrupted(exec, steps, i, attempt));
        }
        let mut check = slow.take().unwrap_or_else(|| {
            let (pool, owner, ttl) = (exec.pool.clone(), exec.owner.clone(), exec.lease_ttl);
            let (run, number) = (claimed.run.id, claimed.attempt);
            Detached::spawn(async move { runs::renew(&pool, run, number, &owner, ttl).await })
        });
        // Postgres blinking makes us wait (the fencing deadline ends the attempt if it
        // lasts); a slow check is waited for again, never cancelled.
        let renewal = match check.wait(exec.lease_ttl / 3).await {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not check the run between steps; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            None => {
                tracing::warn!("checking the run between steps is slow; still waiting");
                slow = Some(check);
                continue;
            }
        };
        match renewal {
            Renewal::Lost => return Ok(Between::Stop(lease_lost(), vec![])),
            Renewal::Held { cancel_requested: true, .. } => {
                let error = RunError::new(ErrorKind::Cancelled, format!("cancelled before step {i}"));
                let outcome =
                    Outcome { ending: Ending::Cancelled, result: None, error: Some(error), touched_device: false };
                return Ok(Between::Stop(outcome, skipped(steps, i)));
            }
            Renewal::Held { paused: true, .. } => {
                // A paused run cannot finish within a grace period: a stopping worker
                // hands it back (still paused) at once.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = exec.stopping.cancelled() => {
                        let error = RunError::new(ErrorKind::WorkerStopping, "handed back while paused").by_worker(&exec.owner);
                        let outcome = Outcome { ending: Ending::HandBack, result: None, error: Some(error), touched_device: false };
                        return Ok(Between::Stop(outcome, vec![]));
                    }
                }
            }
            Renewal::Held { .. } => return Ok(Between::Go),
        }
    }
}

/// The attempt was interrupted before step `i`: a cancel ends it `cancelled` (the steps
/// left skipped), a stopping worker hands it back, a lost lease writes nothing.
fn interrupted(exec: &Executor, steps: &[WorkflowStep], i: usize, attempt: &Attempt) -> Between {
    match attempt.reason() {
        Some(Interrupt::Cancelled) => {
            let error = RunError::new(ErrorKind::Cancelled, format!("cancelled before step {i}"));
            let outcome =
                Outcome { ending: Ending::Cancelled, result: None, error: Some(error), touched_device: false };
            Between::Stop(outcome, skipped(steps, i))
        }
        Some(Interrupt::Shutdown) => {
            let error = RunError::new(ErrorKind::WorkerStopping, "handed back between steps").by_worker(&exec.owner);
            let outcome = Outcome { ending: Ending::HandBack, result: None, error: Some(error), touched_device: false };
            Between::Stop(outcome, vec![])
        }
        _ => Between::Stop(lease_lost(), vec![]),
    }
}

/// Runs step `i` under the shorter of its own budget and what is left of the run's;
/// `None` when the run is no longer ours.
async fn run_step(
    exec: &Executor,
    claimed: &Claimed,
    i: usize,
    step: &WorkflowStep,
    step_attempt: i32,
    deadline: Instant,
    attempt: &Attempt,
) -> CoreResult<Option<(Outcome, RunStep)>> {
    let mut record = RunStep {
        index: i as i32,
        module: step.module.clone(),
        params: step.params.clone(),
        status: StepStatus::Running,
        attempt: step_attempt,
        started_at: Some(Utc::now()),
        finished_at: None,
        result: None,
        error: None,
    };
    if !save_step(exec, claimed, &record, attempt).await? {
        return Ok(None);
    }
    let Some(module) = catalog::find(&step.module) else {
        let error =
            RunError::new(ErrorKind::DriverError, format!("module {:?} is not in this worker's catalog", step.module));
        let outcome = Outcome {
            ending: Ending::Error { retryable: false },
            result: None,
            error: Some(error.clone()),
            touched_device: false,
        };
        record.status = StepStatus::Errored;
        record.error = Some(error);
        return Ok(Some((outcome, record)));
    };
    let step_budget = Duration::from_secs(step.effective_timeout_s().max(1) as u64);
    let run_left = deadline.saturating_duration_since(Instant::now());
    let (limit, msg) = if step_budget <= run_left {
        (step_budget, format!("step {i} ({}) exceeded its timeout of {} s", step.module, step.effective_timeout_s()))
    } else {
        (run_left, format!("run exceeded its timeout of {} s during step {i}", claimed.run.timeout_s))
    };
    let result =
        exec.call_timed(claimed, module, &step.params, attempt, limit, i).instrument(step_span(i, &step.module)).await;
    let (outcome, status) = exec.outcome_of(attempt, result, &msg, module.touches_device);
    record.status = status;
    record.finished_at = Some(Utc::now());
    record.result = outcome.result.clone();
    record.error = outcome.error.clone();
    Ok(Some((outcome, record)))
}
