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
    junit,
    model::{Run, RunKind, RunStatus},
    pagination::Page,
    repo::tokens::Principal,
    repo::{
        captures, events, reports,
        runs::{self, RunFilter},
    },
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, idempotency, path_id},
    requests::{Batch, RetryBody, RunBatchBody},
};

/// How long `cancel` waits for a running run to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// `GET /runs`: filters `status`, `kind`, `device_id`, `parent_run_id`, `schedule_id`,
/// `since`, `until`.
#[utoipa::path(
    get,
    path = "/api/v1/runs",
    operation_id = "listRuns",
    tag = "runs",
    params(("status" = Option<RunStatus>, Query), ("kind" = Option<RunKind>, Query), ("device_id" = Option<uuid::Uuid>, Query), ("parent_run_id" = Option<uuid::Uuid>, Query), ("schedule_id" = Option<uuid::Uuid>, Query), ("since" = Option<chrono::DateTime<chrono::Utc>>, Query), ("until" = Option<chrono::DateTime<chrono::Utc>>, Query), crate::extract::PageQuery),
    responses((status = 200, description = "A page of runs, newest first", body = Page<Run>))
)]
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

/// One run of a batch, as started.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchStarted {
    /// False when its `idempotency_key` returned the run it started before.
    pub created: bool,
    /// The run.
    pub run: Run,
}

/// What `POST /runs/batch` answers: the runs, in the order of the items.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResult {
    /// One per item, in order.
    pub runs: Vec<BatchStarted>,
}

/// `POST /runs/batch` `{runs: [...]}`: up to 1,000 module and workflow runs in one
/// transaction, all or none.
#[utoipa::path(
    post,
    path = "/api/v1/runs/batch",
    operation_id = "startRunBatch",
    tag = "runs",
    request_body(content = RunBatchBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Every run committed and queued (an item whose idempotency_key was used before with the same item returns that run, `created: false`)", body = BatchResult),
        (status = 200, description = "Every item's idempotency_key had started its run before", body = BatchResult),
        (status = 422, description = "An item is invalid (its fields named `runs[i].…`), or an idempotency_key came before with another item: nothing was started", body = ErrorBody)
    )
)]
pub async fn start_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<BatchResult>)> {
    let batch = Batch {
        body: body::<RunBatchBody>(&headers, &bytes)?,
        scope: caller.scope(),
        ttl_s: state.config.idempotency_ttl_s,
    };
    let items = Vec::try_from(batch)?;
    let started = state.engine.start_batch(&items).await?;
    let status = if started.iter().any(|s| s.created) { StatusCode::ACCEPTED } else { StatusCode::OK };
    let runs = started.into_iter().map(|s| BatchStarted { created: s.created, run: s.run }).collect();
    Ok((status, Json(BatchResult { runs })))
}

/// `GET /runs/{id}`: the run with its steps and, for a campaign run, its children's
/// counts.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}",
    operation_id = "getRun",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The run, its steps and (campaign) its children's counts", body = Run))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(runs::get(&state.engine.pool, path_id("run", &id)?).await?))
}

/// A page of events; `next_cursor` is the last event id when more follow.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    items: Vec<Event>,
    next_cursor: Option<String>,
}

/// `GET /runs/{id}/events?after=<event id>&limit=`, in order.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/events",
    operation_id = "listRunEvents",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id"), ("after" = Option<i64>, Query, minimum = 0, description = "Events after this event id"), crate::extract::PageQuery),
    responses((status = 200, description = "The run's events, oldest first", body = EventPage))
)]
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
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/cancel",
    operation_id = "cancelRun",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The run after", body = Run), (status = 409, description = "The run is terminal", body = ErrorBody))
)]
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.cancel(path_id("run", &id)?, CANCEL_WAIT).await?))
}

/// `POST /runs/{id}/pause`: a running workflow stops before its next step and keeps
/// its device.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/pause",
    operation_id = "pauseRun",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The run, paused", body = Run), (status = 409, description = "Not a running workflow, or paused already", body = ErrorBody))
)]
pub async fn pause(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.pause(path_id("run", &id)?).await?))
}

/// `POST /runs/{id}/resume`.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/resume",
    operation_id = "resumeRun",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The run, resumed", body = Run), (status = 409, description = "Not a paused workflow run", body = ErrorBody))
)]
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    Ok(Json(state.engine.resume(path_id("run", &id)?).await?))
}

/// `POST /runs/{id}/retry` `{failed_only?}`: a new run of the same snapshot.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/retry",
    operation_id = "retryRun",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first retry for the same request (per token, 24 h)")),
    request_body(content = RetryBody, content_type = "application/json"),
    responses((status = 202, description = "The new run", body = Run), (status = 200, description = "The run this Idempotency-Key started before", body = Run), (status = 409, description = "The run is not finished", body = ErrorBody))
)]
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CaptureList {
    /// Oldest first, without their bytes.
    pub items: Vec<captures::CaptureInfo>,
}

/// `GET /runs/{id}/captures`: what the run's modules stored (logcat excerpts, ...).
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/captures",
    operation_id = "listRunCaptures",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "The run's captures, without their bytes", body = CaptureList))
)]
pub async fn captures(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<CaptureList>> {
    let id: RunId = path_id("run", &id)?;
    if !runs::exists(&state.engine.pool, id).await? {
        return Err(ApiError::not_found(format!("run {id} not found")));
    }
    Ok(Json(CaptureList { items: captures::list(&state.engine.pool, id).await? }))
}

/// `GET /runs/{id}/captures/{capture_id}`: the capture itself, with its media type.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/captures/{capture_id}",
    operation_id = "getRunCapture",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id"), ("capture_id" = uuid::Uuid, Path, description = "The capture's id")),
    responses((status = 200, description = "The capture, as text", content_type = "text/plain", body = String))
)]
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

/// `GET /runs/{id}/junit.xml`: the run as a JUnit XML report, for CI (`docs/reports.md`).
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/junit.xml",
    operation_id = "getRunJunit",
    tag = "runs",
    params(("id" = uuid::Uuid, Path, description = "The run's id")),
    responses((status = 200, description = "One testsuite: a testcase per step, or per campaign item", content_type = "application/xml", body = String))
)]
pub async fn junit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<impl axum::response::IntoResponse> {
    let id: RunId = path_id("run", &id)?;
    let url = format!("{}/api/v1/runs/{id}", public_base(&headers));
    let suite = reports::junit_suite(&state.engine.pool, id, &url).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/xml; charset=utf-8")], junit::render(&suite)))
}

/// The server's root as the client reached it (`X-Forwarded-Proto` and `Host`, as a
/// proxy in front sets them), for links in reports.
fn public_base(headers: &HeaderMap) -> String {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let proto = get("x-forwarded-proto").filter(|p| matches!(*p, "http" | "https")).unwrap_or("http");
    let host = get("x-forwarded-host").or_else(|| get("host")).unwrap_or("localhost");
    // A Host header is the client's word: keep it to the characters a host can have.
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(*c)).collect();
    format!("{proto}://{host}")
}
