//! Creating runs: one statement inserts the run and its `run.queued` event, and a
//! dispatch is recorded only after a push to the queue succeeded.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreResult,
    definition::RunDefinition,
    events::EventKind,
    ids::{RunId, ScheduleId},
    launch::Idempotency,
    model::{Run, RunKind, RunStatus, Trigger},
    repo::{events, runs::RunRow},
    selector::Selector,
};

/// A run to create, already validated.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// What it executes.
    pub definition: RunDefinition,
    /// Module id, or workflow / campaign id.
    pub target: String,
    /// The parameters it was started with.
    pub params: Value,
    /// Which devices it may use (none for a campaign run).
    pub selector: Option<Selector>,
    /// 0 to 9, higher first.
    pub priority: i16,
    /// Its time budget (seconds).
    pub timeout_s: i32,
    /// Attempts before infrastructure errors make it `errored`.
    pub max_attempts: i32,
    /// Its own queue-wait limit (seconds), if any.
    pub max_queue_wait_s: Option<i32>,
    /// What started it.
    pub trigger: Trigger,
    /// The schedule that started it.
    pub schedule_id: Option<ScheduleId>,
    /// The tick it was started for.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Its campaign run.
    pub parent_run_id: Option<RunId>,
    /// The run it retries.
    pub retry_of: Option<RunId>,
    /// The client's `Idempotency-Key`, scoped and fingerprinted.
    pub idempotency: Option<Idempotency>,
    /// A campaign child waits held until its campaign admits it.
    pub held: bool,
    /// Its item's position in its campaign.
    pub parent_index: Option<i32>,
    /// The W3C trace context of the request (or tick) that made it, kept with the run
    /// so its execution joins that trace; taken when the run is built, in that context.
    pub traceparent: Option<String>,
}

impl NewRun {
    /// A run of `definition` with the defaults every trigger shares.
    pub fn new(definition: RunDefinition, target: String, params: Value, selector: Option<Selector>) -> NewRun {
        NewRun {
            definition,
            target,
            params,
            selector,
            priority: 5,
            timeout_s: 3600,
            max_attempts: 3,
            max_queue_wait_s: None,
            trigger: Trigger::Api,
            schedule_id: None,
            scheduled_for: None,
            parent_run_id: None,
            retry_of: None,
            idempotency: None,
            held: false,
            parent_index: None,
            traceparent: crate::telemetry::traceparent(),
        }
    }

    /// The kind of run (from its definition).
    pub fn kind(&self) -> RunKind {
        self.definition.kind()
    }
}

