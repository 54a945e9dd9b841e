//! Executes claimed runs: keeps the lease (`lease`), runs the module or the workflow
//! (`workflow`) through the device's driver under the run's timeout, and writes the
//! outcome, fenced by the attempt number. An outcome that Postgres cannot take right
//! now is kept and written again, with backoff, while the lease is still trusted.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use serde_json::Value;
use sqlx::PgPool;
use switchboard_core::{
    CoreError, CoreResult, catalog,
    db::Detached,
    definition::RunDefinition,
    ids::{DeviceId, RunId},
    lifecycle::Ending,
    model::{RunStep, StepStatus},
    repo::{
        captures::{self, NewCapture},
        runs::{self, Claimed, FinishRequest, Finished, Outcome},
    },
    run_error::{ErrorKind, RunError},
    service::Engine,
    telemetry,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    claimer::Claimer,
    drivers::{Capture, Captures, DriverError, Drivers, ModuleCall, Verdict},
    finisher::Finisher,
    lease::{self, Attempt, Interrupt},
};

/// Everything needed to run claimed runs; shared by all of a worker's slots.
pub struct Executor {
    /// Postgres.
    pub pool: PgPool,
    /// Postgres and the queue, for dispatching and moving campaigns on.
    pub engine: Engine,
    /// This worker process's identity (the lease owner).
    pub owner: String,
    /// The drivers this worker has.
    pub drivers: Drivers,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Claims deliveries, several at once when they arrive together.
    pub claimer: Claimer,
    /// Writes outcomes, several at once when they end together.
    pub finisher: Finisher,
    /// Cancelled when the shutdown grace period is over: in-flight runs are handed back.
    pub hand_back: CancellationToken,
    /// Cancelled when the worker stops taking work.
    pub stopping: CancellationToken,
    /// Attempts in flight here: a nudge makes their heartbeat check Postgres at once.
    pub inflight: Mutex<HashMap<RunId, Arc<Attempt>>>,
    /// The largest capture stored (a host agent's captures are capped here again).
    pub capture_max_bytes: usize,
}

impl Executor {
    /// A control message said `run` changed (cancelled): check it now.
    pub fn nudge(&self, run: RunId) {
        if let Some(a) = self.inflight.lock().ok().and_then(|m| m.get(&run).cloned()) {
            a.nudge.notify_one();
        }
    }

    /// Runs a claimed run, then keeps the slot busy with the best queued run its device
    /// can serve (the release hand-off), until there is none or the worker is stopping.
    pub async fn run_chain(self: &Arc<Self>, first: Claimed, claimed_at: Instant) -> CoreResult<()> {
        let mut next = Some((first, claimed_at));
        while let Some((claimed, at)) = next.take() {
            let (device, claimed_id) = (claimed.device.id, claimed.run.id);
            // The outcome's transaction also hands the device over (`runs::finish_many`).
            let handed = self.execute(claimed, at).await?;
            if let Some(c) = &handed {
                self::claimed(claim_span(claimed_id), c);
            }
            next = handed.map(|c| (c, Instant::now()));
            if next.is_none() {
                // Not handed over (stopping, nothing it can serve, or the device row
                // was busy): push the best waiting run it could serve, so it does not
                // wait for a reconcile.
                self.offer(device).await;
            }
        }
        Ok(())
    }

    async fn offer(&self, device: DeviceId) {
        match runs::waiting_for_device(&self.pool, device, 1).await {
            Ok(waiting) => {
                self.engine.dispatch(&waiting).await;
            }
            Err(e) => tracing::warn!(device_id = %device, error = %e, "could not look for runs waiting for a device"),
        }
    }

    /// Executes one claimed run to an outcome and writes it.
    /// Returns the run its device was handed over to, if any (see `runs::finish_many`).
    pub async fn execute(self: &Arc<Self>, claimed: Claimed, claimed_at: Instant) -> CoreResult<Option<Claimed>> {
        let span = tracing::info_span!("run", run_id = %claimed.run.id, device_id = %claimed.device.id,
            target = %claimed.run.target, attempt = claimed.attempt, otel.name = format!("run {}", claimed.run.kind),
            trace_id = tracing::field::Empty);
        // The run's own trace, begun by the request (or schedule tick) that created it.
        telemetry::adopt(&span, claimed.run.traceparent.as_deref());
        self.execute_inner(claimed, claimed_at).instrument(span).await
    }

