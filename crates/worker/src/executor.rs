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
    model::StepStatus,
    queue::Queue,
    repo::runs::{self, BreakerPolicy, Claimed, Finished, Outcome, Renewal},
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
            if self.stopping.is_cancelled() {
                break;
            }
            next = runs::claim_for_device(&self.pool, device_id, &self.owner, self.lease_ttl).await?;
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
        let started_at = Utc::now();
        let cancel = CancellationToken::new();
        let reason: Arc<Mutex<Option<Interrupt>>> = Arc::default();
        let nudge = Arc::new(tokio::sync::Notify::new());
        self.inflight.lock().expect("inflight lock").insert(claimed.run.id, nudge.clone());
        let heartbeat = tokio::spawn(self.clone().heartbeat(claimed.clone(), cancel.clone(), reason.clone(), nudge));

        let timeout = Duration::from_secs(claimed.run.timeout_s.max(1) as u64);
        let module = catalog::find(&claimed.run.target);
        let result = match module {
            None => Some(Err(DriverError::Driver(format!("module {:?} is not in this worker's catalog", claimed.run.target)))),
            Some(module) => {
                let work = self.run_module(&claimed, module, cancel.clone());
                tokio::select! {
                    r = work => Some(r),
                    _ = tokio::time::sleep(timeout) => None,
                }
            }
        };
        cancel.cancel();
        heartbeat.abort();
        self.inflight.lock().expect("inflight lock").remove(&claimed.run.id);
        let interrupt = *reason.lock().expect("interrupt lock");

        let (outcome, step_status) = match result {
            None => (
                Outcome::TimedOut { error: json!({"kind": "timeout", "message": format!("run exceeded its timeout of {} s", claimed.run.timeout_s)}) },
                StepStatus::TimedOut,
            ),
            Some(Ok(Verdict::Passed(r))) => (Outcome::Passed { result: r }, StepStatus::Passed),
            Some(Ok(Verdict::Failed(r))) => (Outcome::Failed { result: r }, StepStatus::Failed),
            Some(Err(e)) => match interrupt {
                Some(Interrupt::Cancelled) => (
                    Outcome::Cancelled { error: json!({"kind": "cancelled", "message": "cancelled while running"}) },
                    StepStatus::Cancelled,
                ),
                Some(Interrupt::Shutdown) => (
                    Outcome::HandBack { error: json!({"kind": "worker_stopping", "message": "handed back by a stopping worker", "worker": self.owner}) },
                    StepStatus::Cancelled,
                ),
                _ => {
                    let retry_at = (claimed.attempt < claimed.run.max_attempts).then(|| {
                        let delay = retry::delay_after(claimed.attempt, self.retry_base, self.retry_max);
                        Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default()
                    });
                    (Outcome::Error { error: error_json(&e), retry_at }, StepStatus::Errored)
                }
            },
        };
        let (step_result, step_error) = match &outcome {
            Outcome::Passed { result } | Outcome::Failed { result } => (Some(result.clone()), None),
            Outcome::Error { error, .. } | Outcome::TimedOut { error } | Outcome::Cancelled { error } | Outcome::HandBack { error } => {
                (None, Some(error.clone()))
            }
        };
        let step = runs::module_step(&claimed, step_status, started_at, step_result, step_error);
        let finished = runs::finish(&self.pool, &claimed, &self.owner, &outcome, &[step], self.breaker).await?;
        match (&finished, &outcome) {
            (Finished::Written(status), Outcome::Error { retry_at: Some(at), .. }) => {
                tracing::info!(status = %status, retry_at = %at, "attempt failed; retry scheduled");
                self.push_at(claimed.run.id, *at);
            }
            (Finished::Written(status), Outcome::HandBack { .. }) => {
                tracing::info!(status = %status, "run handed back");
                let _ = self.queue.push(claimed.run.id).await;
            }
            (Finished::Written(status), _) => tracing::info!(status = %status, "run finished"),
            (Finished::Refused, _) => {}
        }
        Ok(finished)
    }

    async fn run_module(
        &self,
        claimed: &Claimed,
        module: &'static catalog::ModuleSpec,
        cancel: CancellationToken,
    ) -> Result<Verdict, DriverError> {
        if module.id == "sleep" {
            return sleep_module(&claimed.run.params, cancel).await;
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
                params: &claimed.run.params,
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
                Ok(Renewal::Held { cancel_requested: true, .. }) => interrupt(Interrupt::Cancelled),
                Ok(Renewal::Held { .. }) => {}
                Ok(Renewal::Lost) => {
                    tracing::warn!(run_id = %claimed.run.id, "lease lost; abandoning the run");
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
