//! The `runs` and `run_steps` tables, split by protocol:
//!
//! - `creation`: inserting runs (with their `run.queued` event) and recording dispatch;
//! - `transitions`: the one SQL writer per kind of lifecycle change (start, requeue,
//!   end, request cancel, pause), which every protocol below shares;
//! - `leasing`: claim, renew, record steps, finish (the worker's side);
//! - `recovery`: expired leases, re-delivery, and runs that can never start;
//! - `control`: cancel, pause and resume (the user's side).
//!
//! Every decision is `lifecycle::decide`'s; these modules lock rows and write.

mod control;
mod creation;
mod hand_off;
mod leasing;
mod recovery;
mod transitions;

pub use control::{CancelOutcome, cancel, failed_children, set_paused};
pub use creation::{NewRun, insert_many, insert_tx, mark_dispatched};
pub use leasing::{
    ClaimOutcome, Claimed, FinishPolicy, FinishRequest, Finished, Outcome, Renewal, claim_for_device, claim_many,
    finish_many, free_device_for, record_step, renew,
};
pub use recovery::{
    Ended, abandon_overdue, abandon_unservable, due_for_dispatch, parents_of, recover_expired, waiting_for_device,
};
pub(crate) use transitions::{end, request_cancel};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreError, CoreResult,
    definition::RunDefinition,
    ids::{DeviceId, HostId, RunId, ScheduleId},
    launch::Idempotency,
    model::{ChildCounts, Lease, Run, RunKind, RunStatus, RunStep, Trigger},
    pagination::{Cursor, Page},
    run_error::RunError,
    selector::Selector,
};

/// A `runs` row, every column (so `SELECT *` and `RETURNING *` map onto it, and a new
/// column is a compile error until it is read here).
pub(crate) struct RunRow {
    pub id: RunId,
    pub kind: RunKind,
    pub target: String,
    pub definition: Json<RunDefinition>,
    pub params: Value,
    pub selector: Option<Json<Selector>>,
    pub device_id: Option<DeviceId>,
    pub status: RunStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub priority: i16,
    pub timeout_s: i32,
    pub trigger: Trigger,
    pub schedule_id: Option<ScheduleId>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub parent_run_id: Option<RunId>,
    pub retry_of: Option<RunId>,
    pub idempotency_key: Option<String>,
    pub paused: bool,
    pub cancel_requested: bool,
    pub not_before: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub queued_at: DateTime<Utc>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<Value>,
    pub error: Option<Json<RunError>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub held: bool,
    pub parent_index: Option<i32>,
    pub max_queue_wait_s: Option<i32>,
    pub waiting_since: DateTime<Utc>,
    pub host_id: Option<HostId>,
    pub idempotency_scope: Option<String>,
    pub idempotency_fingerprint: Option<String>,
    pub idempotency_expires_at: Option<DateTime<Utc>>,
    pub traceparent: Option<String>,
}

impl From<RunRow> for Run {
    fn from(r: RunRow) -> Run {
        let _ = (r.cancel_requested, r.dispatched_at, r.held, r.parent_index, r.waiting_since);
        let _ = (r.idempotency_scope, r.idempotency_fingerprint, r.idempotency_expires_at);
        Run {
            id: r.id,
            kind: r.kind,
            target: r.target,
            definition: r.definition.0,
            params: r.params,
            selector: r.selector.map(|s| s.0),
            device_id: r.device_id,
            host_id: r.host_id,
            status: r.status,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            priority: r.priority,
            timeout_s: r.timeout_s,
            max_queue_wait_s: r.max_queue_wait_s,
            trigger: r.trigger,
            schedule_id: r.schedule_id,
            scheduled_for: r.scheduled_for,
            parent_run_id: r.parent_run_id,
            retry_of: r.retry_of,
            idempotency_key: r.idempotency_key,
            paused: r.paused,
            not_before: r.not_before,
            queued_at: r.queued_at,
            enqueued_at: r.enqueued_at,
            duration_ms: match (r.started_at, r.finished_at) {
                (Some(s), Some(f)) if f >= s => Some((f - s).num_milliseconds()),
                _ => None,
            },
            started_at: r.started_at,
            finished_at: r.finished_at,
            result: r.result,
            error: r.error.map(|e| e.0),
            lease: r.lease_owner.map(|owner| Lease { run_id: r.id, owner, expires_at: r.lease_expires_at }),
            steps: None,
            children: None,
            created_at: r.created_at,
            updated_at: r.updated_at,
            // `00-<trace id>-<span id>-<flags>`: the id is the part a tracing UI searches by.
            trace_id: r.traceparent.as_deref().and_then(|t| t.get(3..35)).map(str::to_string),
            traceparent: r.traceparent,
        }
    }
}