    async fn execute_inner(self: &Arc<Self>, claimed: Claimed, claimed_at: Instant) -> CoreResult<Option<Claimed>> {
        // The claim committed its `run.started`: the feed may show it now.
        self.engine.queue.feed_changed();
        let attempt = Arc::new(Attempt::new(claimed_at, self.lease_ttl));
        if let Ok(mut m) = self.inflight.lock() {
            m.insert(claimed.run.id, attempt.clone());
        }
        let heartbeat = tokio::spawn(lease::heartbeat(self.clone(), claimed.clone(), attempt.clone()));
        let executed = match &claimed.run.definition {
            RunDefinition::Workflow(w) => crate::workflow::run(self, &claimed, &w.steps, &attempt).await,
            _ => Ok(self.module_run(&claimed, &attempt).await),
        };
        let written = match executed {
            Ok((outcome, steps)) => self.finish(&claimed, &outcome, &steps, &attempt).await,
            Err(e) => Err(e),
        };
        // The heartbeat ran until the outcome was written (or given up): stop it on
        // every path, or it would keep alive the lease of a run nobody executes.
        attempt.done.cancel();
        heartbeat.abort();
        if let Ok(mut m) = self.inflight.lock() {
            m.remove(&claimed.run.id);
        }
        let (finished, next) = written?;
        self.engine.queue.feed_changed();
        self.after(&claimed, &finished).await;
        Ok(next)
    }

    /// Logs the end of an attempt, delivers a requeued run again, and moves a finished
    /// child's campaign on.
    async fn after(&self, claimed: &Claimed, finished: &Finished) {
        match finished {
            Finished::Requeued { not_before } => {
                tracing::info!(not_before = ?not_before, "attempt ended; the run is back in the queue");
                self.deliver_at(claimed.run.id, *not_before, Duration::ZERO);
            }
            Finished::Ended(status) => {
                tracing::info!(status = %status, "run finished");
                if let Some(parent) = claimed.run.parent_run_id
                    && let Err(e) = self.engine.advance_campaign(parent).await
                {
                    tracing::warn!(campaign_run = %parent, error = %e, "could not advance the campaign; the reconciler will");
                }
            }
            Finished::Refused => {}
        }
    }

