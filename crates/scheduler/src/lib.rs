//! The scheduler role: cron ticks (exactly once per tick across any number of
//! schedulers), and the reconciler (expired leases, runs Redis lost, campaigns left
//! half-advanced, Redis trimming). Every pass is safe with several schedulers running.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::Notify;
use switchboard_core::{
    CoreResult,
    config::{CommonConfig, SchedulerConfig},
    db, ids,
    queue::Queue,
    repo::{campaigns, processes, runs, schedules},
};
use tokio_util::sync::CancellationToken;

/// Longest sleep between two looks at the schedules (new or edited schedules are seen
/// within this).
const MAX_TICK_WAIT: Duration = Duration::from_millis(500);

/// Runs the scheduler until `shutdown`.
pub async fn run(common: CommonConfig, cfg: SchedulerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let me = ids::process_identity("scheduler");
    tracing::info!(scheduler = %me, "scheduler starting: {} {}", common.summary(), cfg.summary());
    let pool = db::connect_lazy(&common.database_url, 6)?;
    let queue = Queue::new(&common.redis_url, &common.namespace)?;
    let changed = Arc::new(Notify::new());
    tokio::join!(
        tick_loop(pool.clone(), queue.clone(), Duration::from_millis(cfg.misfire_grace_ms), changed.clone(), shutdown.clone()),
        listen_for_changes(pool.clone(), changed, shutdown.clone()),
        reconcile_loop(pool.clone(), queue, &me, &cfg, shutdown.clone()),
    );
    let _ = processes::stopped(&pool, &me).await;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Wakes the tick loop when a schedule is created or changed (Postgres LISTEN), so a new
/// schedule's first tick is not late by a poll interval. Best effort: the tick loop
/// polls anyway.
async fn listen_for_changes(pool: PgPool, changed: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen(schedules::CHANGED_CHANNEL).await {
                    tracing::warn!(error = %e, "cannot listen for schedule changes");
                } else {
                    changed.notify_one();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            n = listener.recv() => match n {
                                Ok(_) => changed.notify_one(),
                                Err(e) => {
                                    tracing::warn!(error = %e, "schedule change listener lost; reconnecting");
                                    break;
                                }
                            },
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot connect the schedule change listener"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Fires due schedules, sleeping until the next one is due (at most `MAX_TICK_WAIT`),
/// or until a schedule changes.
async fn tick_loop(pool: PgPool, queue: Queue, grace: Duration, changed: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let wait = match tick_once(&pool, &queue, grace).await {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                match schedules::next_due(&pool).await {
                    Ok(Some(due)) => (due - chrono::Utc::now()).to_std().unwrap_or_default().min(MAX_TICK_WAIT),
                    Ok(None) => MAX_TICK_WAIT,
                    Err(_) => MAX_TICK_WAIT,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "schedule tick failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => {}
        }
    }
}

/// One tick: fire what is due, then push the runs (Postgres first, Redis second).
pub async fn tick_once(pool: &PgPool, queue: &Queue, grace: Duration) -> CoreResult<()> {
    let fired = schedules::tick(pool, grace).await?;
    if !fired.push.is_empty()
        && let Err(e) = queue.push_many(&fired.push).await
    {
        tracing::warn!(error = %e, "could not push scheduled runs; the reconciler will deliver them");
    }
    // The pushed runs, and campaign runs (not pushed themselves: their tick was
    // enqueued with their children), each recorded once.
    let mut marked = fired.push.clone();
    marked.extend(fired.runs.iter().copied());
    marked.sort();
    marked.dedup();
    if !marked.is_empty() {
        runs::mark_dispatched(pool, &marked).await?;
    }
    if !fired.runs.is_empty() {
        tracing::info!(runs = fired.runs.len(), "schedules fired");
    }
    Ok(())
}

async fn reconcile_loop(pool: PgPool, queue: Queue, me: &str, cfg: &SchedulerConfig, shutdown: CancellationToken) {
    let interval = Duration::from_secs(cfg.reconcile_interval_s.max(1));
    let stale = Duration::from_secs(cfg.redispatch_after_s.max(1));
    let info = json!({"version": env!("CARGO_PKG_VERSION"), "reconcile_interval_s": cfg.reconcile_interval_s});
    loop {
        if let Err(e) = processes::beat(&pool, me, "scheduler", &info).await {
            tracing::warn!(error = %e, "scheduler heartbeat failed");
        }
        match reconcile(&pool, &queue, stale).await {
            Ok(n) if n > 0 => tracing::info!(pushed = n, "reconciler re-delivered runs"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying next interval"),
        }
        // Bounded Redis memory: trim finished deliveries, 500 at a time.
        match queue.trim(500, 40, Duration::from_secs(600)).await {
            Ok(n) if n > 0 => tracing::debug!(removed = n, "trimmed finished deliveries from redis"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "redis trim failed; retrying next interval"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One reconcile pass: recover expired leases, then push queued runs that nobody has
/// delivered lately. Returns how many runs were pushed.
pub async fn reconcile(pool: &PgPool, queue: &Queue, stale: Duration) -> CoreResult<usize> {
    let mut recovered = runs::recover_expired(pool, 500).await?;
    if !recovered.is_empty() {
        tracing::warn!(count = recovered.len(), "recovered runs whose worker stopped renewing its lease");
    }
    let due = runs::due_for_dispatch(pool, stale, 1000).await?;
    recovered.extend(due);
    // Campaigns whose advancing process died between a child's end and the next
    // admission are moved on here.
    for parent in campaigns::running(pool, 1000).await? {
        match campaigns::advance(pool, parent).await {
            Ok(a) => {
                recovered.extend(a.admit);
                for id in a.signal {
                    queue.signal_cancel(id).await;
                }
            }
            // One campaign's trouble must not stop the others from moving on.
            Err(e) => tracing::warn!(campaign_run = %parent, error = %e, "could not advance a campaign"),
        }
    }
    recovered.sort();
    recovered.dedup();
    for chunk in recovered.chunks(200) {
        queue.push_many(chunk).await?;
        runs::mark_dispatched(pool, chunk).await?;
    }
    Ok(recovered.len())
}
