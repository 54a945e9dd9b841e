//! Group commit for outcomes (`switchboard_core::group`): the attempts of this worker
//! that end together are written in one transaction (`runs::finish_many`), one commit
//! and one statement per kind of write for all of them. An outcome that ends while a
//! lane is free is written at once, alone: an idle worker waits for no batch.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use switchboard_core::{
    CoreResult,
    group::{Group, GroupSettings},
    repo::runs::{self, Claimed, FinishPolicy, FinishRequest, Finished},
};

/// The worker's outcome writer; cheap to clone.
#[derive(Clone)]
pub struct Finisher {
    group: Group<FinishRequest, (Finished, Option<Claimed>)>,
}

/// Where and how outcomes are written.
#[derive(Clone)]
pub struct FinishSettings {
    /// Postgres.
    pub pool: PgPool,
    /// The lease owner (this worker).
    pub owner: String,
    /// Breaker and retry settings.
    pub policy: FinishPolicy,
    /// The most outcomes per transaction.
    pub batch_max: usize,
    /// Finish transactions in flight at once.
    pub lanes: usize,
}

impl Finisher {
    /// Starts the writer task; it ends when every `Finisher` clone is dropped.
    pub fn start(s: FinishSettings) -> Finisher {
        let settings = GroupSettings { what: "outcomes", lanes: s.lanes, max: s.batch_max, window: Duration::ZERO };
        let group = Group::spawn(settings, move |requests: Arc<Vec<FinishRequest>>| {
            let (pool, owner, policy) = (s.pool.clone(), s.owner.clone(), s.policy);
            async move { runs::finish_many(&pool, &owner, policy, &requests).await }
        });
        Finisher { group }
    }

    /// Writes one attempt's outcome, with whatever else ends at the same time: what
    /// happened to the run, and the run its device was handed over to.
    pub async fn finish(&self, request: FinishRequest) -> CoreResult<(Finished, Option<Claimed>)> {
        self.group.submit(request).await
    }
}
