//! The operations the api, the worker and the scheduler call, each written once:
//! starting runs and campaigns, moving campaigns on, dispatching to the queue,
//! cancelling, pausing, retrying, device changes, schedules and reconciling.
//!
//! An operation validates what only the database can tell (does the workflow exist,
//! does a device match), composes the repositories in one transaction, and after it
//! commits, pushes what is ready to the queue (`dispatch`): Postgres first, Redis
//! second, so nothing accepted is ever only in Redis.

mod batch;
mod devices;
mod hosts;
mod reconcile;
mod runs;
mod schedules;

pub use batch::{MAX_BATCH, StartItem};
pub use hosts::HostReport;
pub use reconcile::{ReconcileSettings, Reconciled};
pub use runs::{StartCampaign, StartModule, StartWorkflow, Started};
pub use schedules::{NewSchedule, SchedulePatch, Upcoming};

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;

use crate::{ids::RunId, queue::Queue, repo::runs as run_repo};

/// Postgres and the queue: what every operation needs.
#[derive(Clone)]
pub struct Engine {
    /// The source of truth.
    pub pool: PgPool,
    /// The delivery channel.
    pub queue: Queue,
    /// The API's group commit, if this process has one (see `with_group_commit`).
    group: Option<Arc<batch::GroupCommit>>,
}

impl Engine {
    /// An engine over a pool and a queue.
    pub fn new(pool: PgPool, queue: Queue) -> Engine {
        Engine { pool, queue, group: None }
    }

    /// This engine, with its starts gathered into shared INSERTs: each start waits at
    /// most `window` for others to join it (see `batch`). For the API, where starts
    /// arrive concurrently; call inside a Tokio runtime.
    pub fn with_group_commit(mut self, window: Duration) -> Engine {
        self.group = Some(batch::GroupCommit::spawn(self.clone(), window));
        self
    }

    /// Pushes runs to the queue, then records them dispatched: the one dispatch policy.
    ///
    /// A failed push is logged and otherwise ignored: the runs are safe in Postgres,
    /// and since their dispatch is not recorded, the reconciler delivers them within
    /// seconds. Recording the dispatch is bookkeeping, done off the caller's path; if
    /// it fails, the reconciler may push a run again, which a claim shrugs off.
    /// Returns whether the push succeeded.
    pub async fn dispatch(&self, ids: &[RunId]) -> bool {
        if ids.is_empty() {
            return true;
        }
        if let Err(e) = self.queue.push_many(ids).await {
            tracing::warn!(runs = ids.len(), error = %e, "push to the queue failed; the reconciler will deliver these runs");
            return false;
        }
        let (pool, ids) = (self.pool.clone(), ids.to_vec());
        tokio::spawn(async move {
            if let Err(e) = run_repo::mark_dispatched(&pool, &ids).await {
                tracing::warn!(runs = ids.len(), error = %e, "could not record a dispatch");
            }
        });
        true
    }

    /// Dispatches what a start made ready (`push`), and records `run` dispatched too
    /// (a campaign run is not pushed itself: its children are).
    pub async fn dispatch_started(&self, run: RunId, push: &[RunId]) -> bool {
        if !self.dispatch(push).await {
            return false;
        }
        if !push.contains(&run)
            && let Err(e) = run_repo::mark_dispatched(&self.pool, &[run]).await
        {
            tracing::warn!(run_id = %run, error = %e, "could not record a dispatch");
        }
        true
    }

    /// Tells the workers of running runs to look at them now (they were cancelled).
    pub async fn signal(&self, ids: &[RunId]) {
        for id in ids {
            self.queue.signal_cancel(*id).await;
        }
    }
}
