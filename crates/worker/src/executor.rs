//! Executes one claimed run: heartbeats its lease, runs the module through its driver
//! under the run's timeout, and writes the outcome (fenced by the attempt number).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_core::{
    CoreResult, catalog,
    model::{RunKind, RunStatus, RunStep, StepStatus},
    queue::Queue,
    repo::{
        campaigns,
        runs::{self, BreakerPolicy, Claimed, Finished, Outcome, Renewal},
        workflows::WorkflowStep,
    },
    retry,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::drivers::{DriverError, Drivers, ModuleCall, Verdict};

/// Why a running module was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    Cancelled,
    LeaseLost,
    Shutdown,
}

/// Everything needed to run claimed runs; shared by all of a worker's slots.
pub struct Executor {
    pub pool: PgPool,
    pub queue: Queue,
    pub owner: String,
    pub drivers: Drivers,
    pub lease_ttl: Duration,
    pub breaker: BreakerPolicy,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Cancelled when the shutdown grace period is over: in-flight runs are handed back.
    pub hand_back: CancellationToken,
    /// Cancelled when the worker stops taking work.
    pub stopping: CancellationToken,
    /// Runs in flight here: a nudge makes their heartbeat check Postgres at once.
    pub inflight: Mutex<HashMap<uuid::Uuid, Arc<tokio::sync::Notify>>>,
}

impl Executor {
    /// A control message said `run_id` changed (cancelled): check it now.
    pub fn nudge(&self, run_id: uuid::Uuid) {
        if let Some(n) = self.inflight.lock().expect("inflight lock").get(&run_id) {
            n.notify_one();
        }
    }

    /// Runs a claimed run, then keeps the slot busy with the best queued run its device
    /// can serve (the release hand-off), until there is none or the worker is stopping.
    pub async fn run_chain(self: &Arc<Self>, first: Claimed) -> CoreResult<()> {
        let mut next = Some(first);
        while let Some(claimed) = next.take() {
            let device_id = claimed.device.id;
            self.execute(claimed).await?;
            if !self.stopping.is_cancelled() {
                next = runs::claim_for_device(&self.pool, device_id, &self.owner, self.lease_ttl).await?;
            }
            if next.is_none() {
                // Not handed over here (stopping, or the device row was busy): push the
                // best waiting run it could serve, so it does not wait for a reconcile.
                let waiting = runs::waiting_for_device(&self.pool, device_id, 1).await?;
                if !waiting.is_empty() && self.queue.push_many(&waiting).await.is_ok() {
                    runs::mark_dispatched(&self.pool, &waiting).await?;
                }
            }
        }
        Ok(())
    }

    /// Executes one claimed run to an outcome and writes it.
    pub async fn execute(self: &Arc<Self>, claimed: Claimed) -> CoreResult<Finished> {
        let span = tracing::info_span!("run", run_id = %claimed.run.id, device_id = %claimed.device.id,
            module = %claimed.run.target, attempt = claimed.attempt);
        self.execute_inner(claimed).instrument(span).await
    }

    async fn execute_inner(self: &Arc<Self>, claimed: Claimed) -> CoreResult<Finished> {
        let cancel = CancellationToken::new();
        let reason: Arc<Mutex<Option<Interrupt>>> = Arc::default();
        let nudge = Arc::new(tokio::sync::Notify::new());
        self.inflight.lock().expect("inflight lock").insert(claimed.run.id, nudge.clone());
        let heartbeat = tokio::spawn(self.clone().heartbeat(claimed.clone(), cancel.clone(), reason.clone(), nudge));
        let attempt = Attempt { claimed: &claimed, cancel: cancel.clone(), reason: reason.clone() };

        let executed = match claimed.run.kind {
            RunKind::Workflow => self.execute_workflow(&attempt).await,
            _ => Ok(self.execute_module_run(&attempt).await),
        };
        // Stop the heartbeat before anything else, errors included: a heartbeat left
        // running would keep the lease alive on a run nobody executes.
        cancel.cancel();
        heartbeat.abort();
        self.inflight.lock().expect("inflight lock").remove(&claimed.run.id);
        let (outcome, steps) = executed?;

        let finished = runs::finish(&self.pool, &claimed, &self.owner, &outcome, &steps, self.breaker).await?;
        match (&finished, &outcome) {
            (Finished::Written(status @ RunStatus::Queued), Outcome::Error { retry_at: Some(at), .. }) => {
                tracing::info!(status = %status, retry_at = %at, "attempt failed; retry scheduled");
                self.push_at(claimed.run.id, *at);
            }
            (Finished::Written(status @ RunStatus::Queued), Outcome::HandBack { .. }) => {
                tracing::info!(status = %status, "run handed back");
                let _ = self.queue.push(claimed.run.id).await;
            }
            (Finished::Written(status), _) => tracing::info!(status = %status, "run finished"),
            (Finished::Refused, _) => {}
        }
        if let (Finished::Written(status), Some(parent)) = (&finished, claimed.run.parent_run_id)
            && status.is_terminal()
        {
            self.advance_campaign(parent).await;
        }
        Ok(finished)
    }

