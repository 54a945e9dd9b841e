//! The `processes` table: which api, worker and scheduler processes are alive.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Row};

use crate::CoreResult;

/// Records (or refreshes) this process as alive.
pub async fn beat(pool: &PgPool, id: &str, role: &str, info: &Value) -> CoreResult<()> {
    sqlx::query(
        "INSERT INTO processes (id, role, hostname, pid, info) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), info = EXCLUDED.info, stopped_at = NULL",
    )
    .bind(id)
    .bind(role)
    .bind(crate::ids::hostname())
    .bind(std::process::id() as i32)
    .bind(info)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks this process stopped (a clean exit).
pub async fn stopped(pool: &PgPool, id: &str) -> CoreResult<()> {
    sqlx::query("UPDATE processes SET stopped_at = now() WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// Processes of a role seen within `fresh_s` seconds and not stopped.
pub async fn alive(pool: &PgPool, role: &str, fresh_s: i64) -> CoreResult<Vec<(String, DateTime<Utc>)>> {
    let rows = sqlx::query(
        "SELECT id, last_seen_at FROM processes
         WHERE role = $1 AND stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => $2)
         ORDER BY id",
    )
    .bind(role)
    .bind(fresh_s as f64)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("last_seen_at")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// Forgets processes not seen for a day.
pub async fn prune(pool: &PgPool) -> CoreResult<u64> {
    let r = sqlx::query("DELETE FROM processes WHERE last_seen_at < now() - interval '1 day'").execute(pool).await?;
    Ok(r.rows_affected())
}
