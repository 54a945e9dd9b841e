//! The `runs` and `run_steps` tables: creation, listing, and the claim / renew / finish
//! protocol that gives "at most one holder" (ARCHITECTURE.md, "The durability model").
//!
//! Waiting without lost wake-ups: a claimer that finds no device commits, then checks
//! again whether a matching device is free (and retries); a releaser commits the
//! release, then looks for the best waiting run (`claim_for_device`). Each side publishes
//! its state before it looks at the other's, so one of them always sees the other.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use std::time::Duration;
use uuid::Uuid;

use crate::{
    CoreError, CoreResult,
    breaker::{self, BreakerRow, Effect, Transition},
    model::{BreakerState, Device, Lease, Run, RunKind, RunStatus, RunStep, StepStatus, Trigger, event_types},
    pagination::{Cursor, Page},
    repo::{
        devices::{self, device_columns, selector_matches},
        events::{self, Subject},
    },
    selector::Selector,
};

macro_rules! run_columns {
    () => {
        "r.id, r.kind, r.target, r.definition, r.params, r.selector, r.device_id, r.status, r.attempt, \
         r.max_attempts, r.priority, r.timeout_s, r.trigger, r.schedule_id, r.scheduled_for, r.parent_run_id, \
         r.retry_of, r.idempotency_key, r.paused, r.not_before, r.queued_at, r.enqueued_at, r.started_at, \
         r.finished_at, r.result, r.error, r.lease_owner, r.lease_expires_at, r.created_at, r.updated_at"
    };
}

/// Devices `d` that may take a run now.
macro_rules! claimable {
    () => {
        "d.status = 'online' AND d.lease_run_id IS NULL \
         AND (d.breaker_state = 'closed' OR (d.breaker_state = 'open' AND d.breaker_open_until <= now()))"
    };
}

fn decode<T: std::str::FromStr<Err = String>>(col: &str, s: String) -> Result<T, sqlx::Error> {
    s.parse::<T>().map_err(|e| sqlx::Error::Decode(format!("bad {col}: {e}").into()))
}