    /// A child finished: let its campaign admit the next children (or finish).
    async fn advance_campaign(&self, parent: uuid::Uuid) {
        match campaigns::advance(&self.pool, parent).await {
            Ok(a) => {
                if !a.admit.is_empty() && self.queue.push_many(&a.admit).await.is_err() {
                    tracing::warn!(campaign_run = %parent, "could not push admitted children; the reconciler will");
                }
                for id in a.signal {
                    self.queue.signal_cancel(id).await;
                }
            }
            Err(e) => tracing::warn!(campaign_run = %parent, error = %e, "could not advance the campaign; the reconciler will"),
        }
    }

    /// One module run: the module under the run's timeout, recorded as step 0.
    async fn execute_module_run(&self, a: &Attempt<'_>) -> (Outcome, Vec<RunStep>) {
        let claimed = a.claimed;
        let started_at = Utc::now();
        let timeout = Duration::from_secs(claimed.run.timeout_s.max(1) as u64);
        let result = match catalog::find(&claimed.run.target) {
            None => Some(Err(DriverError::Driver(format!("module {:?} is not in this worker's catalog", claimed.run.target)))),
            Some(module) => {
                let work = self.run_module(claimed, module, &claimed.run.params, a.cancel.clone());
                tokio::select! {
                    r = work => Some(r),
                    _ = tokio::time::sleep(timeout) => None,
                }
            }
        };
        let timeout_msg = format!("run exceeded its timeout of {} s", claimed.run.timeout_s);
        let (outcome, step_status) = self.outcome_of(a, result, &timeout_msg, |r| r);
        let (step_result, step_error) = outcome_parts(&outcome);
        (outcome, vec![runs::module_step(claimed, step_status, started_at, step_result, step_error)])
    }

    /// Maps a module's result to the run's outcome and the step's status. `wrap` turns
    /// a verdict's result into the run's result.
    fn outcome_of(
        &self,
        a: &Attempt<'_>,
        result: Option<Result<Verdict, DriverError>>,
        timeout_msg: &str,
        wrap: impl Fn(Value) -> Value,
    ) -> (Outcome, StepStatus) {
        let interrupt = *a.reason.lock().expect("interrupt lock");
        match result {
            None => (Outcome::TimedOut { error: json!({"kind": "timeout", "message": timeout_msg}) }, StepStatus::TimedOut),
            Some(Ok(Verdict::Passed(r))) => (Outcome::Passed { result: wrap(r) }, StepStatus::Passed),
            Some(Ok(Verdict::Failed(r))) => (Outcome::Failed { result: wrap(r) }, StepStatus::Failed),
            Some(Err(e)) => match interrupt {
                Some(Interrupt::Cancelled) => (
                    Outcome::Cancelled { error: json!({"kind": "cancelled", "message": "cancelled while running"}) },
                    StepStatus::Cancelled,
                ),
                Some(Interrupt::Shutdown) => (
                    Outcome::HandBack { error: json!({"kind": "worker_stopping", "message": "handed back by a stopping worker", "worker": self.owner}) },
                    StepStatus::Cancelled,
                ),
                _ => (Outcome::Error { error: error_json(&e), retry_at: self.retry_at(a.claimed) }, StepStatus::Errored),
            },
        }
    }