/// One run with its steps (and, for a campaign run, its children's counts).
pub async fn get(pool: &PgPool, id: RunId) -> CoreResult<Run> {
    let mut conn = pool.acquire().await?;
    let mut run = find(&mut conn, id).await?.ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    run.steps = Some(steps(&mut conn, id).await?);
    if run.kind == RunKind::Campaign {
        run.children = Some(children_counts(&mut conn, id).await?);
    }
    Ok(run)
}

/// One run, without its steps.
pub async fn find(conn: &mut PgConnection, id: RunId) -> CoreResult<Option<Run>> {
    let row =
        sqlx::query_as!(RunRow, "SELECT * FROM runs WHERE id = $1", id as RunId).fetch_optional(&mut *conn).await?;
    Ok(row.map(Run::from))
}

/// The run an idempotency key already started (its insert was refused), or 422 when
/// the key came with another request.
pub async fn replay(conn: &mut PgConnection, idem: Option<&Idempotency>) -> CoreResult<Run> {
    let Some(i) = idem else {
        return Err(CoreError::Internal("a run insert was refused without an idempotency key".into()));
    };
    let row = sqlx::query_as!(
        RunRow,
        "SELECT * FROM runs WHERE idempotency_scope = $1 AND idempotency_key = $2",
        i.scope,
        i.key
    )
    .fetch_one(&mut *conn)
    .await?;
    if row.idempotency_fingerprint.as_deref() != Some(i.fingerprint.as_str()) {
        return Err(CoreError::IdempotencyKeyReused(format!(
            "Idempotency-Key {:?} was used for another request (run {}); use a new key for a new request",
            i.key, row.id
        )));
    }
    Ok(row.into())
}

/// A run's recorded steps, in order.
pub async fn steps(conn: &mut PgConnection, run: RunId) -> CoreResult<Vec<RunStep>> {
    Ok(sqlx::query!("SELECT * FROM run_steps WHERE run_id = $1 ORDER BY idx", run as RunId)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| RunStep {
            index: r.idx,
            module: r.module,
            params: r.params,
            status: r.status,
            attempt: r.attempt,
            started_at: r.started_at,
            finished_at: r.finished_at,
            result: r.result,
            error: r.error.map(|e| e.0),
        })
        .collect())
}

/// How many children of a campaign run are in each status.
pub async fn children_counts(conn: &mut PgConnection, parent: RunId) -> CoreResult<ChildCounts> {
    let rows = sqlx::query!(
        r#"SELECT status, count(*) AS "n!" FROM runs WHERE parent_run_id = $1 GROUP BY status"#,
        parent as RunId
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = ChildCounts::default();
    for r in rows {
        counts.add(r.status, r.n);
    }
    Ok(counts)
}

/// Whether a run exists (for 404s on sub-resources).
pub async fn exists(pool: &PgPool, id: RunId) -> CoreResult<bool> {
    Ok(sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1) AS "exists!""#, id as RunId)
        .fetch_one(pool)
        .await?)
}

/// Filters of `GET /runs`.
#[derive(Debug, Default, Clone)]
pub struct RunFilter {
    /// Only this status.
    pub status: Option<RunStatus>,
    /// Only this kind.
    pub kind: Option<RunKind>,
    /// Only runs of this device.
    pub device_id: Option<DeviceId>,
    /// Only children of this campaign run.
    pub parent_run_id: Option<RunId>,
    /// Only runs of this schedule.
    pub schedule_id: Option<ScheduleId>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
}

/// Runs newest first (by creation), filtered, one page. Each filter is a parameter
/// that is either null (no filter) or compared, so one prepared statement serves all.
pub async fn list(pool: &PgPool, f: &RunFilter, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Run>> {
    let rows = sqlx::query_as!(
        RunRow,
        "SELECT * FROM runs
         WHERE ($1::run_status IS NULL OR status = $1)
           AND ($2::run_kind IS NULL OR kind = $2)
           AND ($3::uuid IS NULL OR device_id = $3)
           AND ($4::uuid IS NULL OR parent_run_id = $4)
           AND ($5::uuid IS NULL OR schedule_id = $5)
           AND ($6::timestamptz IS NULL OR created_at >= $6)
           AND ($7::timestamptz IS NULL OR created_at < $7)
           AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9))
         ORDER BY created_at DESC, id DESC
         LIMIT $10",
        f.status as Option<RunStatus>,
        f.kind as Option<RunKind>,
        f.device_id as Option<DeviceId>,
        f.parent_run_id as Option<RunId>,
        f.schedule_id as Option<ScheduleId>,
        f.since,
        f.until,
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(Run::from).collect();
    Ok(Page::from_rows(items, limit, |r: &Run| Cursor { created_at: r.created_at, id: r.id.0 }))
}
