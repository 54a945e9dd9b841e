//! `GET /api/v1/system/info`: version, uptime, live processes and queue depths.

use axum::{Json, extract::State};
use serde_json::{Value, json};
use switchboard_core::repo::processes;

use crate::{AppState, error::ApiResult};

pub async fn info(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let pool = &state.pool;
    let e = switchboard_core::CoreError::from;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'queued' AND NOT held AND kind <> 'campaign'")
        .fetch_one(pool)
        .await
        .map_err(e)?;
    let waiting_retry: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'queued' AND not_before > now()")
        .fetch_one(pool)
        .await
        .map_err(e)?;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'queued' AND held").fetch_one(pool).await.map_err(e)?;
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'running' AND kind <> 'campaign'")
        .fetch_one(pool)
        .await
        .map_err(e)?;
    let redis_depth = state.queue.depth().await.ok();
    let workers = processes::alive(pool, "worker", 15).await?;
    let schedulers = processes::alive(pool, "scheduler", 30).await?;
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started_at.elapsed().as_secs(),
        "namespace": state.queue.keys().namespace,
        "queues": {
            "runs": {
                "queued": queued,
                "waiting_for_retry": waiting_retry,
                "held_by_campaigns": held,
                "running": running,
                "redis_pending": redis_depth,
            }
        },
        "processes": {
            "workers": workers.iter().map(|(id, seen)| json!({"id": id, "last_seen_at": seen})).collect::<Vec<_>>(),
            "schedulers": schedulers.iter().map(|(id, seen)| json!({"id": id, "last_seen_at": seen})).collect::<Vec<_>>(),
        }
    })))
}
