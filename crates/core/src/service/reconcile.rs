//! The reconciler's pass: recover runs whose worker died, end runs that waited past
//! their queue-wait limit, move campaigns on (admissions a dead process left undone,
//! timeouts), re-deliver what Redis lost, and prune dead processes. Every step is safe
//! with several schedulers running.

use std::time::Duration;

use crate::{
    CoreResult, meters,
    repo::{campaign_runs, processes, retention, rollup, runs},
    service::Engine,
};

/// The reconciler's settings.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    /// A queued run not delivered for this long is pushed again.
    pub redispatch_after: Duration,
    /// The queue-wait limit of runs that set none.
    pub max_queue_wait: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reconciled {
    /// Runs recovered from expired leases (requeued or ended).
    pub recovered: usize,
    /// Runs ended for waiting past their queue-wait limit.
    pub overdue: usize,
    /// Runs pushed to the queue.
    pub pushed: usize,
    /// Dead processes forgotten.
    pub pruned: u64,
}

impl Engine {
    /// One reconcile pass.
    pub async fn reconcile(&self, settings: ReconcileSettings) -> CoreResult<Reconciled> {
        let (mut push, ended) = runs::recover_expired(&self.pool, 500).await?;
        let recovered = push.len() + ended.len();
        meters::leases_expired(recovered);
        meters::recovered("requeued", push.len());
        meters::recovered("ended", ended.len());
        if recovered > 0 {
            tracing::warn!(
                requeued = push.len(),
                ended = ended.len(),
                "recovered runs whose worker stopped renewing its lease"
            );
        }
        let overdue = runs::abandon_overdue(&self.pool, settings.max_queue_wait, 500).await?;
        if !overdue.is_empty() {
            tracing::warn!(count = overdue.len(), "ended runs that waited past their queue-wait limit");
        }
        let lost = runs::due_for_dispatch(&self.pool, settings.redispatch_after, 1000).await?;
        meters::recovered("redelivered", lost.len());
        push.extend(lost);
        // Campaigns whose advancing process died between a child's end and the next
        // admission are moved on here, and so are campaigns past their time budget.
        for parent in campaign_runs::running(&self.pool, 1000).await? {
            match campaign_runs::advance(&self.pool, parent).await {
                Ok(a) => {
                    push.extend(a.admit);
                    self.signal(&a.signal).await;
                }
                // One campaign's trouble must not stop the others from moving on.
                Err(e) => tracing::warn!(campaign_run = %parent, error = %e, "could not advance a campaign"),
            }
        }
        push.sort();
        push.dedup();
        for chunk in push.chunks(200) {
            self.dispatch(chunk).await;
        }
        let pruned = processes::prune(&self.pool).await?;
        Ok(Reconciled { recovered, overdue: overdue.len(), pushed: push.len(), pruned })
    }
}

/// Runs per retention batch: each is one short statement.
const PRUNE_BATCH: i64 = 500;

impl Engine {
    /// Prunes what ended more than `keep` ago (`repo::retention`), batch by batch,
    /// until a batch comes back short or `max_batches` ran (the next pass goes on).
    /// Batches pause a moment between them, so pruning a long backlog shares
    /// Postgres with the queue instead of taking it.
    pub async fn prune_history(&self, keep: Duration, max_batches: usize) -> CoreResult<retention::Pruned> {
        let mut total = retention::Pruned::default();
        for _ in 0..max_batches {
            let p = retention::prune_runs(&self.pool, keep, PRUNE_BATCH).await?;
            total += p;
            meters::history_pruned(p);
            if p.runs < PRUNE_BATCH {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The rollup of the pruned days and weeks goes with them: a span whose every
        // run is gone. The day and week the cutoff falls in keep their rows, counting
        // runs already pruned; a window reaching past retention reads them
        // (docs/dashboard.md).
        retention::prune_step_days(&self.pool, keep).await?;
        for _ in 0..max_batches {
            let n = retention::prune_events(&self.pool, keep, PRUNE_BATCH * 10).await?;
            total.events += n;
            meters::history_pruned(retention::Pruned { events: n, ..Default::default() });
            if n < PRUNE_BATCH * 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(total)
    }

    /// Rolls up the days of step outcomes that can no longer change
    /// (`repo::rollup`), one short transaction each, at most `max_days`; returns how
    /// many it rolled. Days pause a moment between them, as retention batches do.
    pub async fn roll_up_history(&self, max_days: usize) -> CoreResult<usize> {
        for n in 0..max_days {
            if rollup::roll_next_day(&self.pool).await?.is_none() {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(max_days)
    }
}