    fn retry_at(&self, claimed: &Claimed) -> Option<chrono::DateTime<Utc>> {
        (claimed.attempt < claimed.run.max_attempts).then(|| {
            let delay = retry::delay_after(claimed.attempt, self.retry_base, self.retry_max);
            Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default()
        })
    }

    /// A workflow: its steps in order on the one claimed device, each recorded as it
    /// goes. A retry resumes at the first step that did not pass (steps that failed
    /// with `continue_on_failure` stay done). Pauses are honoured between steps; time
    /// spent paused does not count against the run's timeout.
    async fn execute_workflow(&self, a: &Attempt<'_>) -> CoreResult<(Outcome, Vec<RunStep>)> {
        let claimed = a.claimed;
        let steps: Vec<WorkflowStep> = serde_json::from_value(claimed.run.definition["steps"].clone()).unwrap_or_default();
        let previous = runs::steps(&self.pool, claimed.run.id).await?;
        let done = |i: usize| {
            previous.iter().any(|p| {
                p.index == i as i32
                    && (p.status == StepStatus::Passed || (p.status == StepStatus::Failed && steps[i].continue_on_failure))
            })
        };
        let first = (0..steps.len()).find(|i| !done(*i)).unwrap_or(steps.len());
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(claimed.run.timeout_s.max(1) as u64);
        let summary = |statuses: &[(usize, StepStatus)]| {
            let passed = statuses.iter().filter(|(_, s)| *s == StepStatus::Passed).count();
            let tolerated: Vec<usize> = statuses.iter().filter(|(_, s)| *s == StepStatus::Failed).map(|(i, _)| *i).collect();
            json!({"steps": steps.len(), "passed": passed, "tolerated_failures": tolerated})
        };
        let mut statuses: Vec<(usize, StepStatus)> = previous
            .iter()
            .filter(|p| (p.index as usize) < first)
            .map(|p| (p.index as usize, p.status))
            .collect();

        for (i, step) in steps.iter().enumerate().skip(first) {
            // Between steps: honour pause and cancel.
            let paused_at = tokio::time::Instant::now();
            loop {
                let renewal = match runs::renew(&self.pool, claimed.run.id, claimed.attempt, &self.owner, self.lease_ttl).await {
                    Ok(r) => r,
                    // Postgres blinked: wait (the heartbeat self-fences if it lasts).
                    Err(e) if !a.cancel.is_cancelled() => {
                        tracing::warn!(run_id = %claimed.run.id, error = %e, "could not check the run between steps; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(_) => return Ok(lease_lost()),
                };
                match renewal {
                    Renewal::Lost => {
                        return Ok(lease_lost());
                    }
                    Renewal::Held { cancel_requested: true, .. } => {
                        let error = json!({"kind": "cancelled", "message": format!("cancelled before step {i}")});
                        return Ok((Outcome::Cancelled { error }, runs::skipped_steps(claimed, i)));
                    }
                    Renewal::Held { paused: true, .. } => {
                        // A paused run cannot finish within a grace period: a stopping
                        // worker hands it back (still paused) at once.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                            _ = self.stopping.cancelled() => {
                                let error = json!({"kind": "worker_stopping", "message": "handed back while paused", "worker": self.owner});
                                return Ok((Outcome::HandBack { error }, vec![]));
                            }
                        }
                    }
                    Renewal::Held { .. } => break,
                }
            }
            deadline += paused_at.elapsed();
            let Some(module) = catalog::find(&step.module) else {
                let error = json!({"kind": "driver_error", "message": format!("module {:?} is not in this worker's catalog", step.module)});
                return Ok((Outcome::Error { error, retry_at: None }, runs::skipped_steps(claimed, i + 1)));
            };
            let step_attempt = previous.iter().find(|p| p.index == i as i32).map(|p| p.attempt).unwrap_or(0) + 1;
            let started_at = Utc::now();
            let mut record = RunStep {
                index: i as i32,
                module: step.module.clone(),
                params: step.params.clone(),
                status: StepStatus::Running,
                attempt: step_attempt,
                started_at: Some(started_at),
                finished_at: None,
                result: None,
                error: None,
            };
            if !runs::record_step(&self.pool, claimed, &self.owner, &record).await? {
                return Ok(lease_lost());
            }
            let step_budget = Duration::from_secs(step.effective_timeout_s().max(1) as u64);
            let run_left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (limit, which) = if step_budget <= run_left { (step_budget, "step") } else { (run_left, "run") };
            let work = self.run_module(claimed, module, &step.params, a.cancel.clone());
            let result = tokio::select! {
                r = work => Some(r),
                _ = tokio::time::sleep(limit) => None,
            };
            let timeout_msg = if which == "step" {
                format!("step {i} ({}) exceeded its timeout of {} s", step.module, step.effective_timeout_s())
            } else {
                format!("run exceeded its timeout of {} s during step {i}", claimed.run.timeout_s)
            };
            let (outcome, step_status) = self.outcome_of(a, result, &timeout_msg, |r| r);
            let (result, error) = outcome_parts(&outcome);
            record.status = step_status;
            record.finished_at = Some(Utc::now());
            record.result = result;
            record.error = error;
            statuses.push((i, step_status));
            let last = i + 1 == steps.len();
            match outcome {
                Outcome::Passed { .. } => {
                    if !runs::record_step(&self.pool, claimed, &self.owner, &record).await? {
                        return Ok(lease_lost());
                    }
                    if last {
                        return Ok((Outcome::Passed { result: summary(&statuses) }, vec![]));
                    }
                }
                Outcome::Failed { .. } if step.continue_on_failure => {
                    if !runs::record_step(&self.pool, claimed, &self.owner, &record).await? {
                        return Ok(lease_lost());
                    }
                    if last {
                        return Ok((Outcome::Passed { result: summary(&statuses) }, vec![]));
                    }
                }
                Outcome::Failed { result } => {
                    let mut steps_out = vec![record];
                    steps_out.extend(runs::skipped_steps(claimed, i + 1));
                    let mut r = summary(&statuses);
                    r["failed_step"] = json!({"index": i, "module": step.module, "result": result});
                    return Ok((Outcome::Failed { result: r }, steps_out));
                }
                Outcome::Error { mut error, retry_at } => {
                    // Retried from this step, not from the start.
                    error["step"] = json!(i);
                    let mut steps_out = vec![record];
                    if retry_at.is_none() {
                        steps_out.extend(runs::skipped_steps(claimed, i + 1));
                    }
                    return Ok((Outcome::Error { error, retry_at }, steps_out));
                }
                Outcome::HandBack { error } => {
                    record.status = StepStatus::Pending;
                    return Ok((Outcome::HandBack { error }, vec![record]));
                }
                other @ (Outcome::TimedOut { .. } | Outcome::Cancelled { .. }) => {
                    let mut steps_out = vec![record];
                    steps_out.extend(runs::skipped_steps(claimed, i + 1));
                    return Ok((other, steps_out));
                }
            }
        }
        Ok((Outcome::Passed { result: summary(&statuses) }, vec![]))
    }

