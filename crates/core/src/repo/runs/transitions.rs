//! The one SQL writer per kind of lifecycle change. `lifecycle::decide` says which
//! change a run gets; these carry it out, each run write and its event in one
//! statement, always in the transaction that locked the row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, types::Json};

use crate::{
    CoreResult,
    events::{EventKind, Subject},
    ids::{DeviceId, HostId, RunId},
    lifecycle::{RunState, run_state},
    model::{BreakerState, Device, Run, RunKind, RunStatus, RunStep},
    repo::{events, runs::RunRow},
    run_error::RunError,
};

/// A run row locked `FOR UPDATE`, with what the lifecycle and the writers need.
#[derive(Debug, Clone)]
pub(crate) struct Locked {
    pub id: RunId,
    pub state: RunState,
    pub device_id: Option<DeviceId>,
    pub lease_owner: Option<String>,
}

impl Locked {
    /// Whether `owner` holds attempt `attempt` of the run (the fencing token).
    pub fn held_by(&self, owner: &str, attempt: i32) -> bool {
        self.state.status == RunStatus::Running
            && self.state.attempt == attempt
            && self.lease_owner.as_deref() == Some(owner)
    }
}

/// Locks a run for a decision; `None` if it does not exist.
pub(crate) async fn lock(conn: &mut PgConnection, id: RunId) -> CoreResult<Option<Locked>> {
    let row = sqlx::query!(
        "SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held, device_id, lease_owner
         FROM runs WHERE id = $1 FOR UPDATE",
        id as RunId
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| Locked { id: r.id, state: run_state!(r), device_id: r.device_id, lease_owner: r.lease_owner }))
}

/// `queued → running` on `device` under `owner`'s lease, with `run.started`, and the
/// device leased to the run with its breaker at `breaker` (`devices::leased_breaker`
/// decides), in one statement.
///
/// `started_at` is the clock at this statement, not the transaction's start (`now()`):
/// a claim may have waited for a row lock, and its run starts only once the device is
/// leased, after the previous holder's release committed. The lease runs from the
/// transaction's start, which only makes it shorter: the safe side for fencing.
pub(crate) async fn start(
    conn: &mut PgConnection,
    id: RunId,
    device: &Device,
    owner: &str,
    ttl: Duration,
    breaker: BreakerState,
    started: Value,
) -> CoreResult<Run> {
    let row = sqlx::query_as!(
        RunRow,
        "WITH d AS (
            UPDATE devices SET lease_run_id = $1, lease_owner = $3, lease_expires_at = now() + make_interval(secs => $4),
                breaker_state = $7, updated_at = now()
            WHERE id = $2 RETURNING id),
         r AS (
            UPDATE runs SET status = 'running', device_id = d.id, lease_owner = $3, host_id = $8,
                lease_expires_at = now() + make_interval(secs => $4), started_at = clock_timestamp(), finished_at = NULL,
                not_before = NULL, updated_at = now()
            FROM d WHERE runs.id = $1 AND runs.status = 'queued' RETURNING runs.*),
         e AS (INSERT INTO events (type, run_id, device_id, data)
               SELECT $5, r.id, r.device_id, $6 || jsonb_build_object('attempt', r.attempt) FROM r)
         SELECT * FROM r",
        id as RunId,
        device.id as DeviceId,
        owner,
        ttl.as_secs_f64(),
        EventKind::RunStarted as EventKind,
        started,
        breaker as BreakerState,
        device.host_id as Option<HostId>,
    )
    .fetch_one(&mut *conn)
    .await?;
    let waited = (row.attempt == 1).then(|| row.started_at.map(|s| s - row.queued_at)).flatten();
    crate::meters::run_started(row.kind, waited.and_then(|w| w.to_std().ok()));
    Ok(row.into())
}

/// Why a run went back to the queue (`run.requeued`'s `reason`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RequeueReason {
    Retry,
    HandedBack,
    LeaseExpired,
}

impl RequeueReason {
    fn as_str(self) -> &'static str {
        match self {
            RequeueReason::Retry => "retry",
            RequeueReason::HandedBack => "handed_back",
            RequeueReason::LeaseExpired => "lease_expired",
        }
    }
}

