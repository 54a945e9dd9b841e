//! Group commit for claims (`switchboard_core::group`): the deliveries this worker
//! takes together are read in one statement and claimed in one transaction
//! (`runs::claim_many`). A delivery that arrives while a lane is free is claimed at
//! once, alone: an idle worker's enqueue→start waits for no batch.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use switchboard_core::{
    CoreResult,
    group::{Group, GroupSettings},
    ids::RunId,
    repo::runs::{self, ClaimOutcome},
};

/// Claim transactions in flight at once.
const LANES: usize = 4;
/// The most deliveries claimed in one transaction (a worker's apalis buffer holds at
/// most its concurrency).
const BATCH_MAX: usize = 64;

/// The worker's claimer; cheap to clone.
#[derive(Clone)]
pub struct Claimer {
    group: Group<RunId, ClaimOutcome>,
    pool: PgPool,
}

impl Claimer {
    /// Starts the claiming task; it ends when every `Claimer` clone is dropped.
    pub fn start(pool: PgPool, owner: String, ttl: Duration) -> Claimer {
        let settings = GroupSettings { what: "claims", lanes: LANES, max: BATCH_MAX, window: Duration::ZERO };
        let group = Group::spawn(settings, {
            let pool = pool.clone();
            move |runs: Arc<Vec<RunId>>| {
                let (pool, owner) = (pool.clone(), owner.clone());
                async move { runs::claim_many(&pool, &runs, &owner, ttl).await }
            }
        });
        Claimer { group, pool }
    }

    /// Claims a delivered run, with whatever deliveries arrive with it. When no device
    /// was free, it looks again after that claim committed: a device released while
    /// the claim held the run's row may have missed it (see `runs::free_device_for`).
    pub async fn claim(&self, run: RunId) -> CoreResult<ClaimOutcome> {
        let mut outcome = self.group.submit(run).await?;
        for _ in 0..3 {
            if !matches!(outcome, ClaimOutcome::NoDevice) || !runs::free_device_for(&self.pool, run).await? {
                break;
            }
            outcome = self.group.submit(run).await?;
        }
        Ok(outcome)
    }
}
