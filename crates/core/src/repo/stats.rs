//! Figures read across tables for `/api/v1/system/info` and `/metrics`. They come
//! from Postgres, the record every process shares, so any API replica reports the
//! whole deployment.

use serde::Serialize;
use sqlx::PgPool;

use crate::{
    CoreResult,
    model::{RunKind, RunStatus},
};

/// Runs waiting and running now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QueueCounts {
    /// Queued runs that may be delivered.
    pub queued: i64,
    /// Queued runs backing off before a retry.
    pub waiting_for_retry: i64,
    /// Campaign children not yet admitted.
    pub held_by_campaigns: i64,
    /// Runs executing on devices.
    pub running: i64,
}

/// Counts of waiting and running runs.
pub async fn queue_counts(pool: &PgPool) -> CoreResult<QueueCounts> {
    let r = sqlx::query!(
        // Each count on its own status, so each reads its partial index, never the
        // history (`status IN (...)` cannot use them).
        r#"SELECT
            (SELECT count(*) FROM runs WHERE status = 'queued' AND NOT held AND NOT paused AND kind <> 'campaign'
                AND (not_before IS NULL OR not_before <= now())) AS "queued!",
            (SELECT count(*) FROM runs WHERE status = 'queued' AND not_before > now()) AS "waiting_for_retry!",
            (SELECT count(*) FROM runs WHERE status = 'queued' AND held) AS "held!",
            (SELECT count(*) FROM runs WHERE status = 'running' AND kind <> 'campaign') AS "running!""#
    )
    .fetch_one(pool)
    .await?;
    Ok(QueueCounts {
        queued: r.queued,
        waiting_for_retry: r.waiting_for_retry,
        held_by_campaigns: r.held,
        running: r.running,
    })
}

/// Runs of one kind in one status.
#[derive(Debug, Clone)]
pub struct RunCount {
    /// The kind.
    pub kind: RunKind,
    /// The status.
    pub status: RunStatus,
    /// How many.
    pub n: i64,
}

/// Runs queued or running now, by kind and status: read through the partial indexes
/// on open runs, so its cost follows the queue, not the history.
pub async fn open_runs_by_status(pool: &PgPool) -> CoreResult<Vec<RunCount>> {
    Ok(sqlx::query_as!(
        RunCount,
        // One arm per status, each the exact predicate of its partial index: the
        // planner cannot use `runs_queued_idx` for `status IN (...)`, and scans the
        // whole table instead.
        r#"SELECT kind AS "kind!: RunKind", status AS "status!: RunStatus", n AS "n!" FROM (
             SELECT kind, 'queued'::run_status AS status, count(*) AS n FROM runs WHERE status = 'queued' GROUP BY kind
             UNION ALL
             SELECT kind, 'running'::run_status, count(*) FROM runs WHERE status = 'running' GROUP BY kind) c
           ORDER BY 1, 2"#
    )
    .fetch_all(pool)
    .await?)
}

/// One gauge value from `gauges`: which metric, up to two label values, the value.
#[derive(Debug, Clone)]
pub struct Gauge {
    /// `queue_depth`, `queue_oldest_age`, `runs_open`, `devices` or `breaker_state`.
    pub metric: String,
    /// The first label's value (pool, kind, status or device id).
    pub a: String,
    /// The second label's value (status, device name), or empty.
    pub b: String,
    /// The value.
    pub value: f64,
}

/// Every gauge only Postgres knows, in one statement whose cost follows the queue and
/// the device table, never the history: each arm over runs is the exact predicate of
/// a partial index on open runs (`status IN (...)` would not use them).
///
/// Queue depth counts the runs waiting for a device: queued, not held by a campaign,
/// not campaign parents (a campaign waits on its children), backing off or not. Its
/// age is from `waiting_since`, when the run last joined the queue.
pub async fn gauges(pool: &PgPool) -> CoreResult<Vec<Gauge>> {
    Ok(sqlx::query_as!(
        Gauge,
        r#"WITH waiting AS MATERIALIZED (
               SELECT COALESCE(selector ->> 'pool', '*') AS pool, count(*) AS n, min(waiting_since) AS oldest
               FROM runs WHERE status = 'queued' AND NOT held AND kind <> 'campaign' GROUP BY 1)
           SELECT metric AS "metric!", a AS "a!", b AS "b!", value AS "value!" FROM (
               SELECT 'queue_depth' AS metric, pool AS a, '' AS b, n::float8 AS value FROM waiting
               UNION ALL
               SELECT 'queue_oldest_age', pool, '', GREATEST(extract(epoch FROM now() - oldest), 0)::float8 FROM waiting
               UNION ALL
               SELECT 'runs_open', kind::text, 'queued', count(*)::float8 FROM runs WHERE status = 'queued' GROUP BY kind
               UNION ALL
               SELECT 'runs_open', kind::text, 'running', count(*)::float8 FROM runs WHERE status = 'running' GROUP BY kind
               UNION ALL
               SELECT 'devices', status::text, '', count(*)::float8 FROM devices GROUP BY status
               UNION ALL
               SELECT 'breaker_state', id::text, name,
                      CASE breaker_state WHEN 'closed' THEN 0 WHEN 'half_open' THEN 1 ELSE 2 END::float8 FROM devices
           ) g"#
    )
    .fetch_all(pool)
    .await?)
}

/// Runs still queued or running (a deployment is idle at zero).
pub async fn open_runs(pool: &PgPool) -> CoreResult<i64> {
    Ok(sqlx::query_scalar!(
        r#"SELECT (SELECT count(*) FROM runs WHERE status = 'queued')
                + (SELECT count(*) FROM runs WHERE status = 'running') AS "n!""#
    )
    .fetch_one(pool)
    .await?)
}

/// Enqueue-to-start latency of started runs (`started_at - queued_at`, milliseconds).
pub async fn start_latencies_ms(pool: &PgPool, ids: &[crate::ids::RunId]) -> CoreResult<Vec<f64>> {
    Ok(sqlx::query_scalar!(
        r#"SELECT (extract(epoch FROM (started_at - queued_at)) * 1000)::float8 AS "ms!" FROM runs
           WHERE id = ANY ($1) AND started_at IS NOT NULL"#,
        ids as &[crate::ids::RunId]
    )
    .fetch_all(pool)
    .await?)
}

/// Fire lag of a schedule's ticks (`enqueued_at - scheduled_for`, milliseconds).
pub async fn fire_lags_ms(pool: &PgPool, schedule: crate::ids::ScheduleId) -> CoreResult<Vec<f64>> {
    Ok(sqlx::query_scalar!(
        r#"SELECT (extract(epoch FROM (enqueued_at - scheduled_for)) * 1000)::float8 AS "ms!" FROM runs
           WHERE schedule_id = $1 AND scheduled_for IS NOT NULL AND enqueued_at IS NOT NULL"#,
        schedule as crate::ids::ScheduleId
    )
    .fetch_all(pool)
    .await?)
}
