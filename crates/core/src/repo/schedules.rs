//! The `schedules` table, and the tick that turns due schedules into runs.
//!
//! Exactly once: a tick locks a due schedule row (`FOR UPDATE SKIP LOCKED`), inserts
//! its run(s) with a unique `(schedule_id, scheduled_for)` and advances `next_fire_at`
//! in the same transaction. Any number of schedulers can tick at once; a scheduler that
//! dies mid-tick rolls back and another one fires the tick.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use std::time::Duration;
use uuid::Uuid;

use crate::{
    CoreError, CoreResult, catalog,
    cron_expr::{CronExpr, parse_tz},
    error::FieldErrors,
    input::Fields,
    model::{RunKind, RunStatus, Trigger, string_enum},
    pagination::{Cursor, Page},
    repo::{
        campaigns::{self, CampaignStart},
        devices,
        events::{self, Subject},
        runs::{self, NewRun},
        workflows,
    },
    selector::Selector,
};

string_enum!(Misfire { Skip => "skip", FireOnce => "fire_once" });
string_enum!(Overlap { Allow => "allow", Skip => "skip", BufferOne => "buffer_one" });

/// What a schedule starts: a module, workflow or campaign, with params and devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Target {
    pub kind: RunKind,
    /// Module id (`ping`), or workflow / campaign UUID.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Selector>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub id: Uuid,
    pub name: String,
    pub target: Target,
    pub cron: String,
    pub timezone: String,
    pub enabled: bool,
    pub misfire: Misfire,
    pub overlap: Overlap,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    /// A tick held back by `overlap: buffer_one`, started when the active run ends.
    pub buffered_for: Option<DateTime<Utc>>,
    /// Decisions so far: `{fired, skipped, missed}`.
    pub stats: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn from_row(r: &PgRow) -> Result<Schedule, sqlx::Error> {
    let bad = |c: &str, e: String| sqlx::Error::Decode(format!("bad {c}: {e}").into());
    let target: Value = r.try_get("target")?;
    let misfire: String = r.try_get("misfire")?;
    let overlap: String = r.try_get("overlap")?;
    Ok(Schedule {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        target: serde_json::from_value(target).map_err(|e| bad("target", e.to_string()))?,
        cron: r.try_get("cron")?,
        timezone: r.try_get("timezone")?,
        enabled: r.try_get("enabled")?,
        misfire: misfire.parse().map_err(|e| bad("misfire", e))?,
        overlap: overlap.parse().map_err(|e| bad("overlap", e))?,
        next_fire_at: r.try_get("next_fire_at")?,
        last_fired_at: r.try_get("last_fired_at")?,
        buffered_for: r.try_get("buffered_for")?,
        stats: json!({"fired": r.try_get::<i64, _>("fired_count")?, "skipped": r.try_get::<i64, _>("skipped_count")?,
                      "missed": r.try_get::<i64, _>("missed_count")?}),
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Postgres NOTIFY channel told (at commit) whenever a schedule is created or changed,
/// so schedulers look at once instead of at their next poll.
pub const CHANGED_CHANNEL: &str = "switchboard_schedules_changed";

async fn notify_changed(conn: &mut PgConnection, id: Uuid) -> CoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANGED_CHANNEL).bind(id.to_string()).execute(&mut *conn).await?;
    Ok(())
}

const SELECT: &str = "SELECT id, name, target, cron, timezone, enabled, misfire, overlap, next_fire_at, last_fired_at, \
     buffered_for, fired_count, skipped_count, missed_count, created_at, updated_at FROM schedules";

/// A schedule as written (POST), or the fields a PATCH changes.
#[derive(Debug, Clone, Default)]
pub struct ScheduleInput {
    pub name: Option<String>,
    pub target: Option<Target>,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub enabled: Option<bool>,
    pub misfire: Option<Misfire>,
    pub overlap: Option<Overlap>,
}

impl ScheduleInput {
    /// Reads a body; with `create`, `name`, `target` and `cron` are required.
    pub fn parse(body: &Value, create: bool) -> CoreResult<ScheduleInput> {
        let mut f = Fields::new(body, &["name", "target", "cron", "timezone", "enabled", "misfire", "overlap"])?;
        let name = if create { f.string("name", 200) } else { f.opt_string("name", 200) };
        let cron = if create { f.string("cron", 200) } else { f.opt_string("cron", 200) };
        if let Some(c) = &cron
            && let Err(e) = CronExpr::parse(c)
        {
            f.errors.insert("cron".into(), e);
        }
        let timezone = f.opt_string("timezone", 64);
        if let Some(tz) = &timezone
            && let Err(e) = parse_tz(tz)
        {
            f.errors.insert("timezone".into(), e);
        }
        let enabled = f.opt_bool("enabled");
        let misfire = f.opt_enum::<Misfire>("misfire");
        let overlap = f.opt_enum::<Overlap>("overlap");
        let target = match f.raw("target") {
            None if create => {
                f.errors.insert("target".into(), "is required: {kind: module|workflow|campaign, id, params?, device?}".into());
                None
            }
            None => None,
            Some(v) => match parse_target(v) {
                Ok(t) => Some(t),
                Err(errors) => {
                    f.errors.extend(errors);
                    None
                }
            },
        };
        for key in ["name", "cron", "target", "timezone", "enabled", "misfire", "overlap"] {
            if !create && f.has(key) && f.raw(key).is_none() && !f.errors.contains_key(key) {
                f.errors.insert(key.into(), "cannot be null".into());
            }
        }
        f.finish()?;
        Ok(ScheduleInput { name, target, cron, timezone, enabled, misfire, overlap })
    }
}

fn parse_target(v: &Value) -> Result<Target, FieldErrors> {
    let mut errors = FieldErrors::new();
    let Some(obj) = v.as_object() else {
        errors.insert("target".into(), "must be an object {kind, id, params?, device?}".into());
        return Err(errors);
    };
    for key in obj.keys() {
        if !matches!(key.as_str(), "kind" | "id" | "params" | "device") {
            errors.insert(format!("target.{key}"), "unknown field (expected kind, id, params or device)".into());
        }
    }
    let kind = match obj.get("kind").and_then(Value::as_str).map(str::parse::<RunKind>) {
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            errors.insert("target.kind".into(), e);
            None
        }
        None => {
            errors.insert("target.kind".into(), "is required (module, workflow or campaign)".into());
            None
        }
    };
    let id = match obj.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.to_string()),
        None => {
            errors.insert("target.id".into(), "is required (a module id, or a workflow or campaign UUID)".into());
            None
        }
    };
    let device = match obj.get("device") {
        None | Some(Value::Null) => None,
        Some(d) => match Selector::parse("target.device", d) {
            Ok(s) => Some(s),
            Err(CoreError::Validation { fields, .. }) => {
                errors.extend(fields);
                None
            }
            Err(e) => {
                errors.insert("target.device".into(), e.to_string());
                None
            }
        },
    };
    let mut params = obj.get("params").filter(|p| !p.is_null()).cloned();
    if let (Some(kind), Some(id)) = (kind, &id) {
        match kind {
            RunKind::Module => match catalog::find(id) {
                None => {
                    errors.insert("target.id".into(), format!("unknown module {id:?}"));
                }
                Some(m) => match catalog::validate_params(m, params.as_ref(), "target.params") {
                    Ok(p) => params = Some(p),
                    Err(CoreError::Validation { fields, .. }) => errors.extend(fields),
                    Err(e) => {
                        errors.insert("target.params".into(), e.to_string());
                    }
                },
            },
            RunKind::Workflow | RunKind::Campaign => {
                if Uuid::parse_str(id).is_err() {
                    errors.insert("target.id".into(), format!("must be the UUID of a {kind}"));
                }
                if kind == RunKind::Workflow && params.as_ref().is_some_and(|p| !p.is_object()) {
                    errors.insert("target.params".into(), "must be an object".into());
                }
            }
        }
        match kind {
            RunKind::Campaign => {
                if obj.contains_key("device") {
                    errors.insert("target.device".into(), "a campaign's items name their own devices".into());
                }
                if obj.contains_key("params") {
                    errors.insert("target.params".into(), "a campaign takes no params".into());
                }
            }
            _ if device.is_none() && !errors.contains_key("target.device") => {
                errors.insert("target.device".into(), "is required for module and workflow targets".into());
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(Target { kind: kind.expect("checked"), id: id.expect("checked"), params, device })
    } else {
        Err(errors)
    }
}

/// The target must exist (and match a device) when the schedule is written. The
/// workflow or campaign row is locked `FOR SHARE` until the caller's transaction ends,
/// so a concurrent delete waits and then sees this schedule (409).
async fn check_target(conn: &mut PgConnection, pool: &PgPool, t: &Target) -> CoreResult<()> {
    let id = Uuid::parse_str(&t.id).unwrap_or_default();
    let found: Option<Uuid> = match t.kind {
        RunKind::Workflow => sqlx::query_scalar("SELECT id FROM workflows WHERE id = $1 FOR SHARE").bind(id).fetch_optional(&mut *conn).await?,
        RunKind::Campaign => sqlx::query_scalar("SELECT id FROM campaigns WHERE id = $1 FOR SHARE").bind(id).fetch_optional(&mut *conn).await?,
        RunKind::Module => Some(id),
    };
    if found.is_none() {
        return Err(CoreError::invalid("target.id", format!("no {} {id}", t.kind)));
    }
    if let Some(device) = &t.device
        && !devices::any_matching(pool, &device.to_json()).await?
    {
        return Err(CoreError::invalid("target.device", "no registered device matches this selector"));
    }
    Ok(())
}

fn next_fire(cron: &str, tz: &str, enabled: bool, after: DateTime<Utc>) -> CoreResult<Option<DateTime<Utc>>> {
    if !enabled {
        return Ok(None);
    }
    let expr = CronExpr::parse(cron).map_err(|e| CoreError::invalid("cron", e))?;
    let tz = parse_tz(tz).map_err(|e| CoreError::invalid("timezone", e))?;
    Ok(expr.next_after(tz, after))
}

pub async fn create(pool: &PgPool, input: &ScheduleInput) -> CoreResult<Schedule> {
    let target = input.target.clone().expect("parsed for create");
    let mut tx = pool.begin().await?;
    check_target(&mut tx, pool, &target).await?;
    let name = input.name.clone().expect("parsed for create");
    let cron = input.cron.clone().expect("parsed for create");
    let tz = input.timezone.clone().unwrap_or_else(|| "UTC".into());
    let enabled = input.enabled.unwrap_or(true);
    let next = next_fire(&cron, &tz, enabled, Utc::now())?;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO schedules (id, name, target, cron, timezone, enabled, misfire, overlap, next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(&name)
    .bind(json!(target))
    .bind(&cron)
    .bind(&tz)
    .bind(enabled)
    .bind(input.misfire.unwrap_or(Misfire::Skip).as_str())
    .bind(input.overlap.unwrap_or(Overlap::Allow).as_str())
    .bind(next)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "schedule", &name))?;
    notify_changed(&mut tx, id).await?;
    tx.commit().await?;
    get(pool, id).await
}

