//! The append-only `events` table. Every state change writes its event in the same
//! transaction, through `append` (or, for the run writers, in the same statement).

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::{
    CoreResult,
    events::{Event, EventKind, Subject},
    ids::{DeviceId, EventId, HostId, RunId, ScheduleId},
};

/// Appends an event inside the caller's transaction.
pub async fn append(conn: &mut PgConnection, kind: EventKind, subject: Subject, data: Value) -> CoreResult<EventId> {
    Ok(sqlx::query_scalar!(
        "INSERT INTO events (type, run_id, device_id, schedule_id, host_id, data) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id",
        kind as EventKind,
        subject.run_id as Option<RunId>,
        subject.device_id as Option<DeviceId>,
        subject.schedule_id as Option<ScheduleId>,
        subject.host_id as Option<HostId>,
        data,
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// A run's events in order, after `after`, up to `limit`.
pub async fn for_run(pool: &PgPool, run: RunId, after: EventId, limit: i64) -> CoreResult<Vec<Event>> {
    Ok(sqlx::query_as!(
        Event,
        r#"SELECT id, type AS kind, at, run_id, device_id, schedule_id, host_id, data FROM events
           WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3"#,
        run as RunId,
        after as EventId,
        limit,
    )
    .fetch_all(pool)
    .await?)
}