/// `running → queued` with `attempt + 1` and the lease cleared, `paused` kept. A
/// hand-back (`spend_attempt: false`) grows `max_attempts` too. `delay` sets
/// `not_before` from Postgres' clock, the clock every comparison uses; it is returned.
pub(crate) async fn requeue(
    conn: &mut PgConnection,
    id: RunId,
    spend_attempt: bool,
    delay: Option<Duration>,
    error: &RunError,
    reason: RequeueReason,
) -> CoreResult<Option<DateTime<Utc>>> {
    let not_before = sqlx::query_scalar!(
        r#"WITH r AS (
            UPDATE runs SET status = 'queued', attempt = attempt + 1,
                max_attempts = max_attempts + CASE WHEN $2 THEN 0 ELSE 1 END,
                lease_owner = NULL, lease_expires_at = NULL, finished_at = clock_timestamp(), dispatched_at = NULL,
                waiting_since = clock_timestamp(),
                not_before = CASE WHEN $3::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $3) END,
                error = $4, updated_at = now()
            WHERE id = $1 AND status = 'running'
            RETURNING id, attempt, device_id, not_before)
           INSERT INTO events (type, run_id, device_id, data)
           SELECT $5, r.id, r.device_id, jsonb_build_object('attempt', r.attempt - 1, 'next_attempt', r.attempt,
                  'error', $4::jsonb, 'not_before', r.not_before, 'device_id', r.device_id, 'reason', $6::text)
           FROM r RETURNING (data ->> 'not_before')::timestamptz AS "not_before""#,
        id as RunId,
        spend_attempt,
        delay.map(|d| d.as_secs_f64()),
        Json(error) as _,
        EventKind::RunRequeued as EventKind,
        reason.as_str(),
    )
    .fetch_optional(&mut *conn)
    .await?;
    if not_before.is_some() {
        crate::meters::run_requeued(reason.as_str());
    }
    Ok(not_before.flatten())
}

/// Ends runs in a terminal `status` (written once: only queued or running runs
/// change), each with its `run.finished` event. Returns the runs it ended.
pub(crate) async fn end(
    conn: &mut PgConnection,
    ids: &[RunId],
    status: RunStatus,
    result: Option<&Value>,
    error: Option<&RunError>,
) -> CoreResult<Vec<RunId>> {
    let endings: Vec<RunEnd<'_>> = ids.iter().map(|&id| RunEnd { id, status, result, error }).collect();
    end_each(conn, &endings).await
}

/// One run to end, with its own status, result and error (`end_each`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunEnd<'a> {
    pub id: RunId,
    pub status: RunStatus,
    pub result: Option<&'a Value>,
    pub error: Option<&'a RunError>,
}

