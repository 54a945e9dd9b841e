//! The worker role: takes run ids from Redis (apalis), claims run and device in
//! Postgres, executes the module through its driver, writes the outcome, and hands the
//! freed device to the best waiting run.

pub mod agent;
pub mod claimer;
pub mod discovery;
pub mod drivers;
pub mod executor;
pub mod finisher;
pub mod lease;
pub mod wake;
mod workflow;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use apalis::prelude::*;
use apalis_core::backend::ext::{BackendExt, poll_strategy::Strategy};
use apalis_redis::RedisStorage;
use serde_json::json;
use switchboard_core::{
    config::{AdbConfig, CommonConfig, WorkerConfig},
    db, ids,
    model::ProcessRole,
    queue::{self, Keys, Queue, RunJob},
    repo::{
        devices::BreakerPolicy,
        processes,
        runs::{ClaimOutcome, FinishPolicy},
    },
    service::Engine,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    claimer::Claimer,
    drivers::{
        Drivers,
        adb::{AdbDriver, AdbSettings},
        host::HostDriver,
    },
    executor::Executor,
    finisher::{FinishSettings, Finisher},
    wake::WakeHub,
};

/// State every apalis handler invocation sees.
#[derive(Clone)]
struct Shared {
    exec: Arc<Executor>,
    tracker: TaskTracker,
}

/// Runs a worker process until `shutdown`, then stops gracefully: no new work, in-flight
/// runs get `shutdown_grace_s` to finish, the rest are handed back to the queue.
pub async fn run(common: CommonConfig, cfg: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let owner = ids::process_identity("worker");
    tracing::info!(worker = %owner, "worker starting: {} {}", common.summary(), cfg.summary());
    let pool = connect_with_retry(&common, &shutdown).await?;
    let Some(pool) = pool else { return Ok(()) };
    let queue = Queue::new(&common.redis_url, &common.namespace)?;
    let keys = Keys::new(&common.namespace);
    let exec = Arc::new(executor(&pool, queue, &owner, &common, &cfg));
    let shared = Shared { exec: exec.clone(), tracker: TaskTracker::new() };

    let hub = WakeHub::default();
    hub.on_cancel(Arc::new(move |run_id| exec.nudge(run_id)));
    let background = CancellationToken::new();
    let (wake, control) = (keys.wake_channel(), keys.control_channel());
    tokio::spawn(hub.clone().listen(common.redis_url.clone(), wake, control, background.clone()));
    tokio::spawn(beat(pool.clone(), owner.clone(), cfg.concurrency, background.clone()));
    tokio::spawn(promote(shared.exec.engine.queue.clone(), background.clone()));
    if cfg.adb_discover {
        let interval = Duration::from_secs(cfg.adb_discover_interval_s.max(1));
        let (engine, adb) = (shared.exec.engine.clone(), adb_driver(&cfg.adb));
        tokio::spawn(discovery::run(engine, adb, cfg.adb_pool.clone(), interval, background.clone()));
    }

    let consumer = Consumer {
        shared: shared.clone(),
        hub,
        keys,
        redis_url: common.redis_url.clone(),
        owner: owner.clone(),
        concurrency: cfg.concurrency.max(1),
        poll: Duration::from_millis(cfg.poll_interval_ms.max(10)),
    };
    let stopped = CancellationToken::new();
    let stop_logic = async {
        stop_gracefully(&shutdown, &shared, Duration::from_secs(cfg.shutdown_grace_s)).await;
        stopped.cancel();
    };
    // The apalis future is not `Send` in general, so it runs here beside the stop logic.
    // The consumer gets a few seconds after the in-flight runs to hand back its buffer.
    let supervised = async {
        tokio::select! {
            _ = consumer.supervise() => {}
            _ = async { stopped.cancelled().await; tokio::time::sleep(Duration::from_secs(5)).await } => {}
        }
    };
    tokio::join!(supervised, stop_logic);
    background.cancel();
    let _ = processes::stopped(&pool, &owner).await;
    tracing::info!("worker stopped");
    Ok(())
}