fn from_row(r: &PgRow) -> Result<Run, sqlx::Error> {
    let selector: Option<Value> = r.try_get("selector")?;
    let started_at: Option<DateTime<Utc>> = r.try_get("started_at")?;
    let finished_at: Option<DateTime<Utc>> = r.try_get("finished_at")?;
    let lease_owner: Option<String> = r.try_get("lease_owner")?;
    let id: Uuid = r.try_get("id")?;
    Ok(Run {
        id,
        kind: decode("kind", r.try_get("kind")?)?,
        target: r.try_get("target")?,
        definition: r.try_get("definition")?,
        params: r.try_get("params")?,
        selector: selector.and_then(|s| serde_json::from_value(s).ok()),
        device_id: r.try_get("device_id")?,
        status: decode("status", r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        max_attempts: r.try_get("max_attempts")?,
        priority: r.try_get("priority")?,
        timeout_s: r.try_get("timeout_s")?,
        trigger: decode("trigger", r.try_get("trigger")?)?,
        schedule_id: r.try_get("schedule_id")?,
        scheduled_for: r.try_get("scheduled_for")?,
        parent_run_id: r.try_get("parent_run_id")?,
        retry_of: r.try_get("retry_of")?,
        idempotency_key: r.try_get("idempotency_key")?,
        paused: r.try_get("paused")?,
        not_before: r.try_get("not_before")?,
        queued_at: r.try_get("queued_at")?,
        enqueued_at: r.try_get("enqueued_at")?,
        started_at,
        finished_at,
        duration_ms: match (started_at, finished_at) {
            (Some(s), Some(f)) if f >= s => Some((f - s).num_milliseconds()),
            _ => None,
        },
        result: r.try_get("result")?,
        error: r.try_get("error")?,
        lease: lease_owner.map(|owner| Lease { run_id: id, owner, expires_at: r.try_get("lease_expires_at").ok().flatten() }),
        steps: None,
        children: None,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn step_from_row(r: &PgRow) -> Result<RunStep, sqlx::Error> {
    Ok(RunStep {
        index: r.try_get("idx")?,
        module: r.try_get("module")?,
        params: r.try_get("params")?,
        status: decode("status", r.try_get("status")?)?,
        attempt: r.try_get("attempt")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
    })
}

/// A run to create, already validated.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub kind: RunKind,
    pub target: String,
    pub definition: Value,
    pub params: Value,
    pub selector: Option<Selector>,
    pub priority: i16,
    pub timeout_s: i32,
    pub max_attempts: i32,
    pub trigger: Trigger,
    pub schedule_id: Option<Uuid>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub parent_run_id: Option<Uuid>,
    pub retry_of: Option<Uuid>,
    pub idempotency_key: Option<String>,
    /// A campaign child waits held until its campaign admits it.
    pub held: bool,
    pub parent_index: Option<i32>,
}

impl NewRun {
    /// A run of `kind`/`target` with the defaults every trigger shares.
    pub fn new(kind: RunKind, target: String, definition: Value, params: Value, selector: Option<Selector>) -> NewRun {
        NewRun {
            kind,
            target,
            definition,
            params,
            selector,
            priority: 5,
            timeout_s: 3600,
            max_attempts: 3,
            trigger: Trigger::Api,
            schedule_id: None,
            scheduled_for: None,
            parent_run_id: None,
            retry_of: None,
            idempotency_key: None,
            held: false,
            parent_index: None,
        }
    }
}

/// Inserts a queued run and its `run.queued` event, atomically. With an idempotency key
/// already used, returns the first run and `false`.
pub async fn insert(pool: &PgPool, new: &NewRun) -> CoreResult<(Run, bool)> {
    // One statement inserts the run and its event: atomic without a transaction block,
    // and one round trip on the enqueue path.
    let mut conn = pool.acquire().await?;
    let Some(run) = insert_tx(&mut conn, new, RunStatus::Queued).await? else {
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        let existing = sqlx::query(concat!("SELECT ", run_columns!(), " FROM runs r WHERE r.idempotency_key = $1"))
            .bind(key)
            .fetch_one(pool)
            .await?;
        return Ok((from_row(&existing)?, false));
    };
    Ok((run, true))
}

/// Inserts a run and its `run.queued` event in one statement (plus `run.started` for a
/// campaign created running), on the caller's connection or transaction. `None` when
/// the idempotency key is taken (then nothing is written).
pub async fn insert_tx(tx: &mut PgConnection, new: &NewRun, status: RunStatus) -> CoreResult<Option<Run>> {
    let selector = new.selector.as_ref().map(Selector::to_json);
    let queued_event = json!({"kind": new.kind, "target": new.target, "priority": new.priority, "trigger": new.trigger,
        "attempt": 1, "selector": selector, "parent_run_id": new.parent_run_id,
        "scheduled_for": new.scheduled_for, "retry_of": new.retry_of});
    let row = sqlx::query(concat!(
        "WITH r AS (INSERT INTO runs (id, kind, target, definition, params, selector, priority, timeout_s, max_attempts,
             trigger, schedule_id, scheduled_for, parent_run_id, retry_of, idempotency_key, held, parent_index, status,
             started_at, queued_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                 CASE WHEN $18 = 'running' THEN now() END, clock_timestamp())
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING *),
         e AS (INSERT INTO events (type, run_id, schedule_id, data) SELECT 'run.queued', r.id, r.schedule_id, $19 FROM r)
         SELECT ",
        run_columns!(),
        " FROM r"
    ))
    .bind(Uuid::new_v4())
    .bind(new.kind.as_str())
    .bind(&new.target)
    .bind(&new.definition)
    .bind(&new.params)
    .bind(&selector)
    .bind(new.priority)
    .bind(new.timeout_s)
    .bind(new.max_attempts)
    .bind(new.trigger.as_str())
    .bind(new.schedule_id)
    .bind(new.scheduled_for)
    .bind(new.parent_run_id)
    .bind(new.retry_of)
    .bind(&new.idempotency_key)
    .bind(new.held)
    .bind(new.parent_index)
    .bind(status.as_str())
    .bind(&queued_event)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let run = from_row(&row)?;
    let subject = Subject { run_id: Some(run.id), schedule_id: run.schedule_id, device_id: None };
    if status == RunStatus::Running {
        events::append(tx, event_types::RUN_STARTED, subject, json!({"attempt": run.attempt})).await?;
    }
    Ok(Some(run))
}

/// Records that runs were pushed to the queue.
pub async fn mark_dispatched(pool: &PgPool, ids: &[Uuid]) -> CoreResult<()> {
    sqlx::query(
        "UPDATE runs SET dispatched_at = CASE WHEN status = 'queued' THEN now() ELSE dispatched_at END,
                enqueued_at = COALESCE(enqueued_at, clock_timestamp())
         WHERE id = ANY ($1)",
    )
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// One run with its steps.
pub async fn get(pool: &PgPool, id: Uuid) -> CoreResult<Run> {
    let row = sqlx::query(concat!("SELECT ", run_columns!(), " FROM runs r WHERE r.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    let mut run = from_row(&row)?;
    run.steps = Some(steps(pool, id).await?);
    if run.kind == RunKind::Campaign {
        run.children = Some(children_counts(pool, id).await?);
    }
    Ok(run)
}

/// A run's recorded steps, in order.
pub async fn steps(pool: &PgPool, run_id: Uuid) -> CoreResult<Vec<RunStep>> {
    let rows = sqlx::query("SELECT * FROM run_steps WHERE run_id = $1 ORDER BY idx").bind(run_id).fetch_all(pool).await?;
    Ok(rows.iter().map(step_from_row).collect::<Result<_, _>>()?)
}

/// How many children of a campaign run are in each status (and `total`).
pub async fn children_counts(pool: &PgPool, parent: Uuid) -> CoreResult<Value> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM runs WHERE parent_run_id = $1 GROUP BY status")
        .bind(parent)
        .fetch_all(pool)
        .await?;
    let mut counts = serde_json::Map::new();
    for status in RunStatus::ALL {
        counts.insert(status.to_string(), json!(0));
    }
    let mut total = 0i64;
    for r in &rows {
        let n: i64 = r.try_get("n")?;
        total += n;
        counts.insert(r.try_get::<String, _>("status")?, json!(n));
    }
    counts.insert("total".into(), json!(total));
    Ok(Value::Object(counts))
}

/// Whether a run exists (for 404s on sub-resources).
pub async fn exists(pool: &PgPool, id: Uuid) -> CoreResult<bool> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1)").bind(id).fetch_one(pool).await?)
}

/// Filters of `GET /runs`.
#[derive(Debug, Default, Clone)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub kind: Option<RunKind>,
    pub device_id: Option<Uuid>,
    pub parent_run_id: Option<Uuid>,
    pub schedule_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Runs newest first (by creation), filtered, one page.
pub async fn list(pool: &PgPool, f: &RunFilter, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Run>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        run_columns!(),
        " FROM runs r
         WHERE ($1::text IS NULL OR r.status = $1)
           AND ($2::text IS NULL OR r.kind = $2)
           AND ($3::uuid IS NULL OR r.device_id = $3)
           AND ($4::uuid IS NULL OR r.parent_run_id = $4)
           AND ($5::uuid IS NULL OR r.schedule_id = $5)
           AND ($6::timestamptz IS NULL OR r.created_at >= $6)
           AND ($7::timestamptz IS NULL OR r.created_at < $7)
           AND ($8::timestamptz IS NULL OR (r.created_at, r.id) < ($8, $9))
         ORDER BY r.created_at DESC, r.id DESC
         LIMIT $10"
    ))
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.kind.map(|k| k.as_str()))
    .bind(f.device_id)
    .bind(f.parent_run_id)
    .bind(f.schedule_id)
    .bind(f.since)
    .bind(f.until)
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |r| Cursor { created_at: r.created_at, id: r.id }))
}