    async fn run_module(
        &self,
        claimed: &Claimed,
        module: &'static catalog::ModuleSpec,
        params: &Value,
        cancel: CancellationToken,
    ) -> Result<Verdict, DriverError> {
        if module.id == "sleep" {
            return sleep_module(params, cancel).await;
        }
        let Some(driver) = self.drivers.get(claimed.device.driver) else {
            return Err(DriverError::Unavailable(claimed.device.driver.to_string()));
        };
        driver
            .execute(ModuleCall {
                run_id: claimed.run.id,
                attempt: claimed.attempt,
                device: &claimed.device,
                module,
                params,
                cancel,
            })
            .await
    }

    /// Renews the leases every third of the TTL; interrupts the module when the run is
    /// cancelled, the lease is lost, or the grace period of a stopping worker is over.
    async fn heartbeat(
        self: Arc<Self>,
        claimed: Claimed,
        cancel: CancellationToken,
        reason: Arc<Mutex<Option<Interrupt>>>,
        nudge: Arc<tokio::sync::Notify>,
    ) {
        let every = (self.lease_ttl / 3).max(Duration::from_millis(200));
        // Self-fencing: past this long without a successful renewal the reconciler may
        // soon give the run to another worker, so stop driving the device first.
        let give_up = self.lease_ttl.mul_f64(0.8);
        let mut last_renewed = tokio::time::Instant::now();
        let interrupt = |why: Interrupt| {
            let mut r = reason.lock().expect("interrupt lock");
            r.get_or_insert(why);
            cancel.cancel();
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.hand_back.cancelled() => { interrupt(Interrupt::Shutdown); return; }
                _ = tokio::time::sleep(every) => {}
                _ = nudge.notified() => {}
            }
            match runs::renew(&self.pool, claimed.run.id, claimed.attempt, &self.owner, self.lease_ttl).await {
                Ok(Renewal::Held { cancel_requested, .. }) => {
                    last_renewed = tokio::time::Instant::now();
                    if cancel_requested {
                        interrupt(Interrupt::Cancelled);
                    }
                }
                Ok(Renewal::Lost) => {
                    tracing::warn!(run_id = %claimed.run.id, "lease lost; abandoning the run");
                    interrupt(Interrupt::LeaseLost);
                    return;
                }
                Err(e) if last_renewed.elapsed() >= give_up => {
                    tracing::error!(run_id = %claimed.run.id, error = %e, "lease could not be renewed in time; abandoning the run");
                    interrupt(Interrupt::LeaseLost);
                    return;
                }
                Err(e) => tracing::warn!(run_id = %claimed.run.id, error = %e, "lease renewal failed; will retry"),
            }
        }
    }

    /// Pushes the run when its backoff ends (fast path; the reconciler is the durable one).
    fn push_at(&self, run_id: uuid::Uuid, at: chrono::DateTime<Utc>) {
        let queue = self.queue.clone();
        let pool = self.pool.clone();
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if queue.push(run_id).await.is_ok() {
                let _ = runs::mark_dispatched(&pool, &[run_id]).await;
            }
        });
    }
}