fn executor(pool: &sqlx::PgPool, queue: Queue, owner: &str, common: &CommonConfig, cfg: &WorkerConfig) -> Executor {
    Executor {
        pool: pool.clone(),
        engine: Engine::new(pool.clone(), queue),
        owner: owner.to_string(),
        drivers: Drivers::new(
            adb_driver(&cfg.adb),
            Some(HostDriver::new(pool.clone(), cfg.adb.capture_max_bytes.saturating_mul(4) + (4 << 20))),
        ),
        capture_max_bytes: cfg.adb.capture_max_bytes.max(1024),
        lease_ttl: common.lease_ttl(),
        claimer: Claimer::start(pool.clone(), owner.to_string(), common.lease_ttl()),
        finisher: Finisher::start(FinishSettings {
            pool: pool.clone(),
            owner: owner.to_string(),
            policy: FinishPolicy {
                breaker: BreakerPolicy { threshold: cfg.breaker_threshold, cooldown_s: cfg.breaker_cooldown_s as i64 },
                retry_base: Duration::from_millis(cfg.retry_base_ms.max(1)),
                retry_max: Duration::from_secs(cfg.retry_max_s.max(1)),
            },
            batch_max: cfg.finish_batch_max,
            lanes: cfg.finish_lanes,
        }),
        hand_back: CancellationToken::new(),
        stopping: CancellationToken::new(),
        inflight: Default::default(),
    }
}

/// The adb driver with its settings.
pub fn adb_driver(cfg: &AdbConfig) -> AdbDriver {
    AdbDriver::new(
        &cfg.adb_path,
        AdbSettings {
            call_timeout: Duration::from_secs(cfg.adb_timeout_s.max(1)),
            capture_max_bytes: cfg.capture_max_bytes.max(1024),
            poll: Duration::from_millis(cfg.adb_poll_ms.max(10)),
        },
    )
}

/// Stops taking work at `shutdown`, waits `grace` for the runs in flight, then hands
/// back what is left.
async fn stop_gracefully(shutdown: &CancellationToken, shared: &Shared, grace: Duration) {
    shutdown.cancelled().await;
    tracing::info!(grace_s = grace.as_secs(), "worker stopping: no new work; waiting for in-flight runs");
    shared.exec.stopping.cancel();
    shared.tracker.close();
    if tokio::time::timeout(grace, shared.tracker.wait()).await.is_err() {
        tracing::warn!("grace period over: handing back in-flight runs");
        shared.exec.hand_back.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), shared.tracker.wait()).await;
    }
}

/// Every second, moves due jobs to the active list in chunks, so that apalis' own
/// fetch never meets more than it can move (see `Queue::promote_due`).
async fn promote(queue: Queue, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match queue.promote_due().await {
            Ok(n) if n >= switchboard_core::queue::PROMOTE_CHUNK => {
                tracing::info!(jobs = n, "moved a pile of due jobs to the active list in chunks");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "could not move due jobs to the active list"),
        }
    }
}

/// The apalis consumer of the runs queue.
struct Consumer {
    shared: Shared,
    hub: WakeHub,
    keys: Keys,
    redis_url: String,
    owner: String,
    concurrency: usize,
    poll: Duration,
}