/// A run this worker now holds, with its device.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub run: Run,
    pub device: Device,
    /// The fencing token: every later write must carry it.
    pub attempt: i32,
    /// True when this run is the half-open probe of the device's breaker.
    pub probe: bool,
}

#[derive(Debug)]
pub enum ClaimOutcome {
    Claimed(Box<Claimed>),
    /// Queued, but no matching device is free: left queued, holding nothing.
    NoDevice,
    /// Queued with a `not_before` in the future (a retry backing off).
    NotYet(DateTime<Utc>),
    /// Someone else holds it, or it is no longer queued: nothing to do.
    NotClaimable,
}

/// Claims a queued run and a free matching device, in one transaction.
pub async fn claim(pool: &PgPool, run_id: Uuid, owner: &str, ttl: Duration) -> CoreResult<ClaimOutcome> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT status, selector, kind, held, not_before, (not_before IS NOT NULL AND not_before > now()) AS later
         FROM runs WHERE id = $1 FOR UPDATE",
    )
    .bind(run_id)
    .fetch_optional(&mut *tx)
    .await?;
    // Wait for the row rather than SKIP LOCKED: every other writer of a run row (the
    // API recording its dispatch, a cancel, another claimer) holds it for a moment,
    // and skipping would drop this delivery while the run stays queued.
    let Some(row) = row else { return Ok(ClaimOutcome::NotClaimable) };
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("kind")?;
    if status != "queued" || kind == "campaign" || row.try_get::<bool, _>("held")? {
        return Ok(ClaimOutcome::NotClaimable);
    }
    if row.try_get::<bool, _>("later")? {
        return Ok(ClaimOutcome::NotYet(row.try_get::<Option<DateTime<Utc>>, _>("not_before")?.unwrap_or_else(Utc::now)));
    }
    let selector: Option<Value> = row.try_get("selector")?;
    let Some(selector) = selector else { return Ok(ClaimOutcome::NotClaimable) };
    let device = sqlx::query(concat!(
        "SELECT d.id FROM devices d WHERE ",
        claimable!(),
        " AND ",
        selector_matches!("$1::jsonb"),
        " ORDER BY (d.breaker_state = 'closed') DESC, d.updated_at, d.id LIMIT 1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(&selector)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(device) = device else {
        tx.commit().await?;
        return Ok(ClaimOutcome::NoDevice);
    };
    let device_id: Uuid = device.try_get("id")?;
    let claimed = assign(&mut tx, run_id, device_id, owner, ttl).await?;
    tx.commit().await?;
    Ok(ClaimOutcome::Claimed(Box::new(claimed)))
}

