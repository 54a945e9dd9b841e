//! The scheduler role: cron ticks (exactly once per tick across any number of
//! schedulers), and the reconciler (expired leases, runs Redis lost, campaigns left
//! half-advanced, Redis trimming). Every pass is safe with several schedulers running.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use sqlx::{PgPool, postgres::PgListener};
use switchboard_core::{
    config::{CommonConfig, SchedulerConfig},
    db, ids,
    model::ProcessRole,
    queue::Queue,
    repo::{processes, schedules},
    service::{Engine, ReconcileSettings},
    telemetry,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest sleep between two looks at the schedules (new or edited schedules are seen
/// within this).
const MAX_TICK_WAIT: Duration = Duration::from_millis(500);

/// Runs the scheduler until `shutdown`.
pub async fn run(common: CommonConfig, cfg: SchedulerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let me = ids::process_identity("scheduler");
    tracing::info!(scheduler = %me, "scheduler starting: {} {}", common.summary(), cfg.summary());
    let pool = db::connect_lazy(&common.database_url, 6)?;
    let engine = Engine::new(pool.clone(), Queue::new(&common.redis_url, &common.namespace)?);
    let changed = Arc::new(Notify::new());
    tokio::join!(
        tick_loop(&engine, Duration::from_millis(cfg.misfire_grace_ms), changed.clone(), shutdown.clone()),
        listen_for_changes(pool.clone(), changed, shutdown.clone()),
        reconcile_loop(&engine, &me, &cfg, shutdown.clone()),
        retention_loop(&engine, &cfg, shutdown.clone()),
        rollup_loop(&engine, shutdown.clone()),
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
async fn tick_loop(engine: &Engine, grace: Duration, changed: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let wait = match engine.tick(grace).await {
            Ok(fired) => {
                if fired > 0 {
                    tracing::info!(runs = fired, "schedules fired");
                }
                backoff = Duration::from_millis(200);
                match schedules::next_due(&engine.pool).await {
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

async fn reconcile_loop(engine: &Engine, me: &str, cfg: &SchedulerConfig, shutdown: CancellationToken) {
    let interval = Duration::from_secs(cfg.reconcile_interval_s.max(1));
    let settings = ReconcileSettings {
        redispatch_after: Duration::from_secs(cfg.redispatch_after_s.max(1)),
        max_queue_wait: Duration::from_secs(cfg.max_queue_wait_s.max(1)),
    };
    let info = json!({"version": env!("CARGO_PKG_VERSION"), "reconcile_interval_s": cfg.reconcile_interval_s});
    loop {
        if let Err(e) = processes::beat(&engine.pool, me, ProcessRole::Scheduler, &info).await {
            tracing::warn!(error = %e, "scheduler heartbeat failed");
        }
        let span = tracing::info_span!("scheduler.reconcile", trace_id = tracing::field::Empty);
        telemetry::record_trace_id(&span);
        match engine.reconcile(settings).instrument(span).await {
            Ok(r) if r.pushed > 0 => tracing::info!(pushed = r.pushed, "reconciler re-delivered runs"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying next interval"),
        }
        // Host liveness: a host silent past its timeout goes offline with its devices.
        if let Err(e) = engine.sweep_hosts().await {
            tracing::warn!(error = %e, "host liveness pass failed; retrying next interval");
        }
        // Bounded Redis memory: trim finished deliveries, 500 at a time.
        match engine.queue.trim(500, 40, Duration::from_secs(600)).await {
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

/// How often the scheduler looks for a day of step outcomes to roll up. A day is
/// rolled up within this of its end; until then it is counted live.
const ROLLUP_INTERVAL: Duration = Duration::from_secs(60);

/// Rolls up the days of step outcomes that have ended (`repo::rollup`): at start (a
/// long history's days, a few hundred a pass), then every `ROLLUP_INTERVAL`.
async fn rollup_loop(engine: &Engine, shutdown: CancellationToken) {
    loop {
        let span = tracing::info_span!("scheduler.rollup", trace_id = tracing::field::Empty);
        telemetry::record_trace_id(&span);
        match engine.roll_up_history(400).instrument(span).await {
            Ok(days) if days > 0 => tracing::info!(days, "rolled up days of step outcomes"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rollup pass failed; retrying next interval"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ROLLUP_INTERVAL) => {}
        }
    }
}

/// Prunes the history past `SWITCHBOARD_RETENTION_DAYS` every
/// `SWITCHBOARD_RETENTION_INTERVAL_S` (never, with 0 days), as a span of its own.
async fn retention_loop(engine: &Engine, cfg: &SchedulerConfig, shutdown: CancellationToken) {
    if cfg.retention_days == 0 {
        return;
    }
    let keep = Duration::from_secs(u64::from(cfg.retention_days) * 86_400);
    let interval = Duration::from_secs(cfg.retention_interval_s.max(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let span = tracing::info_span!("scheduler.retention", trace_id = tracing::field::Empty);
        telemetry::record_trace_id(&span);
        match engine.prune_history(keep, 100).instrument(span).await {
            Ok(p) if p.runs + p.events > 0 => {
                tracing::info!(runs = p.runs, steps = p.steps, events = p.events, "pruned history past retention")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; retrying next interval"),
        }
    }
}