pub async fn get(pool: &PgPool, id: Uuid) -> CoreResult<Schedule> {
    let sql = sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await?.ok_or_else(|| CoreError::not_found(format!("schedule {id}")))?;
    Ok(from_row(&row)?)
}

pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Schedule>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2)) ORDER BY created_at DESC, id DESC LIMIT $3"
    ));
    let rows = sqlx::query(sql)
        .bind(cursor.map(|c| c.created_at))
        .bind(cursor.map(|c| c.id))
        .bind(limit + 1)
        .fetch_all(pool)
        .await?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |s| Cursor { created_at: s.created_at, id: s.id }))
}

/// PATCH: changes only what is given. A new cron, time zone, or re-enabling computes
/// `next_fire_at` from now (time spent disabled is not downtime to catch up).
pub async fn update(pool: &PgPool, id: Uuid, p: &ScheduleInput) -> CoreResult<Schedule> {
    let mut tx = pool.begin().await?;
    if let Some(t) = &p.target {
        check_target(&mut tx, pool, t).await?;
    }
    let sql = sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = $1 FOR UPDATE"));
    let row = sqlx::query(sql).bind(id).fetch_optional(&mut *tx).await?.ok_or_else(|| CoreError::not_found(format!("schedule {id}")))?;
    let cur = from_row(&row)?;
    let cron = p.cron.clone().unwrap_or(cur.cron.clone());
    let tz = p.timezone.clone().unwrap_or(cur.timezone.clone());
    let enabled = p.enabled.unwrap_or(cur.enabled);
    let recompute = p.cron.is_some() || p.timezone.is_some() || !cur.enabled || !enabled;
    let next = if recompute { next_fire(&cron, &tz, enabled, Utc::now())? } else { cur.next_fire_at };
    let name = p.name.clone().unwrap_or(cur.name.clone());
    sqlx::query(
        "UPDATE schedules SET name = $2, target = $3, cron = $4, timezone = $5, enabled = $6, misfire = $7, overlap = $8,
            next_fire_at = $9, buffered_for = CASE WHEN $6 THEN buffered_for END, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(&name)
    .bind(json!(p.target.clone().unwrap_or(cur.target.clone())))
    .bind(&cron)
    .bind(&tz)
    .bind(enabled)
    .bind(p.misfire.unwrap_or(cur.misfire).as_str())
    .bind(p.overlap.unwrap_or(cur.overlap).as_str())
    .bind(next)
    .execute(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "schedule", &name))?;
    notify_changed(&mut tx, id).await?;
    tx.commit().await?;
    get(pool, id).await
}