impl Consumer {
    /// An apalis worker ends when Redis misbehaves (a fetch error marks it dead): start
    /// a fresh one, under a fresh name, until the worker stops.
    async fn supervise(&self) {
        let stopping = &self.shared.exec.stopping;
        let mut delay = Duration::from_millis(200);
        for generation in 1u32.. {
            if stopping.is_cancelled() {
                return;
            }
            let name = format!("{}#{generation}", self.owner);
            // A pile of due jobs too big for apalis' fetch is what kills a consumer at
            // every poll: move it in chunks first (see `Queue::promote_due`).
            if let Err(e) = self.shared.exec.engine.queue.promote_due().await {
                tracing::warn!(error = %e, "could not move due jobs to the active list");
            }
            let started = std::time::Instant::now();
            match self.consume(&name).await {
                Ok(()) if stopping.is_cancelled() => return,
                Ok(()) => tracing::warn!(worker = %name, "queue consumer ended; restarting"),
                Err(e) => tracing::warn!(worker = %name, error = %e, "queue consumer failed; restarting"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                delay = Duration::from_millis(200);
            }
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One apalis worker, until the worker stops or it fails.
    async fn consume(&self, name: &str) -> anyhow::Result<()> {
        let conn = queue::connection(&self.redis_url)?;
        let backend = RedisStorage::<RunJob>::new(conn)
            .with_config(self.keys.apalis_config(self.concurrency))
            .poll_with_strategy(Strategy::new().interval(self.poll).stream(self.hub.subscribe()));
        let worker = WorkerBuilder::new(name)
            .backend(backend)
            .data(self.shared.clone())
            .concurrency(self.concurrency)
            .parallelize(tokio::spawn)
            .build(handle);
        let stop = self.shared.exec.stopping.clone();
        worker
            .run_until(async move {
                stop.cancelled().await;
                Ok::<(), std::io::Error>(())
            })
            .await?;
        Ok(())
    }
}

/// One delivery from Redis. Returns `Ok` once Postgres holds the outcome (apalis'
/// own retries are never used: ours live in Postgres), `AbortError` otherwise.
async fn handle(job: RunJob, shared: Data<Shared>) -> Result<(), BoxDynError> {
    let exec = shared.exec.clone();
    if exec.stopping.is_cancelled() || shared.tracker.is_closed() {
        // Not ours to take any more: leave it queued for another worker.
        exec.engine.dispatch(&[job.run_id]).await;
        return Ok(());
    }
    let work = async move {
        let claimed_at = tokio::time::Instant::now();
        let span = executor::claim_span(job.run_id);
        let outcome = exec.claimer.claim(job.run_id).await?;
        if let ClaimOutcome::Claimed(c) = &outcome {
            executor::claimed(span, c);
        }
        match outcome {
            ClaimOutcome::Claimed(claimed) => exec.run_chain(*claimed, claimed_at).await,
            ClaimOutcome::NoDevice => {
                tracing::debug!(run_id = %job.run_id, "no free matching device; the run waits queued");
                Ok(())
            }
            ClaimOutcome::NotYet(at) => {
                tracing::debug!(run_id = %job.run_id, not_before = %at, "delivered before its retry time; again then");
                exec.deliver_at(job.run_id, Some(at), Duration::from_millis(50));
                Ok(())
            }
            ClaimOutcome::NotClaimable => Ok(()),
            ClaimOutcome::Unreadable(error) => {
                tracing::error!(run_id = %job.run_id, error = %error.message, "the run's stored data is unreadable; it was ended");
                Ok(())
            }
        }
    };
    match shared.tracker.track_future(work).await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!(run_id = %job.run_id, error = %e, "could not process delivery; the reconciler will re-deliver");
            Err(Box::new(AbortError::new(e)))
        }
    }
}

async fn connect_with_retry(
    common: &CommonConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<sqlx::PgPool>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match db::connect(&common.database_url, common.db_max_connections).await {
            Ok(pool) => return Ok(Some(pool)),
            Err(switchboard_core::CoreError::BadRequest(m)) => return Err(anyhow::anyhow!(m)).context("configuration"),
            Err(e) => tracing::warn!(error = %e, "postgres not reachable; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn beat(pool: sqlx::PgPool, owner: String, concurrency: usize, stop: CancellationToken) {
    let info = json!({"concurrency": concurrency, "version": env!("CARGO_PKG_VERSION")});
    loop {
        if let Err(e) = processes::beat(&pool, &owner, ProcessRole::Worker, &info).await {
            tracing::debug!(error = %e, "process heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
