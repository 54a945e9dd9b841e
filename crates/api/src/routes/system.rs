//! `GET /api/v1/system/info`: version, uptime, live processes and queue depths.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Query, State},
};
use serde_json::{Value, json};
use switchboard_core::{
    model::ProcessRole,
    repo::{processes, stats},
};

use crate::{AppState, error::ApiResult, extract::QueryParams};

/// The deployment at a glance.
#[utoipa::path(
    get,
    path = "/api/v1/system/info",
    operation_id = "getSystemInfo",
    tag = "system",
    responses((status = 200, description = "Version, uptime, live processes and queue depths", body = serde_json::Value))
)]
pub async fn info(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    QueryParams::new(q, &[])?;
    let pool = &state.engine.pool;
    let queue = stats::queue_counts(pool).await?;
    let redis_pending = state.engine.queue.depth().await.ok();
    let workers = processes::alive(pool, ProcessRole::Worker, 15).await?;
    let schedulers = processes::alive(pool, ProcessRole::Scheduler, 30).await?;
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started_at.elapsed().as_secs(),
        "namespace": state.engine.queue.keys().namespace,
        "queues": {"runs": {
            "queued": queue.queued,
            "waiting_for_retry": queue.waiting_for_retry,
            "held_by_campaigns": queue.held_by_campaigns,
            "running": queue.running,
            "redis_pending": redis_pending,
        }},
        "processes": {"workers": workers, "schedulers": schedulers},
    })))
}
