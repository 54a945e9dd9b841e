//! The `run_captures` table: bounded excerpts (logcat, ...) a module stored with its
//! run, readable from the API.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    CoreError, CoreResult,
    ids::{CaptureId, RunId},
};

/// A capture to store. The driver bounded it already; `truncated` says it did.
#[derive(Debug, Clone)]
pub struct NewCapture {
    /// Its file name (`logcat-main.txt`).
    pub name: String,
    /// Its media type (`text/plain; charset=utf-8`).
    pub content_type: String,
    /// The bytes.
    pub data: Vec<u8>,
    /// Whether the driver cut it at its cap.
    pub truncated: bool,
}

/// What the API lists of a capture.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CaptureInfo {
    /// Its id (`GET /runs/{id}/captures/{capture_id}` serves it).
    pub id: CaptureId,
    /// The run.
    pub run_id: RunId,
    /// The step that took it (0 for a module run).
    pub step_index: i32,
    /// The attempt that took it.
    pub attempt: i32,
    /// Its file name.
    pub name: String,
    /// Its media type.
    pub content_type: String,
    /// Its size.
    pub size_bytes: i32,
    /// Whether it was cut at the cap.
    pub truncated: bool,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// Stores the captures of one step of one attempt.
pub async fn insert(pool: &PgPool, run: RunId, step: i32, attempt: i32, captures: &[NewCapture]) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    for c in captures {
        let size = i32::try_from(c.data.len()).map_err(|_| CoreError::Internal("capture over 2 GiB".into()))?;
        sqlx::query!(
            "INSERT INTO run_captures (id, run_id, step_index, attempt, name, content_type, size_bytes, truncated, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            CaptureId::random() as CaptureId,
            run as RunId,
            step,
            attempt,
            c.name,
            c.content_type,
            size,
            c.truncated,
            c.data,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A run's captures, oldest first (without their bytes).
pub async fn list(pool: &PgPool, run: RunId) -> CoreResult<Vec<CaptureInfo>> {
    Ok(sqlx::query_as!(
        CaptureInfo,
        "SELECT id, run_id, step_index, attempt, name, content_type, size_bytes, truncated, created_at
         FROM run_captures WHERE run_id = $1 ORDER BY created_at, id",
        run as RunId,
    )
    .fetch_all(pool)
    .await?)
}

/// One capture of a run, with its bytes.
pub async fn get(pool: &PgPool, run: RunId, id: CaptureId) -> CoreResult<(CaptureInfo, Vec<u8>)> {
    let row = sqlx::query!(
        "SELECT id, run_id, step_index, attempt, name, content_type, size_bytes, truncated, created_at, data
         FROM run_captures WHERE run_id = $1 AND id = $2",
        run as RunId,
        id as CaptureId,
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| CoreError::not_found(format!("capture {id} of run {run}")))?;
    let info = CaptureInfo {
        id: row.id,
        run_id: row.run_id,
        step_index: row.step_index,
        attempt: row.attempt,
        name: row.name,
        content_type: row.content_type,
        size_bytes: row.size_bytes,
        truncated: row.truncated,
        created_at: row.created_at,
    };
    Ok((info, row.data))
}
