//! Runs: listing, one run, its events, and what users do to runs (cancel, pause,
//! resume, retry).

use std::{collections::HashMap, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use serde::Serialize;
use switchboard_core::{
    events::Event,
    ids::{CaptureId, EventId, RunId},
    model::Run,
    pagination::Page,
    repo::tokens::Principal,
    repo::{
        captures, events,
        runs::{self, RunFilter},
    },
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, idempotency, path_id},
    requests::RetryBody,
};

/// How long `cancel` waits for a running run to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// `GET /runs`: filters `status`, `kind`, `device_id`, `parent_run_id`, `schedule_id`,
/// `since`, `until`.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Run>>> {
    let q = QueryParams::new(
        q,
        &["status", "kind", "device_id", "parent_run_id", "schedule_id", "since", "until", "limit", "cursor"],
    )?;
    let filter = RunFilter {
        status: q.parse("status")?,
        kind: q.parse("kind")?,
        device_id: q.id("device_id")?,
        parent_run_id: q.id("parent_run_id")?,
        schedule_id: q.id("schedule_id")?,
        since: q.time("since")?,
        until: q.time("until")?,
    };
    Ok(Json(runs::list(&state.engine.pool, &filter, q.limit()?, q.cursor()?).await?))
}

/// `GET /runs/{id}`: the run with its steps and, for a campaign run, its children's
/// counts.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(runs::get(&state.engine.pool, path_id("run", &id)?).await?))
}

/// A page of events; `next_cursor` is the last event id when more follow.
#[derive(Serialize)]
pub struct EventPage {
    items: Vec<Event>,
    next_cursor: Option<String>,
}

/// `GET /runs/{id}/events?after=<event id>&limit=`, in order.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<EventPage>> {
    let id: RunId = path_id("run", &id)?;
    let q = QueryParams::new(q, &["after", "cursor", "limit"])?;
    let limit = q.limit()?;
    let after = match (q.int("after")?, q.str("cursor")) {
        (Some(a), _) => a,
        (None, Some(c)) => {
            c.parse::<i64>().map_err(|_| ApiError::invalid("cursor", "is not a cursor this API returned"))?
        }
        (None, None) => 0,
    };
    if !runs::exists(&state.engine.pool, id).await? {
        return Err(ApiError::not_found(format!("run {id} not found")));
    }
    let mut items = events::for_run(&state.engine.pool, id, EventId(after), limit + 1).await?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more { items.last().map(|e| e.id.to_string()) } else { None };
    Ok(Json(EventPage { items, next_cursor }))
}

/// `POST /runs/{id}/cancel`: the run after; 409 on a terminal run.
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.cancel(path_id("run", &id)?, CANCEL_WAIT).await?))
}

/// `POST /runs/{id}/pause`: a running workflow stops before its next step and keeps
/// its device.
pub async fn pause(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.pause(path_id("run", &id)?).await?))
}

/// `POST /runs/{id}/resume`.
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.resume(path_id("run", &id)?).await?))
}

/// `POST /runs/{id}/retry` `{failed_only?}`: a new run of the same snapshot.
pub async fn retry(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Run>)> {
    let id: RunId = path_id("run", &id)?;
    runs::get(&state.engine.pool, id).await?;
    let failed_only = body::<RetryBody>(&headers, &bytes)?.failed_only()?;
    let key = idempotency(&headers, &caller, &format!("retry {id}"), &bytes, state.config.idempotency_ttl_s)?;
    let started = state.engine.retry(id, failed_only, key).await?;
    Ok(crate::started(started))
}

/// A run's captures.
#[derive(Debug, Serialize)]
pub struct CaptureList {
    /// Oldest first, without their bytes.
    pub items: Vec<captures::CaptureInfo>,
}

/// `GET /runs/{id}/captures`: what the run's modules stored (logcat excerpts, ...).
pub async fn captures(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<CaptureList>> {
    let id: RunId = path_id("run", &id)?;
    if !runs::exists(&state.engine.pool, id).await? {
        return Err(ApiError::not_found(format!("run {id} not found")));
    }
    Ok(Json(CaptureList { items: captures::list(&state.engine.pool, id).await? }))
}

/// `GET /runs/{id}/captures/{capture_id}`: the capture itself, with its media type.
pub async fn capture(
    State(state): State<AppState>,
    Path((id, capture_id)): Path<(String, String)>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let id: RunId = path_id("run", &id)?;
    let capture_id: CaptureId = path_id("capture", &capture_id)?;
    let (info, data) = captures::get(&state.engine.pool, id, capture_id).await?;
    // The name came from the module (`logcat-main.txt`); quotes are dropped all the same.
    let disposition = format!("inline; filename=\"{}\"", info.name.replace(['"', '\\', '\r', '\n'], ""));
    // Captures are text; served as such whatever was stored, and never sniffed into
    // something a browser would run.
    let _ = info.content_type;
    let headers = [
        (axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
        (axum::http::header::CONTENT_DISPOSITION, disposition),
        (axum::http::HeaderName::from_static("x-content-type-options"), "nosniff".to_string()),
        (axum::http::HeaderName::from_static("x-capture-truncated"), info.truncated.to_string()),
    ];
    Ok((headers, data).into_response())
}
