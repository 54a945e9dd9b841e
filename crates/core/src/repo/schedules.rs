//! The `schedules` table. Firing ticks (exactly once, across any number of
//! schedulers) is `service::schedules`; this module reads and writes rows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreError, CoreResult,
    definition::Target,
    ids::{RunId, ScheduleId},
    model::{Misfire, Overlap},
    pagination::{Cursor, Page},
};

/// Decisions a schedule has made so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ScheduleStats {
    /// Ticks that started a run.
    pub fired: i64,
    /// Ticks skipped (overlap).
    pub skipped: i64,
    /// Ticks missed while no scheduler ran.
    pub missed: i64,
}

/// A cron schedule.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    /// Its id.
    pub id: ScheduleId,
    /// Unique name.
    pub name: String,
    /// What it starts.
    pub target: Target,
    /// Its cron expression, as written.
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub timezone: String,
    /// Whether it fires.
    pub enabled: bool,
    /// What to do about missed ticks.
    pub misfire: Misfire,
    /// What to do while its previous run is active.
    pub overlap: Overlap,
    /// Its next tick (null while disabled).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The last tick that started a run.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// A tick held back by `overlap: buffer_one`, started when the active run ends.
    pub buffered_for: Option<DateTime<Utc>>,
    /// Its decisions so far.
    pub stats: ScheduleStats,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

struct ScheduleRow {
    id: ScheduleId,
    name: String,
    target: Json<Target>,
    cron: String,
    timezone: String,
    enabled: bool,
    misfire: Misfire,
    overlap: Overlap,
    next_fire_at: Option<DateTime<Utc>>,
    last_fired_at: Option<DateTime<Utc>>,
    buffered_for: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    fired_count: i64,
    skipped_count: i64,
    missed_count: i64,
}

impl From<ScheduleRow> for Schedule {
    fn from(r: ScheduleRow) -> Schedule {
        Schedule {
            id: r.id,
            name: r.name,
            target: r.target.0,
            cron: r.cron,
            timezone: r.timezone,
            enabled: r.enabled,
            misfire: r.misfire,
            overlap: r.overlap,
            next_fire_at: r.next_fire_at,
            last_fired_at: r.last_fired_at,
            buffered_for: r.buffered_for,
            stats: ScheduleStats { fired: r.fired_count, skipped: r.skipped_count, missed: r.missed_count },
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Postgres NOTIFY channel told (at commit) whenever a schedule is created or changed,
/// so schedulers look at once instead of at their next poll.
pub const CHANGED_CHANNEL: &str = "switchboard_schedules_changed";

async fn notify_changed(conn: &mut PgConnection, id: ScheduleId) -> CoreResult<()> {
    sqlx::query!("SELECT pg_notify($1, $2)", CHANGED_CHANNEL, id.to_string()).execute(&mut *conn).await?;
    Ok(())
}

/// A schedule's every column but its id and bookkeeping, as written.
#[derive(Debug, Clone)]
pub struct ScheduleFields {
    /// Unique name.
    pub name: String,
    /// What it starts (checked against the database by the caller).
    pub target: Target,
    /// A valid cron expression.
    pub cron: String,
    /// A valid IANA time zone.
    pub timezone: String,
    /// Whether it fires.
    pub enabled: bool,
    /// What to do about missed ticks.
    pub misfire: Misfire,
    /// What to do while its previous run is active.
    pub overlap: Overlap,
}

/// Inserts a schedule in the caller's transaction (and tells schedulers at commit).
pub async fn insert(
    conn: &mut PgConnection,
    f: &ScheduleFields,
    next_fire_at: Option<DateTime<Utc>>,
) -> CoreResult<ScheduleId> {
    let id = sqlx::query_scalar!(
        "INSERT INTO schedules (id, name, target, cron, timezone, enabled, misfire, overlap, next_fire_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        ScheduleId::random() as ScheduleId,
        f.name,
        Json(&f.target) as _,
        f.cron,
        f.timezone,
        f.enabled,
        f.misfire as Misfire,
        f.overlap as Overlap,
        next_fire_at,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| CoreError::name_taken(e, "schedule", &f.name))?;
    notify_changed(conn, id).await?;
    Ok(id)
}

/// Rewrites a schedule in the caller's transaction (and tells schedulers at commit).
/// A tick held back for a schedule being disabled is dropped.
pub async fn rewrite(
    conn: &mut PgConnection,
    id: ScheduleId,
    f: &ScheduleFields,
    next_fire_at: Option<DateTime<Utc>>,
) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE schedules SET name = $2, target = $3, cron = $4, timezone = $5, enabled = $6, misfire = $7, overlap = $8,
            next_fire_at = $9, buffered_for = CASE WHEN $6 THEN buffered_for END, updated_at = now()
         WHERE id = $1",
        id as ScheduleId,
        f.name,
        Json(&f.target) as _,
        f.cron,
        f.timezone,
        f.enabled,
        f.misfire as Misfire,
        f.overlap as Overlap,
        next_fire_at,
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| CoreError::name_taken(e, "schedule", &f.name))?;
    notify_changed(conn, id).await
}

/// One schedule.
pub async fn get(pool: &PgPool, id: ScheduleId) -> CoreResult<Schedule> {
    let row = sqlx::query_as!(ScheduleRow, "SELECT * FROM schedules WHERE id = $1", id as ScheduleId)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("schedule {id}")))?;
    Ok(row.into())
}

