//! Figures read across tables for `/api/v1/system/info` and `/metrics`. They come
//! from Postgres, the record every process shares, so any API replica reports the
//! whole deployment.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    CoreResult,
    ids::EventId,
    model::{DeviceStatus, RunKind, RunStatus},
    repo::feed::Position,
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

/// Runs finished by kind and end status among the events in the feed's stretch
/// `(after, upto]` (the `run.finished` events: one per run, written once). Bounded by
/// feed positions, below the line no open transaction can still write under
/// (`repo::feed`), so an event committed late is counted once, never skipped; read
/// along the `(tx, id)` index.
pub async fn finished_between(
    pool: &PgPool,
    after: Position,
    upto: Position,
) -> CoreResult<Vec<(RunKind, String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT r.kind, e.data ->> 'status' AS "status!", count(*) AS "n!"
           FROM events e JOIN runs r ON r.id = e.run_id
           WHERE (e.tx, e.id) > ($1::text::xid8, $2) AND (e.tx, e.id) <= ($3::text::xid8, $4)
             AND e.type = 'run.finished'
           GROUP BY 1, 2"#,
        after.tx.to_string(),
        after.id as EventId,
        upto.tx.to_string(),
        upto.id as EventId,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kind, r.status, r.n)).collect())
}

/// Devices by status, and how many breakers are not closed.
pub async fn devices_by_status(pool: &PgPool) -> CoreResult<(Vec<(DeviceStatus, i64)>, i64)> {
    let rows = sqlx::query!(r#"SELECT status, count(*) AS "n!" FROM devices GROUP BY status ORDER BY 1"#)
        .fetch_all(pool)
        .await?;
    let open = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM devices WHERE breaker_state <> 'closed'"#)
        .fetch_one(pool)
        .await?;
    Ok((rows.into_iter().map(|r| (r.status, r.n)).collect(), open))
}

/// A schedule's decisions.
#[derive(Debug, Clone)]
pub struct ScheduleTicks {
    /// Its name.
    pub name: String,
    /// Ticks that started a run.
    pub fired: i64,
    /// Ticks skipped.
    pub skipped: i64,
    /// Ticks missed.
    pub missed: i64,
}

/// Every schedule's decisions.
pub async fn schedule_ticks(pool: &PgPool) -> CoreResult<Vec<ScheduleTicks>> {
    Ok(sqlx::query_as!(
        ScheduleTicks,
        "SELECT name, fired_count AS fired, skipped_count AS skipped, missed_count AS missed FROM schedules ORDER BY name"
    )
    .fetch_all(pool)
    .await?)
}

/// Fire lag, from a tick's scheduled time to its run's first push, of the runs first
/// pushed in `(after, upto]`, bucketed in Postgres (no rows leave the database, and
/// the index on `enqueued_at` of scheduled runs bounds the read to the window): the
/// count at or below each bound, the total count and the sum (seconds).
pub async fn fire_lag_between(
    pool: &PgPool,
    bounds: &[f64],
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> CoreResult<(Vec<i64>, i64, f64)> {
    let r = sqlx::query!(
        r#"WITH lags AS MATERIALIZED (
               SELECT extract(epoch FROM (enqueued_at - scheduled_for))::float8 AS lag FROM runs
               WHERE trigger = 'schedule' AND scheduled_for IS NOT NULL AND enqueued_at > $2 AND enqueued_at <= $3)
           SELECT array(SELECT (SELECT count(*) FROM lags WHERE lag <= b) FROM unnest($1::float8[]) WITH ORDINALITY AS u(b, i)
                        ORDER BY i) AS "buckets!: Vec<i64>",
                  (SELECT count(*) FROM lags) AS "n!",
                  (SELECT COALESCE(sum(lag), 0) FROM lags)::float8 AS "total!""#,
        bounds,
        after,
        upto
    )
    .fetch_one(pool)
    .await?;
    Ok((r.buckets, r.n, r.total))
}

/// Postgres' clock less five seconds: the upper end of the fire-lag window (a first push
/// is written by short transactions; one that commits later than that is not counted).
pub async fn settled_now(pool: &PgPool) -> CoreResult<DateTime<Utc>> {
    Ok(sqlx::query_scalar!(r#"SELECT now() - interval '5 seconds' AS "t!""#).fetch_one(pool).await?)
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