/// Deletes a schedule; its runs stay (their `schedule_id` becomes null).
pub async fn delete(pool: &PgPool, id: Uuid) -> CoreResult<()> {
    let r = sqlx::query("DELETE FROM schedules WHERE id = $1").bind(id).execute(pool).await?;
    if r.rows_affected() == 0 {
        return Err(CoreError::not_found(format!("schedule {id}")));
    }
    Ok(())
}

/// The next `count` fire times after now.
pub async fn preview(pool: &PgPool, id: Uuid, count: usize) -> CoreResult<Vec<DateTime<Utc>>> {
    let s = get(pool, id).await?;
    let expr = CronExpr::parse(&s.cron).map_err(CoreError::Internal)?;
    let tz = parse_tz(&s.timezone).map_err(CoreError::Internal)?;
    let mut out = Vec::with_capacity(count);
    let mut cursor = Utc::now();
    while out.len() < count {
        match expr.next_after(tz, cursor) {
            Some(t) => {
                out.push(t);
                cursor = t;
            }
            None => break,
        }
    }
    Ok(out)
}

/// Runs to push after a tick commits (schedule runs and admitted campaign children).
#[derive(Debug, Default)]
pub struct Fired {
    pub runs: Vec<Uuid>,
    pub push: Vec<Uuid>,
}