/// `end` for runs that end differently, in one statement: the finishes a worker writes
/// together (`leasing::finish_many`). Only queued or running runs change; returns the
/// runs it ended.
pub(crate) async fn end_each(conn: &mut PgConnection, endings: &[RunEnd<'_>]) -> CoreResult<Vec<RunId>> {
    if endings.is_empty() {
        return Ok(Vec::new());
    }
    let ended = sqlx::query!(
        r#"WITH x AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[]) AS x(id, status, result, error)),
           r AS (
            UPDATE runs SET status = x.status::run_status, result = x.result, error = x.error,
                finished_at = clock_timestamp(), lease_owner = NULL, lease_expires_at = NULL, paused = false,
                held = false, not_before = NULL,
                cancel_requested = cancel_requested OR x.status = 'cancelled', updated_at = now()
            FROM x WHERE runs.id = x.id AND runs.status IN ('queued', 'running')
            RETURNING runs.id, runs.kind, runs.status, runs.attempt, runs.device_id, runs.schedule_id,
                      runs.started_at, runs.finished_at, x.result, x.error),
           e AS (INSERT INTO events (type, run_id, device_id, data)
           SELECT $5, r.id, r.device_id, jsonb_build_object('status', r.status, 'attempt', r.attempt,
                  'device_id', r.device_id, 'result', r.result, 'error', r.error,
                  'duration_ms', (extract(epoch FROM r.finished_at - r.started_at) * 1000)::bigint)
           FROM r),
           -- The steps already written (a workflow's earlier steps, an earlier attempt's)
           -- get the run's facts (migration 0013); steps written after this, in the same
           -- transaction, copy them from the ended row. A module run has none yet: one
           -- primary-key probe that finds nothing.
           s AS (UPDATE run_steps SET run_finished_at = r.finished_at, device_id = r.device_id,
                     run_kind = r.kind, schedule_id = r.schedule_id
                 FROM r WHERE run_steps.run_id = r.id)
           -- The events and stamps are written whether or not this reads them (a
           -- data-modifying CTE always runs to completion).
           SELECT id AS "id!: RunId", kind AS "kind!: RunKind", status AS "status!: RunStatus", started_at,
                  finished_at FROM r"#,
        &endings.iter().map(|e| e.id.0).collect::<Vec<_>>(),
        &endings.iter().map(|e| e.status.to_string()).collect::<Vec<_>>(),
        &endings.iter().map(|e| e.result.cloned()).collect::<Vec<_>>() as _,
        &endings.iter().map(|e| e.error.map(|e| Json(e.clone()))).collect::<Vec<_>>() as _,
        EventKind::RunFinished as EventKind,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(ended
        .into_iter()
        .map(|r| {
            let ran = r.started_at.zip(r.finished_at).and_then(|(s, f)| (f - s).to_std().ok());
            crate::meters::run_finished(r.kind, r.status, ran);
            r.id
        })
        .collect())
}

/// Asks the holders of running runs to stop (`cancel_requested`, `run.cancel_requested`).
pub(crate) async fn request_cancel(conn: &mut PgConnection, ids: &[RunId], reason: &str) -> CoreResult<Vec<RunId>> {
    Ok(sqlx::query_scalar!(
        r#"WITH r AS (
            UPDATE runs SET cancel_requested = true, updated_at = now()
            WHERE id = ANY ($1) AND status = 'running' AND NOT cancel_requested
            RETURNING id, attempt, device_id)
           INSERT INTO events (type, run_id, device_id, data)
           SELECT $2, r.id, r.device_id, jsonb_build_object('attempt', r.attempt, 'reason', $3::text) FROM r
           RETURNING run_id AS "id!: RunId""#,
        ids as &[RunId],
        EventKind::RunCancelRequested as EventKind,
        reason,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Sets a workflow's `paused` flag, with `run.paused` or `run.resumed`. A run resumed
/// while queued starts waiting for a device again (its queue-wait clock restarts).
pub(crate) async fn set_paused(conn: &mut PgConnection, run: &Locked, paused: bool) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE runs SET paused = $2, updated_at = now(),
            waiting_since = CASE WHEN status = 'queued' AND NOT $2 THEN clock_timestamp() ELSE waiting_since END
         WHERE id = $1",
        run.id as RunId,
        paused
    )
    .execute(&mut *conn)
    .await?;
    let kind = if paused { EventKind::RunPaused } else { EventKind::RunResumed };
    events::append(conn, kind, Subject::run(run.id, run.device_id), json!({})).await?;
    Ok(())
}

/// Writes (or rewrites) a step record.
pub(crate) async fn write_step(conn: &mut PgConnection, run: RunId, s: &RunStep) -> CoreResult<()> {
    write_steps(conn, &[(run, s)]).await
}

/// Writes (or rewrites) step records, of one run or several, in one statement.
pub(crate) async fn write_steps(conn: &mut PgConnection, steps: &[(RunId, &RunStep)]) -> CoreResult<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&RunStep) -> Option<DateTime<Utc>>| steps.iter().map(|(_, s)| f(s)).collect::<Vec<_>>();
    sqlx::query!(
        // The run's facts (migration 0013) are copied from its row as this transaction
        // sees it: a run that `end_each` ended just before carries its end, a run
        // still running or requeued none yet (its end stamps them).
        "INSERT INTO run_steps (run_id, idx, module, params, status, attempt, started_at, finished_at, result, error,
                                run_finished_at, device_id, run_kind, schedule_id)
         SELECT s.run_id, s.idx, s.module, s.params, s.status::step_status, s.attempt, s.started_at, s.finished_at,
                s.result, s.error, CASE WHEN r.status NOT IN ('queued', 'running') THEN r.finished_at END,
                r.device_id, r.kind, r.schedule_id
         FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::jsonb[], $5::text[], $6::int4[], $7::timestamptz[],
                     $8::timestamptz[], $9::jsonb[], $10::jsonb[])
              AS s(run_id, idx, module, params, status, attempt, started_at, finished_at, result, error)
         JOIN runs r ON r.id = s.run_id
         ON CONFLICT (run_id, idx) DO UPDATE SET module = EXCLUDED.module, params = EXCLUDED.params,
            status = EXCLUDED.status, attempt = EXCLUDED.attempt, started_at = EXCLUDED.started_at,
            finished_at = EXCLUDED.finished_at, result = EXCLUDED.result, error = EXCLUDED.error,
            run_finished_at = EXCLUDED.run_finished_at, device_id = EXCLUDED.device_id,
            run_kind = EXCLUDED.run_kind, schedule_id = EXCLUDED.schedule_id",
        &steps.iter().map(|(run, _)| run.0).collect::<Vec<_>>(),
        &steps.iter().map(|(_, s)| s.index).collect::<Vec<_>>(),
        &steps.iter().map(|(_, s)| s.module.clone()).collect::<Vec<_>>(),
        &steps.iter().map(|(_, s)| s.params.clone()).collect::<Vec<_>>(),
        &steps.iter().map(|(_, s)| s.status.to_string()).collect::<Vec<_>>(),
        &steps.iter().map(|(_, s)| s.attempt).collect::<Vec<_>>(),
        &col(&|s| s.started_at) as _,
        &col(&|s| s.finished_at) as _,
        &steps.iter().map(|(_, s)| s.result.clone()).collect::<Vec<_>>() as _,
        &steps.iter().map(|(_, s)| s.error.as_ref().map(|e| Json(e.clone()))).collect::<Vec<_>>() as _,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