/// `claim`, and when no device was free, look once more after committing (a device
/// released meanwhile may have missed this run while we held its row).
pub async fn claim_with_recheck(pool: &PgPool, run_id: Uuid, owner: &str, ttl: Duration) -> CoreResult<ClaimOutcome> {
    let mut outcome = claim(pool, run_id, owner, ttl).await?;
    for _ in 0..3 {
        if !matches!(outcome, ClaimOutcome::NoDevice) {
            break;
        }
        let selector: Option<Value> = sqlx::query_scalar("SELECT selector FROM runs WHERE id = $1 AND status = 'queued'")
            .bind(run_id)
            .fetch_optional(pool)
            .await?
            .flatten();
        let Some(selector) = selector else { break };
        let mut conn = pool.acquire().await?;
        if !devices::any_claimable(&mut conn, &selector).await? {
            break;
        }
        outcome = claim(pool, run_id, owner, ttl).await?;
    }
    Ok(outcome)
}

/// After a device is released: the best queued run it can serve (priority, then age),
/// claimed with that device.
pub async fn claim_for_device(pool: &PgPool, device_id: Uuid, owner: &str, ttl: Duration) -> CoreResult<Option<Claimed>> {
    let mut tx = pool.begin().await?;
    let device = sqlx::query(concat!("SELECT d.id FROM devices d WHERE d.id = $1 AND ", claimable!(), " FOR UPDATE SKIP LOCKED"))
        .bind(device_id)
        .fetch_optional(&mut *tx)
        .await?;
    if device.is_none() {
        return Ok(None);
    }
    let run = sqlx::query(concat!(
        "SELECT r.id FROM runs r, devices d WHERE d.id = $1 AND r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held
           AND (r.not_before IS NULL OR r.not_before <= now()) AND r.selector IS NOT NULL AND ",
        selector_matches!("r.selector"),
        " ORDER BY r.priority DESC, r.queued_at, r.id LIMIT 1 FOR UPDATE OF r SKIP LOCKED"
    ))
    .bind(device_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(run) = run else {
        tx.commit().await?;
        return Ok(None);
    };
    let claimed = assign(&mut tx, run.try_get("id")?, device_id, owner, ttl).await?;
    tx.commit().await?;
    Ok(Some(claimed))
}

/// Leases the (locked, claimable) device and the (locked, queued) run to `owner`.
async fn assign(tx: &mut PgConnection, run_id: Uuid, device_id: Uuid, owner: &str, ttl: Duration) -> CoreResult<Claimed> {
    let ttl_s = ttl.as_secs_f64();
    let drow = sqlx::query(concat!(
        "WITH prev AS (SELECT breaker_state FROM devices WHERE id = $1),
         d AS (UPDATE devices SET lease_run_id = $2, lease_owner = $3,
                 lease_expires_at = now() + make_interval(secs => $4),
                 breaker_state = CASE WHEN breaker_state = 'open' THEN 'half_open' ELSE breaker_state END,
                 updated_at = now()
               WHERE id = $1 RETURNING *)
         SELECT (SELECT breaker_state FROM prev) AS prev_breaker, ",
        device_columns!(),
        " FROM d"
    ))
    .bind(device_id)
    .bind(run_id)
    .bind(owner)
    .bind(ttl_s)
    .fetch_one(&mut *tx)
    .await?;
    let probe = drow.try_get::<String, _>("prev_breaker")? == "open";
    let device = devices::from_row(&drow)?;
    let rrow = sqlx::query(concat!(
        "WITH r AS (UPDATE runs SET status = 'running', device_id = $2, lease_owner = $3,
                 lease_expires_at = now() + make_interval(secs => $4), started_at = now(), finished_at = NULL,
                 not_before = NULL, updated_at = now()
               WHERE id = $1 RETURNING *) SELECT ",
        run_columns!(),
        " FROM r"
    ))
    .bind(run_id)
    .bind(device_id)
    .bind(owner)
    .bind(ttl_s)
    .fetch_one(&mut *tx)
    .await?;
    let run = from_row(&rrow)?;
    events::append(
        tx,
        event_types::RUN_STARTED,
        Subject::run(run_id, Some(device_id)),
        json!({"attempt": run.attempt, "device_id": device_id, "serial": device.serial, "worker": owner, "probe": probe}),
    )
    .await?;
    Ok(Claimed { attempt: run.attempt, run, device, probe })
}

/// Result of a lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Held { cancel_requested: bool, paused: bool },
    /// The run is no longer ours (recovered, cancelled, finished): stop working on it.
    Lost,
}