/// One schedule, locked for an update in the caller's transaction.
pub async fn lock(conn: &mut PgConnection, id: ScheduleId) -> CoreResult<Schedule> {
    let row = sqlx::query_as!(ScheduleRow, "SELECT * FROM schedules WHERE id = $1 FOR UPDATE", id as ScheduleId)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("schedule {id}")))?;
    Ok(row.into())
}

/// Schedules newest first, one page.
pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Schedule>> {
    let rows = sqlx::query_as!(
        ScheduleRow,
        "SELECT * FROM schedules WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(Schedule::from).collect();
    Ok(Page::from_rows(items, limit, |s: &Schedule| Cursor { created_at: s.created_at, id: s.id.0 }))
}

/// Deletes a schedule; its runs stay (their `schedule_id` becomes null).
pub async fn delete(pool: &PgPool, id: ScheduleId) -> CoreResult<()> {
    let r = sqlx::query!("DELETE FROM schedules WHERE id = $1", id as ScheduleId).execute(pool).await?;
    if r.rows_affected() == 0 {
        return Err(CoreError::not_found(format!("schedule {id}")));
    }
    Ok(())
}

/// When the earliest enabled schedule is due (the scheduler sleeps until then).
pub async fn next_due(pool: &PgPool) -> CoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar!("SELECT min(next_fire_at) FROM schedules WHERE enabled").fetch_one(pool).await?)
}

/// The next schedule with work to do, locked (`SKIP LOCKED`: another scheduler has the
/// others): one that is due, or one whose buffered tick's blocker has ended. Only its
/// id: reading it (`lock`) may find its stored target unreadable, and that must stop
/// this schedule only.
pub async fn lock_next_due(conn: &mut PgConnection) -> CoreResult<Option<ScheduleId>> {
    Ok(sqlx::query_scalar!(
        "SELECT s.id FROM schedules s
         WHERE s.enabled AND (s.next_fire_at <= now()
               OR (s.buffered_for IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM runs r WHERE r.schedule_id = s.id AND r.parent_run_id IS NULL
                     AND r.status IN ('queued', 'running'))))
         ORDER BY s.next_fire_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// Stops a schedule from firing (it cannot: its stored data is unreadable), counting
/// the tick as missed.
pub async fn disable(conn: &mut PgConnection, id: ScheduleId) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE schedules SET enabled = false, next_fire_at = NULL, buffered_for = NULL, missed_count = missed_count + 1
         WHERE id = $1",
        id as ScheduleId
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A run of this schedule that is still queued or running, if any.
pub async fn active_run(conn: &mut PgConnection, id: ScheduleId) -> CoreResult<Option<RunId>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM runs WHERE schedule_id = $1 AND parent_run_id IS NULL AND status IN ('queued', 'running') LIMIT 1",
        id as ScheduleId,
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// What a tick changed on its schedule.
#[derive(Debug, Clone, Copy)]
pub struct TickRecord {
    /// The next tick.
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The last tick that started a run.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// The tick held back for later.
    pub buffered_for: Option<DateTime<Utc>>,
    /// Runs started.
    pub fired: i64,
    /// Ticks skipped.
    pub skipped: i64,
    /// Ticks missed.
    pub missed: i64,
    /// Whether the schedule stays enabled.
    pub enabled: bool,
}

/// Writes what a tick decided.
pub async fn record_tick(conn: &mut PgConnection, id: ScheduleId, t: &TickRecord) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE schedules SET next_fire_at = $2, last_fired_at = $3, buffered_for = $4, fired_count = fired_count + $5,
            skipped_count = skipped_count + $6, missed_count = missed_count + $7, enabled = $8
         WHERE id = $1",
        id as ScheduleId,
        t.next_fire_at,
        t.last_fired_at,
        t.buffered_for,
        t.fired,
        t.skipped,
        t.missed,
        t.enabled,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