/// Inserts a run and its `run.queued` event in one statement (atomic without a
/// transaction block, one round trip on the enqueue path), plus `run.started` for a
/// campaign run created running, on the caller's connection or transaction. `None`
/// when the idempotency key is taken (then nothing is written).
pub async fn insert_tx(conn: &mut PgConnection, new: &NewRun, status: RunStatus) -> CoreResult<Option<Run>> {
    let idem = new.idempotency.as_ref();
    if let Some(i) = idem {
        // An expired key is given up (its run keeps the key for history, not its
        // scope: the unique index sees NULL scopes as distinct), so
        // the insert below may take it.
        sqlx::query!(
            "UPDATE runs SET idempotency_scope = NULL
             WHERE idempotency_scope = $1 AND idempotency_key = $2 AND idempotency_expires_at <= now()",
            i.scope,
            i.key,
        )
        .execute(&mut *conn)
        .await?;
    }
    let selector = new.selector.as_ref().map(Selector::to_json);
    let queued = queued_data(new);
    let row = sqlx::query_as!(
        RunRow,
        "WITH r AS (
            INSERT INTO runs (id, kind, target, definition, params, selector, priority, timeout_s, max_attempts,
                max_queue_wait_s, trigger, schedule_id, scheduled_for, parent_run_id, retry_of, idempotency_key, held,
                parent_index, status, started_at, queued_at, idempotency_scope, idempotency_fingerprint,
                idempotency_expires_at, traceparent)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
                    CASE WHEN $19 = 'running'::run_status THEN now() END, clock_timestamp(), $22, $23,
                    now() + make_interval(secs => $24), $25)
            -- waiting_since: its default, now()
            ON CONFLICT (idempotency_scope, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING *),
         e AS (INSERT INTO events (type, run_id, schedule_id, data) SELECT $20, r.id, r.schedule_id, $21 FROM r)
         SELECT * FROM r",
        RunId::random() as RunId,
        new.kind() as RunKind,
        new.target,
        Json(&new.definition) as _,
        new.params,
        selector,
        new.priority,
        new.timeout_s,
        new.max_attempts,
        new.max_queue_wait_s,
        new.trigger as Trigger,
        new.schedule_id as Option<ScheduleId>,
        new.scheduled_for,
        new.parent_run_id as Option<RunId>,
        new.retry_of as Option<RunId>,
        idem.map(|i| i.key.clone()),
        new.held,
        new.parent_index,
        status as RunStatus,
        EventKind::RunQueued as EventKind,
        queued,
        idem.map(|i| i.scope.clone()),
        idem.map(|i| i.fingerprint.clone()),
        idem.map(|i| i.ttl_s as f64),
        new.traceparent,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(run) = row.map(Run::from) else { return Ok(None) };
    if status == RunStatus::Running {
        crate::meters::run_started(run.kind, None);
        let subject =
            crate::events::Subject { run_id: Some(run.id), schedule_id: run.schedule_id, ..Default::default() };
        events::append(conn, EventKind::RunStarted, subject, json!({"attempt": run.attempt})).await?;
    }
    Ok(Some(run))
}

/// The data of a new run's `run.queued` event.
fn queued_data(new: &NewRun) -> Value {
    json!({"kind": new.kind(), "target": new.target, "priority": new.priority, "trigger": new.trigger,
        "attempt": 1, "selector": new.selector.as_ref().map(Selector::to_json), "parent_run_id": new.parent_run_id,
        "scheduled_for": new.scheduled_for, "retry_of": new.retry_of})
}