/// Creates the run a schedule starts, in the caller's transaction. Returns the run id
/// and the ids to push.
async fn start_target(
    tx: &mut PgConnection,
    pool: &PgPool,
    s: &Schedule,
    scheduled_for: Option<DateTime<Utc>>,
) -> CoreResult<(Uuid, Vec<Uuid>)> {
    let t = &s.target;
    match t.kind {
        RunKind::Module => {
            let m = catalog::find(&t.id).ok_or_else(|| CoreError::Internal(format!("schedule {} names unknown module {}", s.id, t.id)))?;
            let params = t.params.clone().unwrap_or_else(|| json!({}));
            let mut new = NewRun::new(
                RunKind::Module,
                m.id.to_string(),
                json!({"module": m.id, "params": params, "timeout_s": m.default_timeout_s}),
                params,
                t.device.clone(),
            );
            new.timeout_s = m.default_timeout_s;
            new.max_attempts = m.max_attempts;
            new.trigger = Trigger::Schedule;
            new.schedule_id = Some(s.id);
            new.scheduled_for = scheduled_for;
            let run = runs::insert_tx(tx, &new, RunStatus::Queued).await?.ok_or_else(|| CoreError::Internal("no run".into()))?;
            Ok((run.id, vec![run.id]))
        }
        RunKind::Workflow => {
            let w = workflows::get(pool, Uuid::parse_str(&t.id).unwrap_or_default()).await?;
            let device = t.device.clone().ok_or_else(|| CoreError::Internal("workflow schedule without device".into()))?;
            let child = campaigns::workflow_child(0, &w, &device, t.params.clone().unwrap_or_else(|| json!({})));
            let mut new = NewRun::new(child.kind, child.target, child.definition, child.params, Some(child.selector));
            new.timeout_s = child.timeout_s;
            new.max_attempts = child.max_attempts;
            new.trigger = Trigger::Schedule;
            new.schedule_id = Some(s.id);
            new.scheduled_for = scheduled_for;
            let run = runs::insert_tx(tx, &new, RunStatus::Queued).await?.ok_or_else(|| CoreError::Internal("no run".into()))?;
            Ok((run.id, vec![run.id]))
        }
        RunKind::Campaign => {
            let c = campaigns::get(pool, Uuid::parse_str(&t.id).unwrap_or_default()).await?;
            let children = campaigns::snapshot(pool, &c).await?;
            let start = CampaignStart {
                priority: 5,
                trigger: Trigger::Schedule,
                schedule_id: Some(s.id),
                scheduled_for,
                retry_of: None,
                idempotency_key: None,
            };
            let (id, advance) = campaigns::start_run_tx(tx, &(&c).into(), &children, &start)
                .await?
                .ok_or_else(|| CoreError::Internal("no run".into()))?;
            Ok((id, advance.admit))
        }
    }
}

