//! The append-only `events` table. Every state change writes its event in the same
//! transaction, through `append`.

use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{CoreResult, model::Event};

/// Who an event is about.
#[derive(Debug, Default, Clone, Copy)]
pub struct Subject {
    pub run_id: Option<Uuid>,
    pub device_id: Option<Uuid>,
    pub schedule_id: Option<Uuid>,
}

impl Subject {
    pub fn run(run_id: Uuid, device_id: Option<Uuid>) -> Subject {
        Subject { run_id: Some(run_id), device_id, schedule_id: None }
    }
    pub fn device(device_id: Uuid) -> Subject {
        Subject { device_id: Some(device_id), ..Default::default() }
    }
}

/// Appends an event inside the caller's transaction and wakes live-feed listeners.
pub async fn append(conn: &mut PgConnection, kind: &str, subject: Subject, data: Value) -> CoreResult<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (type, run_id, device_id, schedule_id, data)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(kind)
    .bind(subject.run_id)
    .bind(subject.device_id)
    .bind(subject.schedule_id)
    .bind(data)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

fn from_row(r: &PgRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: r.try_get("id")?,
        kind: r.try_get("type")?,
        at: r.try_get("at")?,
        run_id: r.try_get("run_id")?,
        device_id: r.try_get("device_id")?,
        schedule_id: r.try_get("schedule_id")?,
        data: r.try_get("data")?,
    })
}

/// A run's events in order, after `after_id`, up to `limit`.
pub async fn for_run(pool: &PgPool, run_id: Uuid, after_id: i64, limit: i64) -> CoreResult<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT id, type, at, run_id, device_id, schedule_id, data FROM events
         WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(run_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}