    /// Pushes a requeued run when its backoff ends (at once for a hand-back), and a run
    /// delivered before its `not_before` (this host's clock ahead of Postgres') again
    /// at that time, never sooner than `floor`. The fast path: the reconciler delivers
    /// it anyway if this process dies first.
    pub(crate) fn deliver_at(&self, run: RunId, at: Option<chrono::DateTime<Utc>>, floor: Duration) {
        let engine = self.engine.clone();
        let wait = at.and_then(|t| (t - Utc::now()).to_std().ok()).unwrap_or_default().max(floor);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            engine.dispatch(&[run]).await;
        });
    }

    /// Writes the outcome. Postgres blinking (a dropped connection, a timeout) does not
    /// lose a verdict: see `persist`.
    async fn finish(
        &self,
        claimed: &Claimed,
        outcome: &Outcome,
        steps: &[RunStep],
        attempt: &Attempt,
    ) -> CoreResult<(Finished, Option<Claimed>)> {
        self.persist(attempt, "the outcome", || self.write(claimed, outcome, steps)).await
    }

    /// Carries out an attempt's database call until it succeeds: a transient error is
    /// tried again with backoff and a slow call is waited for (never cancelled, see
    /// `Detached`), while the lease is still trusted (the heartbeat keeps renewing it
    /// meanwhile). Past the fencing deadline it gives up: the reconciler recovers the
    /// run once its lease expires.
    pub(crate) async fn persist<T: Send + 'static>(
        &self,
        attempt: &Attempt,
        what: &str,
        call: impl Fn() -> Detached<T>,
    ) -> CoreResult<T> {
        let limit = (self.lease_ttl / 2).max(Duration::from_secs(1));
        let mut delay = Duration::from_millis(100);
        let mut slow = None;
        loop {
            let mut pending = slow.take().unwrap_or_else(&call);
            let error = match pending.wait(limit).await {
                Some(Ok(done)) => return Ok(done),
                Some(Err(e)) if !e.is_transient() => return Err(e),
                Some(Err(e)) => e,
                None => {
                    slow = Some(pending);
                    CoreError::Unavailable(format!("writing {what} is taking longer than {limit:?}"))
                }
            };
            if attempt.fenced() {
                tracing::error!(error = %error, "could not write {what} before the lease deadline; the reconciler will recover the run");
                return Err(error);
            }
            tracing::warn!(error = %error, "could not write {what} yet; trying again while the lease holds");
            if slow.is_none() {
                tokio::time::sleep(delay.min(attempt.deadline().saturating_duration_since(Instant::now()))).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// One write of the outcome, in a task of its own.
    fn write(&self, claimed: &Claimed, outcome: &Outcome, steps: &[RunStep]) -> Detached<(Finished, Option<Claimed>)> {
        let finisher = self.finisher.clone();
        let request = FinishRequest {
            claimed: claimed.clone(),
            outcome: outcome.clone(),
            steps: steps.to_vec(),
            // Hand the device over in the same commit, unless this worker is stopping.
            hand_off: (!self.stopping.is_cancelled()).then_some(self.lease_ttl),
        };
        Detached::spawn(async move { finisher.finish(request).await })
    }

    /// One module run: the module under the run's timeout, recorded as step 0.
    async fn module_run(&self, claimed: &Claimed, attempt: &Attempt) -> (Outcome, Vec<RunStep>) {
        let started_at = Utc::now();
        let budget = Duration::from_secs(claimed.run.timeout_s.max(1) as u64);
        let (module_id, params) = match &claimed.run.definition {
            RunDefinition::Module(m) => (m.module.as_str(), &m.params),
            _ => (claimed.run.target.as_str(), &claimed.run.params),
        };
        let module = catalog::find(module_id);
        let result = match module {
            None => Some(Err(DriverError::Unknown(module_id.to_string()))),
            Some(m) => {
                self.call_timed(claimed, m, params, attempt, budget, 0).instrument(step_span(0, module_id)).await
            }
        };
        let timeout = format!("run exceeded its timeout of {} s", claimed.run.timeout_s);
        let touched = module.is_none_or(|m| m.touches_device);
        let (outcome, status) = self.outcome_of(attempt, result, &timeout, touched);
        let step = RunStep {
            index: 0,
            module: module_id.to_string(),
            params: params.clone(),
            status,
            attempt: claimed.attempt,
            started_at: Some(started_at),
            finished_at: Some(Utc::now()),
            result: outcome.result.clone(),
            error: outcome.error.clone(),
        };
        (outcome, vec![step])
    }

    /// Maps a module's result (`None`: it ran out of time) to the attempt's outcome and
    /// the step's status.
    pub(crate) fn outcome_of(
        &self,
        attempt: &Attempt,
        result: Option<Result<Verdict, DriverError>>,
        timeout_msg: &str,
        touched_device: bool,
    ) -> (Outcome, StepStatus) {
        let out = |ending, result, error| Outcome { ending, result, error, touched_device };
        match result {
            None => (
                out(Ending::TimedOut, None, Some(RunError::new(ErrorKind::Timeout, timeout_msg))),
                StepStatus::TimedOut,
            ),
            Some(Ok(Verdict::Passed(r))) => (out(Ending::Passed, Some(r), None), StepStatus::Passed),
            Some(Ok(Verdict::Failed(r))) => (out(Ending::Failed, Some(r), None), StepStatus::Failed),
            Some(Err(e)) => match attempt.reason() {
                Some(Interrupt::Cancelled) => {
                    let error = RunError::new(ErrorKind::Cancelled, "cancelled while running");
                    (out(Ending::Cancelled, None, Some(error)), StepStatus::Cancelled)
                }
                Some(Interrupt::Shutdown) => {
                    let error = RunError::new(ErrorKind::WorkerStopping, "handed back by a stopping worker")
                        .by_worker(&self.owner);
                    (out(Ending::HandBack, None, Some(error)), StepStatus::Cancelled)
                }
                Some(Interrupt::LeaseLost | Interrupt::Fenced) => (lease_lost(), StepStatus::Errored),
                None => {
                    let retryable = e.retryable();
                    (out(Ending::Error { retryable }, None, Some(e.to_run_error())), StepStatus::Errored)
                }
            },
        }
    }

    /// Calls the module under `limit` (`None`: it ran out of time), then stores the
    /// captures it left, as step `step` of this attempt.
    pub(crate) async fn call_timed(
        &self,
        claimed: &Claimed,
        module: &'static catalog::ModuleSpec,
        params: &Value,
        attempt: &Attempt,
        limit: Duration,
        step: usize,
    ) -> Option<Result<Verdict, DriverError>> {
        let captures = Captures::default();
        let deadline = Instant::now() + limit;
        let result = tokio::select! {
            r = self.call(claimed, module, params, attempt.interrupt.clone(), deadline, captures.clone()) => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        self.store_captures(claimed, step, attempt, captures.take()).await;
        result
    }

    /// Stores a step's captures. A capture that cannot be stored is logged; it does not
    /// change the verdict.
    async fn store_captures(&self, claimed: &Claimed, step: usize, attempt: &Attempt, captures: Vec<Capture>) {
        if captures.is_empty() {
            return;
        }
        let rows: Vec<NewCapture> = captures.into_iter().map(|c| bounded(c, self.capture_max_bytes)).collect();
        let (run, try_no) = (claimed.run.id, claimed.attempt);
        let stored = self
            .persist(attempt, "captures", || {
                let (pool, rows) = (self.pool.clone(), rows.clone());
                Detached::spawn(async move { captures::insert(&pool, run, step as i32, try_no, &rows).await })
            })
            .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, step, "could not store the step's captures");
        }
    }

    /// Calls the module: `sleep` everywhere, anything else through the device's driver.
    async fn call(
        &self,
        claimed: &Claimed,
        module: &'static catalog::ModuleSpec,
        params: &Value,
        cancel: CancellationToken,
        deadline: Instant,
        captures: Captures,
    ) -> Result<Verdict, DriverError> {
        if module.id == "sleep" {
            return crate::drivers::sleep(params, cancel).await;
        }
        let Some(driver) = self.drivers.get(claimed.device.driver) else {
            return Err(DriverError::Unavailable(claimed.device.driver.to_string()));
        };
        let span = tracing::info_span!("driver", driver = %claimed.device.driver, module = module.id,
            otel.name = format!("{} {}", claimed.device.driver, module.id), otel.kind = "client");
        driver
            .execute(ModuleCall {
                run_id: claimed.run.id,
                attempt: claimed.attempt,
                device: &claimed.device,
                module,
                params,
                cancel,
                deadline,
                captures,
            })
            .instrument(span)
            .await
    }
}

/// The span of a claim, made before the run (and so its trace) is known: `claimed`
/// gives it its parent. Never entered, so nothing becomes its child before that.
pub(crate) fn claim_span(run: RunId) -> tracing::Span {
    tracing::info_span!("claim", run_id = %run, otel.kind = "consumer", device_id = tracing::field::Empty,
        trace_id = tracing::field::Empty)
}

/// Puts a claim's span into the claimed run's trace, and ends it.
pub(crate) fn claimed(span: tracing::Span, claimed: &Claimed) {
    telemetry::adopt(&span, claimed.run.traceparent.as_deref());
    span.record("device_id", tracing::field::display(claimed.device.id));
}

/// The span of step `index` (module `module`) of a run.
pub(crate) fn step_span(index: usize, module: &str) -> tracing::Span {
    tracing::info_span!("step", step = index, module = %module, otel.name = format!("step {index} {module}"))
}

/// A capture as stored: text, at most `max` bytes (the newest part, from a whole line),
/// served as `text/plain` whatever the driver said, its name without path or control
/// characters.
fn bounded(c: Capture, max: usize) -> NewCapture {
    let mut text = c.text;
    let mut truncated = c.truncated;
    if text.len() > max {
        let mut cut = text.len() - max;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        let tail = &text[cut..];
        let tail = tail.find('\n').map_or(tail, |i| &tail[i + 1..]);
        text = tail.to_string();
        truncated = true;
    }
    let name: String = c.name.chars().filter(|ch| !ch.is_control() && !"/\\\"".contains(*ch)).take(128).collect();
    NewCapture {
        name: if name.is_empty() { "capture.txt".into() } else { name },
        content_type: "text/plain; charset=utf-8".into(),
        data: text.into_bytes(),
        truncated,
    }
}

/// The outcome when this worker no longer holds the run (or can no longer trust that
/// it does): `finish` will refuse it if the run moved on, and record the refusal.
pub(crate) fn lease_lost() -> Outcome {
    Outcome {
        ending: Ending::Error { retryable: true },
        result: None,
        error: Some(RunError::new(ErrorKind::LeaseLost, "this worker no longer holds the run")),
        touched_device: false,
    }
}