/// `POST /schedules/{id}/trigger`: a run now (`trigger: schedule`, no `scheduled_for`),
/// whatever the overlap policy.
pub async fn trigger_now(pool: &PgPool, id: Uuid) -> CoreResult<(Uuid, Vec<Uuid>)> {
    let s = get(pool, id).await?;
    let mut tx = pool.begin().await?;
    let (run, push) = start_target(&mut tx, pool, &s, None).await?;
    events::append(&mut tx, "schedule.fired", Subject { schedule_id: Some(id), run_id: Some(run), device_id: None }, json!({"manual": true, "run_id": run}))
        .await?;
    sqlx::query("UPDATE schedules SET fired_count = fired_count + 1 WHERE id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok((run, push))
}

/// Whether a run of this schedule is still queued or running.
async fn active_run(tx: &mut PgConnection, schedule_id: Uuid) -> CoreResult<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM runs WHERE schedule_id = $1 AND parent_run_id IS NULL AND status IN ('queued', 'running') LIMIT 1",
    )
    .bind(schedule_id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// Fires every due schedule (and buffered ticks whose blocker ended). `grace`: a tick
/// this late or less is on time; later ones were missed (downtime) and follow
/// `misfire`. Safe with any number of schedulers.
pub async fn tick(pool: &PgPool, grace: Duration) -> CoreResult<Fired> {
    let mut fired = Fired::default();
    for _ in 0..100 {
        let mut tx = pool.begin().await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE enabled AND buffered_for IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM runs r WHERE r.schedule_id = schedules.id AND r.parent_run_id IS NULL
                  AND r.status IN ('queued', 'running'))
             LIMIT 1 FOR UPDATE SKIP LOCKED"
        ));
        let Some(row) = sqlx::query(sql).fetch_optional(&mut *tx).await? else { break };
        let s = from_row(&row)?;
        if active_run(&mut tx, s.id).await?.is_some() {
            tx.rollback().await.ok();
            break;
        }
        let tick = s.buffered_for.expect("selected");
        let (run, push) = match start_target(&mut tx, pool, &s, Some(tick)).await {
            Ok(r) => r,
            Err(e) => {
                tx.rollback().await.ok();
                record_failure(pool, &s, &e).await?;
                continue;
            }
        };
        events::append(
            &mut tx,
            "schedule.fired",
            Subject { schedule_id: Some(s.id), run_id: Some(run), device_id: None },
            json!({"scheduled_for": tick, "run_id": run, "buffered": true}),
        )
        .await?;
        sqlx::query("UPDATE schedules SET buffered_for = NULL, fired_count = fired_count + 1, last_fired_at = $2 WHERE id = $1")
            .bind(s.id)
            .bind(tick)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        fired.runs.push(run);
        fired.push.extend(push);
    }
    for _ in 0..100 {
        let mut tx = pool.begin().await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE enabled AND next_fire_at <= now() ORDER BY next_fire_at LIMIT 1 FOR UPDATE SKIP LOCKED"
        ));
        let Some(row) = sqlx::query(sql).fetch_optional(&mut *tx).await? else { break };
        let s = from_row(&row)?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&mut *tx).await?;
        let mut this = Fired::default();
        match fire_due(&mut tx, pool, &s, now, grace, &mut this).await {
            Ok(()) => {
                tx.commit().await?;
                fired.runs.extend(this.runs);
                fired.push.extend(this.push);
            }
            Err(e) => {
                tx.rollback().await.ok();
                // One broken schedule must not hold back the others.
                record_failure(pool, &s, &e).await?;
            }
        }
    }
    Ok(fired)
}

