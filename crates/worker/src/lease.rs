//! Keeping a claimed run's lease, and knowing when it can no longer be trusted.
//!
//! Fencing is a deadline, not a check after a renewal returns: a renewal that hangs
//! (Postgres behind a silent partition) returns nothing to check. Every renewal that
//! succeeds moves the deadline to `sent + ttl × FENCE_FRACTION`, measured from when it
//! was sent, so it is always earlier than the `lease_expires_at` Postgres wrote
//! (`now() + ttl`, later than our send). When the deadline passes the module is
//! interrupted, whatever the renewal in flight is doing; the reconciler recovers the
//! run only after `lease_expires_at`, so two holders never drive the device at once.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use switchboard_core::{
    db::Detached,
    repo::runs::{self, Claimed, Renewal},
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;

/// Part of the TTL a worker may drive a device after its last successful renewal.
pub const FENCE_FRACTION: f64 = 0.8;

/// Why a running module was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// A user cancelled the run.
    Cancelled,
    /// Postgres says another holder has it (recovered, finished, cancelled).
    LeaseLost,
    /// No renewal succeeded in time: the lease may be about to expire.
    Fenced,
    /// The worker is stopping and the grace period is over.
    Shutdown,
}

/// One attempt in flight: its interruption, its fencing deadline, and its heartbeat's
/// stop.
pub struct Attempt {
    /// Cancelled to interrupt the module (passed to the driver).
    pub interrupt: CancellationToken,
    reason: Mutex<Option<Interrupt>>,
    deadline: Mutex<Instant>,
    /// Cancelled to stop the heartbeat (once the outcome is written, or given up).
    pub done: CancellationToken,
    /// Notified to renew now (a cancel signal arrived).
    pub nudge: Notify,
}

impl Attempt {
    /// A new attempt whose lease was requested at `claimed_at`.
    pub fn new(claimed_at: Instant, ttl: Duration) -> Attempt {
        Attempt {
            interrupt: CancellationToken::new(),
            reason: Mutex::new(None),
            deadline: Mutex::new(claimed_at + ttl.mul_f64(FENCE_FRACTION)),
            done: CancellationToken::new(),
            nudge: Notify::new(),
        }
    }

    /// Interrupts the module, recording the first reason.
    pub fn stop(&self, why: Interrupt) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(why);
        }
        self.interrupt.cancel();
    }

    /// Why the module was interrupted, if it was.
    pub fn reason(&self) -> Option<Interrupt> {
        self.reason.lock().ok().and_then(|r| *r)
    }

    /// When the lease stops being trusted.
    pub fn deadline(&self) -> Instant {
        self.deadline.lock().map_or_else(|_| Instant::now(), |d| *d)
    }

    /// Whether the fencing deadline has passed.
    pub fn fenced(&self) -> bool {
        Instant::now() >= self.deadline()
    }

    fn extend(&self, sent: Instant, ttl: Duration) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = (*d).max(sent + ttl.mul_f64(FENCE_FRACTION));
        }
    }
}

/// Renews the run's lease every third of the TTL until the attempt is done: each
/// renewal bounded by a timeout, the module interrupted at the fencing deadline, on a
/// cancel, on a lost lease, or when a stopping worker's grace period is over.
pub async fn heartbeat(exec: Arc<Executor>, claimed: Claimed, attempt: Arc<Attempt>) {
    let ttl = exec.lease_ttl;
    let every = (ttl / 3).max(Duration::from_millis(200));
    let mut pending = None;
    loop {
        let deadline = attempt.deadline();
        tokio::select! {
            _ = attempt.done.cancelled() => return,
            _ = exec.hand_back.cancelled(), if !attempt.interrupt.is_cancelled() => attempt.stop(Interrupt::Shutdown),
            _ = tokio::time::sleep_until(deadline) => {
                if attempt.fenced() {
                    fence(&claimed, &attempt, ttl);
                    return;
                }
            }
            _ = tokio::time::sleep(every) => renew(&exec, &claimed, &attempt, &mut pending, every).await,
            _ = attempt.nudge.notified() => renew(&exec, &claimed, &attempt, &mut pending, every).await,
        }
    }
}

fn fence(claimed: &Claimed, attempt: &Attempt, ttl: Duration) {
    tracing::error!(run_id = %claimed.run.id, attempt = claimed.attempt, ttl_s = ttl.as_secs_f64(),
        "fencing deadline reached: no lease renewal succeeded in time; interrupting the module before the lease can expire");
    attempt.stop(Interrupt::Fenced);
}

/// A renewal in flight, and when it was sent.
type Pending = Option<(Instant, Detached<Renewal>)>;

/// One renewal, waited for at most `limit` and never past the fencing deadline. One
/// renewal is in flight at a time: a slow one is waited for again at the next beat,
/// not cancelled (see `Detached`) nor doubled.
async fn renew(exec: &Executor, claimed: &Claimed, attempt: &Attempt, pending: &mut Pending, limit: Duration) {
    let (sent, mut call) = pending.take().unwrap_or_else(|| {
        let (pool, owner, ttl) = (exec.pool.clone(), exec.owner.clone(), exec.lease_ttl);
        let (run, number) = (claimed.run.id, claimed.attempt);
        (Instant::now(), Detached::spawn(async move { runs::renew(&pool, run, number, &owner, ttl).await }))
    });
    let outcome = tokio::select! {
        r = call.wait(limit) => r,
        _ = tokio::time::sleep_until(attempt.deadline()) => None,
    };
    let Some(outcome) = outcome else {
        tracing::warn!(run_id = %claimed.run.id, "lease renewal is slow; still waiting for it");
        *pending = Some((sent, call));
        return;
    };
    match outcome {
        Ok(Renewal::Held { cancel_requested, .. }) => {
            attempt.extend(sent, exec.lease_ttl);
            if cancel_requested {
                attempt.stop(Interrupt::Cancelled);
            }
        }
        Ok(Renewal::Lost) => {
            tracing::warn!(run_id = %claimed.run.id, "lease lost; abandoning the run");
            attempt.stop(Interrupt::LeaseLost);
        }
        Err(e) => tracing::warn!(run_id = %claimed.run.id, error = %e, "lease renewal failed; will retry"),
    }
}
