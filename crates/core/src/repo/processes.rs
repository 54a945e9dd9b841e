//! The `processes` table: which api, worker and scheduler processes are alive.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::{CoreResult, model::ProcessRole};

/// Records (or refreshes) this process as alive.
pub async fn beat(pool: &PgPool, id: &str, role: ProcessRole, info: &Value) -> CoreResult<()> {
    sqlx::query!(
        "INSERT INTO processes (id, role, hostname, pid, info) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), info = EXCLUDED.info, stopped_at = NULL",
        id,
        role as ProcessRole,
        crate::ids::hostname(),
        std::process::id() as i32,
        info,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks this process stopped (a clean exit).
pub async fn stopped(pool: &PgPool, id: &str) -> CoreResult<()> {
    sqlx::query!("UPDATE processes SET stopped_at = now() WHERE id = $1", id).execute(pool).await?;
    Ok(())
}

/// A process seen alive.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Alive {
    /// Its identity (`worker@host:pid:suffix`).
    pub id: String,
    /// When it last checked in.
    pub last_seen_at: DateTime<Utc>,
}

/// Processes of a role seen within `fresh_s` seconds and not stopped.
pub async fn alive(pool: &PgPool, role: ProcessRole, fresh_s: i64) -> CoreResult<Vec<Alive>> {
    Ok(sqlx::query_as!(
        Alive,
        "SELECT id, last_seen_at FROM processes
         WHERE role = $1 AND stopped_at IS NULL AND last_seen_at > now() - make_interval(secs => $2)
         ORDER BY id",
        role as ProcessRole,
        fresh_s as f64,
    )
    .fetch_all(pool)
    .await?)
}

/// Forgets processes not seen for a day (the reconciler calls it every pass).
pub async fn prune(pool: &PgPool) -> CoreResult<u64> {
    let r = sqlx::query!("DELETE FROM processes WHERE last_seen_at < now() - interval '1 day'").execute(pool).await?;
    Ok(r.rows_affected())
}