/// A schedule whose tick could not fire (its target vanished, say): record it as an
/// event and a missed tick, drop any buffered tick and move to the next one, so it is
/// not retried in a loop ahead of every other schedule. Transient database errors are
/// returned instead: the tick stays due and is tried again.
async fn record_failure(pool: &PgPool, s: &Schedule, e: &CoreError) -> CoreResult<()> {
    if matches!(e, CoreError::Unavailable(_) | CoreError::Database(_) | CoreError::Redis(_)) {
        return Err(CoreError::Unavailable(e.to_string()));
    }
    tracing::error!(schedule_id = %s.id, error = %e, "schedule tick failed; skipping to the next tick");
    let mut tx = pool.begin().await?;
    let next = match (CronExpr::parse(&s.cron), parse_tz(&s.timezone)) {
        (Ok(expr), Ok(tz)) => expr.next_after(tz, Utc::now()),
        _ => None,
    };
    events::append(
        &mut tx,
        "schedule.error",
        Subject { schedule_id: Some(s.id), run_id: None, device_id: None },
        json!({"error": e.to_string(), "scheduled_for": s.next_fire_at, "buffered_for": s.buffered_for, "next_fire_at": next}),
    )
    .await?;
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $2, enabled = enabled AND $2 IS NOT NULL, buffered_for = NULL,
            missed_count = missed_count + 1 WHERE id = $1",
    )
    .bind(s.id)
    .bind(next)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn fire_due(tx: &mut PgConnection, pool: &PgPool, s: &Schedule, now: DateTime<Utc>, grace: Duration, fired: &mut Fired) -> CoreResult<()> {
    let subject = Subject { schedule_id: Some(s.id), run_id: None, device_id: None };
    let (expr, tz) = match (CronExpr::parse(&s.cron), parse_tz(&s.timezone)) {
        (Ok(e), Ok(t)) => (e, t),
        (Err(e), _) | (_, Err(e)) => {
            // Cannot happen for schedules written through the API; never loop on it.
            events::append(tx, "schedule.error", subject, json!({"error": e})).await?;
            sqlx::query("UPDATE schedules SET enabled = false, next_fire_at = NULL WHERE id = $1").bind(s.id).execute(&mut *tx).await?;
            return Ok(());
        }
    };
    let due = s.next_fire_at.expect("selected as due");
    let mut ticks = vec![due];
    ticks.extend(expr.between(tz, due, now, 10_000));
    let grace = chrono::Duration::from_std(grace).unwrap_or_default();
    let (late, on_time): (Vec<_>, Vec<_>) = ticks.into_iter().partition(|t| now - *t > grace);
    let mut to_fire: Vec<DateTime<Utc>> = Vec::new();
    let (mut skipped, mut missed) = (0i64, 0i64);
    if !late.is_empty() {
        let caught_up = s.misfire == Misfire::FireOnce;
        missed = late.len() as i64 - i64::from(caught_up);
        events::append(
            tx,
            "schedule.missed",
            subject,
            json!({"count": late.len(), "first": late.first(), "last": late.last(), "misfire": s.misfire,
                   "catch_up": if caught_up { json!(late.last()) } else { Value::Null }}),
        )
        .await?;
        if caught_up {
            to_fire.push(*late.last().expect("non-empty"));
        }
    }
    to_fire.extend(on_time);
    let mut buffered_for = s.buffered_for;
    let mut last_fired = s.last_fired_at;
    let mut fired_n = 0i64;
    // A tick held back by buffer_one goes first, once the run it waited for has ended.
    if let Some(tick) = buffered_for
        && active_run(tx, s.id).await?.is_none()
    {
        let (run, push) = start_target(tx, pool, s, Some(tick)).await?;
        events::append(tx, "schedule.fired", Subject { run_id: Some(run), ..subject }, json!({"scheduled_for": tick, "run_id": run, "buffered": true}))
            .await?;
        fired.runs.push(run);
        fired.push.extend(push);
        fired_n += 1;
        last_fired = Some(tick);
        buffered_for = None;
    }
    for tick in to_fire {
        if s.overlap != Overlap::Allow
            && let Some(active) = active_run(tx, s.id).await?
        {
            if s.overlap == Overlap::BufferOne && buffered_for.is_none() {
                buffered_for = Some(tick);
                events::append(tx, "schedule.buffered", subject, json!({"scheduled_for": tick, "active_run_id": active})).await?;
            } else {
                skipped += 1;
                events::append(tx, "schedule.skipped", subject, json!({"scheduled_for": tick, "reason": "overlap", "active_run_id": active}))
                    .await?;
            }
            continue;
        }
        let (run, push) = start_target(tx, pool, s, Some(tick)).await?;
        let lag_ms = (now - tick).num_milliseconds();
        events::append(
            tx,
            "schedule.fired",
            Subject { run_id: Some(run), ..subject },
            json!({"scheduled_for": tick, "run_id": run, "lag_ms": lag_ms}),
        )
        .await?;
        fired.runs.push(run);
        fired.push.extend(push);
        fired_n += 1;
        last_fired = Some(tick);
    }
    let next = expr.next_after(tz, now);
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $2, last_fired_at = $3, buffered_for = $4, fired_count = fired_count + $5,
            skipped_count = skipped_count + $6, missed_count = missed_count + $7 WHERE id = $1",
    )
    .bind(s.id)
    .bind(next)
    .bind(last_fired)
    .bind(buffered_for)
    .bind(fired_n)
    .bind(skipped)
    .bind(missed)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// When the earliest enabled schedule is due (the scheduler sleeps until then).
pub async fn next_due(pool: &PgPool) -> CoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar("SELECT min(next_fire_at) FROM schedules WHERE enabled").fetch_one(pool).await?)
}