/// Extends the run's and the device's leases, if this worker still holds them.
pub async fn renew(pool: &PgPool, run_id: Uuid, attempt: i32, owner: &str, ttl: Duration) -> CoreResult<Renewal> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "UPDATE runs SET lease_expires_at = now() + make_interval(secs => $4)
         WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease_owner = $3
         RETURNING cancel_requested, paused",
    )
    .bind(run_id)
    .bind(attempt)
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(Renewal::Lost) };
    sqlx::query(
        "UPDATE devices SET lease_expires_at = now() + make_interval(secs => $3) WHERE lease_run_id = $1 AND lease_owner = $2",
    )
    .bind(run_id)
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Renewal::Held { cancel_requested: row.try_get("cancel_requested")?, paused: row.try_get("paused")? })
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The module ran and passed.
    Passed { result: Value },
    /// The module ran and reported a failed check: never retried.
    Failed { result: Value },
    /// Infrastructure error. `retry_at` set: back to `queued` until then; else `errored`.
    Error { error: Value, retry_at: Option<DateTime<Utc>> },
    /// The run's time budget ran out.
    TimedOut { error: Value },
    /// Cancelled by a user.
    Cancelled { error: Value },
    /// The worker is stopping: back to `queued` at once, without spending an attempt
    /// (`attempt` grows, and so does `max_attempts`).
    HandBack { error: Value },
}

impl Outcome {
    fn status(&self) -> RunStatus {
        match self {
            Outcome::Passed { .. } => RunStatus::Succeeded,
            Outcome::Failed { .. } => RunStatus::Failed,
            Outcome::Error { retry_at: Some(_), .. } => RunStatus::Queued,
            Outcome::Error { retry_at: None, .. } => RunStatus::Errored,
            Outcome::TimedOut { .. } => RunStatus::TimedOut,
            Outcome::Cancelled { .. } => RunStatus::Cancelled,
            Outcome::HandBack { .. } => RunStatus::Queued,
        }
    }
    fn effect(&self) -> Effect {
        match self {
            Outcome::Passed { .. } | Outcome::Failed { .. } => Effect::Healthy,
            Outcome::Error { .. } | Outcome::TimedOut { .. } => Effect::Failure,
            Outcome::Cancelled { .. } | Outcome::HandBack { .. } => Effect::Neutral,
        }
    }
}

/// Breaker settings the finishing worker applies.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    pub threshold: i32,
    pub cooldown_s: i64,
}

/// What `finish` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Written; the run's new status.
    Written(RunStatus),
    /// This worker no longer holds the run (fencing): nothing was changed.
    Refused,
}