/// Gives up the expired idempotency keys that `news` bring again (see `insert_tx`).
async fn release_expired_keys(conn: &mut PgConnection, news: &[NewRun]) -> CoreResult<()> {
    let (scopes, keys): (Vec<String>, Vec<String>) =
        news.iter().filter_map(|n| n.idempotency.as_ref()).map(|i| (i.scope.clone(), i.key.clone())).unzip();
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "UPDATE runs SET idempotency_scope = NULL FROM UNNEST($1::text[], $2::text[]) AS k(scope, key)
         WHERE runs.idempotency_scope = k.scope AND runs.idempotency_key = k.key
           AND runs.idempotency_expires_at <= now()",
        &scopes,
        &keys,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts queued runs, each with its `run.queued` event, in one statement: a batch
/// (`POST /runs/batch`) or the starts that arrived together (the API's group commit)
/// cost one round trip and one commit. Per input, in order: the run created, or `None`
/// where its idempotency key was taken already (nothing written for that one; the
/// caller replays it).
pub async fn insert_many(conn: &mut PgConnection, news: &[NewRun]) -> CoreResult<Vec<Option<Run>>> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    release_expired_keys(conn, news).await?;
    let ids: Vec<RunId> = news.iter().map(|_| RunId::random()).collect();
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    let col = |f: &dyn Fn(&NewRun) -> Value| news.iter().map(f).collect::<Vec<Value>>();
    let idem = |f: &dyn Fn(&Idempotency) -> String| {
        news.iter().map(|n| n.idempotency.as_ref().map(f)).collect::<Vec<Option<String>>>()
    };
    let rows = sqlx::query_as!(
        RunRow,
        "WITH input AS MATERIALIZED (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[],
                                 $7::int2[], $8::int4[], $9::int4[], $10::int4[], $11::text[], $12::uuid[],
                                 $13::timestamptz[], $14::uuid[], $15::uuid[], $16::text[], $17::bool[], $18::int4[],
                                 $19::text[], $20::text[], $21::float8[], $22::text[], $23::jsonb[])
                WITH ORDINALITY AS t(id, kind, target, definition, params, selector, priority, timeout_s,
                    max_attempts, max_queue_wait_s, trigger, schedule_id, scheduled_for, parent_run_id, retry_of,
                    idempotency_key, held, parent_index, idempotency_scope, idempotency_fingerprint, ttl_s,
                    traceparent, queued, ord)),
         r AS (
            INSERT INTO runs (id, kind, target, definition, params, selector, priority, timeout_s, max_attempts,
                max_queue_wait_s, trigger, schedule_id, scheduled_for, parent_run_id, retry_of, idempotency_key, held,
                parent_index, status, queued_at, idempotency_scope, idempotency_fingerprint,
                idempotency_expires_at, traceparent)
            SELECT id, kind::run_kind, target, definition, params, selector, priority, timeout_s, max_attempts,
                   max_queue_wait_s, trigger::run_trigger, schedule_id, scheduled_for, parent_run_id, retry_of,
                   idempotency_key, held, parent_index, 'queued', clock_timestamp(), idempotency_scope,
                   idempotency_fingerprint, now() + make_interval(secs => ttl_s), traceparent
            FROM input ORDER BY ord
            -- A key taken before, or twice in this batch, writes nothing for that input.
            ON CONFLICT (idempotency_scope, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING *),
         e AS (INSERT INTO events (type, run_id, schedule_id, data)
               SELECT 'run.queued', r.id, r.schedule_id, i.queued FROM r JOIN input i ON i.id = r.id ORDER BY i.ord)
         SELECT * FROM r",
        &uuids,
        &news.iter().map(|n| n.kind().to_string()).collect::<Vec<_>>(),
        &news.iter().map(|n| n.target.clone()).collect::<Vec<_>>(),
        &col(&|n| serde_json::to_value(&n.definition).unwrap_or(Value::Null)),
        &col(&|n| n.params.clone()),
        &news.iter().map(|n| n.selector.as_ref().map(Selector::to_json)).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.priority).collect::<Vec<_>>(),
        &news.iter().map(|n| n.timeout_s).collect::<Vec<_>>(),
        &news.iter().map(|n| n.max_attempts).collect::<Vec<_>>(),
        &news.iter().map(|n| n.max_queue_wait_s).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.trigger.to_string()).collect::<Vec<_>>(),
        &news.iter().map(|n| n.schedule_id.map(|s| s.0)).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.scheduled_for).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.parent_run_id.map(|r| r.0)).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.retry_of.map(|r| r.0)).collect::<Vec<_>>() as _,
        &idem(&|i| i.key.clone()) as _,
        &news.iter().map(|n| n.held).collect::<Vec<_>>(),
        &news.iter().map(|n| n.parent_index).collect::<Vec<_>>() as _,
        &idem(&|i| i.scope.clone()) as _,
        &idem(&|i| i.fingerprint.clone()) as _,
        &news.iter().map(|n| n.idempotency.as_ref().map(|i| i.ttl_s as f64)).collect::<Vec<_>>() as _,
        &news.iter().map(|n| n.traceparent.clone()).collect::<Vec<_>>() as _,
        &col(&queued_data),
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut made: std::collections::HashMap<RunId, Run> = rows.into_iter().map(|r| (r.id, Run::from(r))).collect();
    Ok(ids.iter().map(|id| made.remove(id)).collect())
}

/// Records that runs were pushed to the queue (call only after the push succeeded).
/// Rows are locked in id order, so two recorders never deadlock on each other.
pub async fn mark_dispatched(pool: &PgPool, ids: &[RunId]) -> CoreResult<()> {
    sqlx::query!(
        "WITH locked AS (SELECT id FROM runs WHERE id = ANY ($1) ORDER BY id FOR UPDATE)
         UPDATE runs r SET dispatched_at = CASE WHEN r.status = 'queued' THEN now() ELSE r.dispatched_at END,
                enqueued_at = COALESCE(r.enqueued_at, clock_timestamp())
         FROM locked WHERE r.id = locked.id",
        ids as &[RunId]
    )
    .execute(pool)
    .await?;
    Ok(())
}