/// The state of one attempt that the pieces of execution share.
struct Attempt<'a> {
    claimed: &'a Claimed,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<Interrupt>>>,
}

/// The outcome when this worker finds it no longer holds the run: `finish` will refuse
/// it (and record the refusal); nothing else is written.
fn lease_lost() -> (Outcome, Vec<RunStep>) {
    let error = json!({"kind": "lease_lost", "message": "this worker no longer holds the run"});
    (Outcome::Error { error, retry_at: None }, vec![])
}

fn outcome_parts(outcome: &Outcome) -> (Option<Value>, Option<Value>) {
    match outcome {
        Outcome::Passed { result } | Outcome::Failed { result } => (Some(result.clone()), None),
        Outcome::Error { error, .. } | Outcome::TimedOut { error } | Outcome::Cancelled { error } | Outcome::HandBack { error } => {
            (None, Some(error.clone()))
        }
    }
}

fn error_json(e: &DriverError) -> Value {
    json!({"kind": e.kind(), "message": e.to_string()})
}

/// `sleep`: waits `ms`, then reports the scripted outcome. Touches no device.
async fn sleep_module(params: &Value, cancel: CancellationToken) -> Result<Verdict, DriverError> {
    let ms = params["ms"].as_u64().unwrap_or(0);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = cancel.cancelled() => return Err(DriverError::Interrupted),
    }
    let outcome = params["outcome"].as_str().unwrap_or("passed");
    match outcome {
        "failed" => Ok(Verdict::Failed(json!({"slept_ms": ms, "outcome": "failed", "reason": "scripted failure"}))),
        "error" => Err(DriverError::Driver("sleep: scripted infrastructure error".into())),
        _ => Ok(Verdict::Passed(json!({"slept_ms": ms, "outcome": "passed"}))),
    }
}