/// Writes an attempt's outcome, its steps and events, releases the device and updates
/// its breaker, in one transaction, only if `owner` still holds attempt `attempt`.
pub async fn finish(
    pool: &PgPool,
    claimed: &Claimed,
    owner: &str,
    outcome: &Outcome,
    steps: &[RunStep],
    policy: BreakerPolicy,
) -> CoreResult<Finished> {
    let run_id = claimed.run.id;
    let device_id = claimed.device.id;
    let status = outcome.status();
    let (result, error, retry_at) = match outcome {
        Outcome::Passed { result } | Outcome::Failed { result } => (Some(result.clone()), None, None),
        Outcome::Error { error, retry_at } => (None, Some(error.clone()), *retry_at),
        Outcome::TimedOut { error } | Outcome::Cancelled { error } | Outcome::HandBack { error } => {
            (None, Some(error.clone()), None)
        }
    };
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        // A run whose cancel was requested never goes back to the queue: it ends
        // `cancelled` instead of being retried or handed back.
        "WITH w AS (SELECT id, ($4 = 'queued' AND cancel_requested) AS cancel_instead FROM runs
                    WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease_owner = $3 FOR UPDATE)
         UPDATE runs r SET status = CASE WHEN w.cancel_instead THEN 'cancelled' ELSE $4 END,
                result = $5, error = $6, finished_at = clock_timestamp(),
                lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
                paused = r.paused AND $4 = 'queued' AND NOT w.cancel_instead,
                attempt = CASE WHEN $4 = 'queued' AND NOT w.cancel_instead THEN r.attempt + 1 ELSE r.attempt END,
                not_before = CASE WHEN $4 = 'queued' AND NOT w.cancel_instead THEN $7 ELSE NULL END,
                max_attempts = CASE WHEN $8 AND NOT w.cancel_instead THEN r.max_attempts + 1 ELSE r.max_attempts END
         FROM w WHERE r.id = w.id
         RETURNING r.status, r.started_at, r.finished_at, r.attempt",
    )
    .bind(run_id)
    .bind(claimed.attempt)
    .bind(owner)
    .bind(status.as_str())
    .bind(&result)
    .bind(&error)
    .bind(retry_at)
    .bind(matches!(outcome, Outcome::HandBack { .. }))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.rollback().await.ok();
        refuse(pool, claimed, owner, status).await?;
        return Ok(Finished::Refused);
    };
    let status: RunStatus = decode("status", row.try_get("status")?)?;
    let started_at: Option<DateTime<Utc>> = row.try_get("started_at")?;
    let finished_at: DateTime<Utc> = row.try_get("finished_at")?;
    let duration_ms = started_at.map(|s| (finished_at - s).num_milliseconds());
    for step in steps {
        write_step(&mut tx, run_id, step).await?;
    }
    release_device(&mut tx, claimed, owner, outcome.effect(), policy).await?;
    let subject = Subject::run(run_id, Some(device_id));
    if status == RunStatus::Queued {
        events::append(
            &mut tx,
            event_types::RUN_REQUEUED,
            subject,
            json!({"attempt": claimed.attempt, "next_attempt": row.try_get::<i32, _>("attempt")?,
                   "error": error, "not_before": retry_at, "device_id": device_id,
                   "reason": if matches!(outcome, Outcome::HandBack { .. }) { "handed_back" } else { "retry" }}),
        )
        .await?;
    } else {
        events::append(
            &mut tx,
            event_types::RUN_FINISHED,
            subject,
            json!({"status": status, "attempt": claimed.attempt, "device_id": device_id, "duration_ms": duration_ms,
                   "result": result, "error": error}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Finished::Written(status))
}

/// Records a refused late write (a zombie worker): logged and kept as an event.
async fn refuse(pool: &PgPool, claimed: &Claimed, owner: &str, wanted: RunStatus) -> CoreResult<()> {
    tracing::warn!(run_id = %claimed.run.id, attempt = claimed.attempt, owner, wanted = %wanted,
        "late write refused: this worker no longer holds the run");
    let mut conn = pool.acquire().await?;
    events::append(
        &mut conn,
        event_types::RUN_LATE_WRITE_REFUSED,
        Subject::run(claimed.run.id, Some(claimed.device.id)),
        json!({"attempt": claimed.attempt, "worker": owner, "wanted_status": wanted}),
    )
    .await?;
    Ok(())
}

async fn write_step(tx: &mut PgConnection, run_id: Uuid, s: &RunStep) -> CoreResult<()> {
    sqlx::query(
        "INSERT INTO run_steps (run_id, idx, module, params, status, attempt, started_at, finished_at, result, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (run_id, idx) DO UPDATE SET module = EXCLUDED.module, params = EXCLUDED.params,
            status = EXCLUDED.status, attempt = EXCLUDED.attempt, started_at = EXCLUDED.started_at,
            finished_at = EXCLUDED.finished_at, result = EXCLUDED.result, error = EXCLUDED.error",
    )
    .bind(run_id)
    .bind(s.index)
    .bind(&s.module)
    .bind(&s.params)
    .bind(s.status.as_str())
    .bind(s.attempt)
    .bind(s.started_at)
    .bind(s.finished_at)
    .bind(&s.result)
    .bind(&s.error)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Frees the device this run held and applies the breaker arithmetic.
async fn release_device(tx: &mut PgConnection, claimed: &Claimed, owner: &str, effect: Effect, policy: BreakerPolicy) -> CoreResult<()> {
    let device_id = claimed.device.id;
    let row = sqlx::query(
        "SELECT breaker_state, breaker_failures, breaker_trips, breaker_open_until, now() AS now
         FROM devices WHERE id = $1 AND lease_run_id = $2 AND lease_owner = $3 FOR UPDATE",
    )
    .bind(device_id)
    .bind(claimed.run.id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let current = BreakerRow {
        state: decode::<BreakerState>("breaker_state", row.try_get("breaker_state")?)?,
        failures: row.try_get("breaker_failures")?,
        trips: row.try_get("breaker_trips")?,
        open_until: row.try_get("breaker_open_until")?,
    };
    let now: DateTime<Utc> = row.try_get("now")?;
    let (next, transition) = breaker::next(current, effect, policy.threshold, policy.cooldown_s, now);
    sqlx::query(
        "UPDATE devices SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
            breaker_state = $2, breaker_failures = $3, breaker_trips = $4, breaker_open_until = $5, updated_at = now()
         WHERE id = $1",
    )
    .bind(device_id)
    .bind(next.state.as_str())
    .bind(next.failures)
    .bind(next.trips)
    .bind(next.open_until)
    .execute(&mut *tx)
    .await?;
    if let Some(t) = transition {
        let kind = match t {
            Transition::Opened => "device.breaker_opened",
            Transition::Closed => "device.breaker_closed",
        };
        events::append(
            tx,
            kind,
            Subject { device_id: Some(device_id), run_id: Some(claimed.run.id), schedule_id: None },
            json!({"consecutive_failures": next.failures, "open_until": next.open_until, "trips": next.trips}),
        )
        .await?;
    }
    Ok(())
}

/// The step rows a module run records: one, index 0.
pub fn module_step(claimed: &Claimed, status: StepStatus, started_at: DateTime<Utc>, result: Option<Value>, error: Option<Value>) -> RunStep {
    RunStep {
        index: 0,
        module: claimed.run.target.clone(),
        params: claimed.run.params.clone(),
        status,
        attempt: claimed.attempt,
        started_at: Some(started_at),
        finished_at: Some(Utc::now()),
        result,
        error,
    }
}

/// Queued runs due for (re)delivery, best first: never pushed (a lost push), or pushed
/// more than `stale` ago and still queued while a matching device is free now (Redis
/// lost the job, or the device recovered: breaker cooldown over, back online). Runs
/// that wait for a busy device are left alone: the releasing worker hands the device
/// over.
pub async fn due_for_dispatch(pool: &PgPool, stale: Duration, limit: i64) -> CoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT r.id FROM runs r
         WHERE r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND (r.not_before IS NULL OR r.not_before <= now())
           AND ((r.dispatched_at IS NULL AND r.queued_at < now() - interval '2 seconds')
                OR (r.dispatched_at < now() - make_interval(secs => $1)
                    AND EXISTS (SELECT 1 FROM devices d WHERE ",
        claimable!(),
        " AND ",
        selector_matches!("r.selector"),
        ")))
         ORDER BY r.priority DESC, r.queued_at LIMIT $2"
    ))
    .bind(stale.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Recovery of runs whose worker stopped renewing the lease (killed, frozen, cut off):
/// back to `queued` with `attempt + 1`, or `errored` when attempts are spent; their
/// devices are freed. Safe to run in several processes at once (`SKIP LOCKED`).
/// Returns the ids put back in the queue.
pub async fn recover_expired(pool: &PgPool, limit: i64) -> CoreResult<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, attempt, max_attempts, device_id, lease_owner, cancel_requested FROM runs
         WHERE status = 'running' AND lease_expires_at < now()
         ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut requeued = Vec::new();
    for row in &rows {
        let id: Uuid = row.try_get("id")?;
        let attempt: i32 = row.try_get("attempt")?;
        let max_attempts: i32 = row.try_get("max_attempts")?;
        let device_id: Option<Uuid> = row.try_get("device_id")?;
        let owner: Option<String> = row.try_get("lease_owner")?;
        let cancel_requested: bool = row.try_get("cancel_requested")?;
        // A requested cancel wins; otherwise retry while attempts remain.
        let (status, error) = if cancel_requested {
            (RunStatus::Cancelled, json!({"kind": "cancelled", "message": "cancelled; its worker stopped renewing its lease", "worker": owner}))
        } else if attempt < max_attempts {
            (RunStatus::Queued, json!({"kind": "lease_expired", "message": "the worker stopped renewing its lease", "worker": owner}))
        } else {
            (RunStatus::Errored, json!({"kind": "lease_expired", "message": "the worker stopped renewing its lease", "worker": owner}))
        };
        sqlx::query(
            "UPDATE runs SET status = $2, error = $3, lease_owner = NULL, lease_expires_at = NULL,
                paused = paused AND $2 = 'queued',
                finished_at = clock_timestamp(), not_before = NULL, updated_at = now(),
                attempt = CASE WHEN $2 = 'queued' THEN attempt + 1 ELSE attempt END,
                dispatched_at = CASE WHEN $2 = 'queued' THEN NULL ELSE dispatched_at END
             WHERE id = $1",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(&error)
        .execute(&mut *tx)
        .await?;
        let subject = Subject::run(id, device_id);
        if status == RunStatus::Queued {
            let data = json!({"attempt": attempt, "next_attempt": attempt + 1, "error": error, "device_id": device_id, "reason": "lease_expired"});
            events::append(&mut tx, event_types::RUN_REQUEUED, subject, data).await?;
            requeued.push(id);
        } else {
            let data = json!({"status": status, "attempt": attempt, "device_id": device_id, "error": error});
            events::append(&mut tx, event_types::RUN_FINISHED, subject, data).await?;
        }
        // A dead worker says nothing about the device: free it; a probe that died is retried.
        sqlx::query(
            "UPDATE devices SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
                breaker_state = CASE WHEN breaker_state = 'half_open' THEN 'open' ELSE breaker_state END,
                breaker_open_until = CASE WHEN breaker_state = 'half_open' THEN now() ELSE breaker_open_until END,
                updated_at = now()
             WHERE lease_run_id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    // Leases whose run is not running any more (should not happen; belt and braces).
    sqlx::query(
        "UPDATE devices d SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE d.lease_run_id IS NOT NULL AND d.lease_expires_at < now()
           AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = d.lease_run_id AND r.status = 'running')",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(requeued)
}

/// Queued runs (best first) that this device could serve now: pushed again when a
/// device joins, comes back online or has its breaker reset.
pub async fn waiting_for_device(pool: &PgPool, device_id: Uuid, limit: i64) -> CoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT r.id FROM runs r, devices d WHERE d.id = $1 AND ",
        claimable!(),
        " AND r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND (r.not_before IS NULL OR r.not_before <= now())
           AND r.selector IS NOT NULL AND ",
        selector_matches!("r.selector"),
        " ORDER BY r.priority DESC, r.queued_at LIMIT $2"
    ))
    .bind(device_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// What a cancel request did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// It was queued: now `cancelled`.
    Cancelled,
    /// It is running: its worker is asked to interrupt it.
    Requested,
    /// Already terminal: nothing changed.
    Terminal(RunStatus),
}

/// Cancels a queued run at once, or asks the worker of a running one to interrupt it.
pub async fn cancel(pool: &PgPool, id: Uuid, reason: &str) -> CoreResult<CancelOutcome> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query("SELECT status, attempt, device_id FROM runs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    let status: RunStatus = decode("status", row.try_get("status")?)?;
    let attempt: i32 = row.try_get("attempt")?;
    let device_id: Option<Uuid> = row.try_get("device_id")?;
    let outcome = match status {
        RunStatus::Queued => {
            let error = json!({"kind": "cancelled", "message": reason});
            sqlx::query(
                "UPDATE runs SET status = 'cancelled', finished_at = clock_timestamp(), error = $2, not_before = NULL,
                    cancel_requested = true, paused = false, updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(&error)
            .execute(&mut *tx)
            .await?;
            events::append(
                &mut tx,
                event_types::RUN_FINISHED,
                Subject::run(id, device_id),
                json!({"status": "cancelled", "attempt": attempt, "error": error}),
            )
            .await?;
            CancelOutcome::Cancelled
        }
        RunStatus::Running => {
            sqlx::query("UPDATE runs SET cancel_requested = true, updated_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            events::append(&mut tx, "run.cancel_requested", Subject::run(id, device_id), json!({"attempt": attempt, "reason": reason}))
                .await?;
            CancelOutcome::Requested
        }
        terminal => CancelOutcome::Terminal(terminal),
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Records a workflow step's progress (and its `run.step` event), only while `owner`
/// still holds attempt `attempt` of the run. `Ok(false)`: the run is no longer ours.
pub async fn record_step(pool: &PgPool, claimed: &Claimed, owner: &str, step: &RunStep) -> CoreResult<bool> {
    let mut tx = pool.begin().await?;
    let held: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease_owner = $3 FOR UPDATE",
    )
    .bind(claimed.run.id)
    .bind(claimed.attempt)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    if held.is_none() {
        return Ok(false);
    }
    write_step(&mut tx, claimed.run.id, step).await?;
    events::append(
        &mut tx,
        event_types::RUN_STEP,
        Subject::run(claimed.run.id, Some(claimed.device.id)),
        json!({"index": step.index, "module": step.module, "status": step.status, "attempt": step.attempt,
               "result": step.result, "error": step.error}),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Pauses (`true`) or resumes (`false`) a running workflow run between steps. 409 for
/// other runs, or when it already is in that state.
pub async fn set_paused(pool: &PgPool, id: Uuid, paused: bool) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query("SELECT kind, status, paused, device_id FROM runs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    if kind != "workflow" {
        return Err(CoreError::Conflict(format!("only workflow runs can be paused (run {id} is a {kind} run)")));
    }
    // A paused workflow that was handed back (its worker stopped) waits queued, still
    // paused: it can be resumed there too.
    let allowed = status == "running" || (!paused && status == "queued");
    if !allowed {
        return Err(CoreError::Conflict(format!("only a running workflow can be {} (run {id} is {status})", if paused { "paused" } else { "resumed" })));
    }
    if row.try_get::<bool, _>("paused")? == paused {
        return Err(CoreError::Conflict(format!("run {id} is already {}", if paused { "paused" } else { "running (not paused)" })));
    }
    sqlx::query("UPDATE runs SET paused = $2, updated_at = now() WHERE id = $1").bind(id).bind(paused).execute(&mut *tx).await?;
    let kind = if paused { event_types::RUN_PAUSED } else { event_types::RUN_RESUMED };
    events::append(&mut tx, kind, Subject::run(id, row.try_get("device_id")?), json!({})).await?;
    tx.commit().await?;
    Ok(())
}

/// Marks the steps of a finished workflow attempt that never ran as `skipped`.
pub fn skipped_steps(claimed: &Claimed, from: usize) -> Vec<RunStep> {
    let steps = claimed.run.definition["steps"].as_array().cloned().unwrap_or_default();
    steps
        .iter()
        .enumerate()
        .skip(from)
        .map(|(i, s)| RunStep {
            index: i as i32,
            module: s["module"].as_str().unwrap_or_default().to_string(),
            params: s["params"].clone(),
            status: StepStatus::Skipped,
            attempt: 0,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
        })
        .collect()
}
