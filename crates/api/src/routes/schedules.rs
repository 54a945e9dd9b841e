//! Schedules: cron-triggered runs of a module, workflow or campaign.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use serde::Serialize;
use switchboard_core::{
    ids::ScheduleId,
    model::Run,
    pagination::Page,
    repo::schedules::{self, Schedule},
    service::{NewSchedule, SchedulePatch, Upcoming},
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, path_id},
    requests::ScheduleBody,
};

/// `GET /schedules`.
#[utoipa::path(
    get,
    path = "/api/v1/schedules",
    operation_id = "listSchedules",
    tag = "schedules",
    params(crate::extract::PageQuery),
    responses((status = 200, description = "A page of schedules", body = Page<Schedule>))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Schedule>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(schedules::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /schedules`.
#[utoipa::path(
    post,
    path = "/api/v1/schedules",
    operation_id = "createSchedule",
    tag = "schedules",
    request_body(content = ScheduleBody, content_type = "application/json"),
    responses((status = 201, description = "The schedule", body = Schedule), (status = 409, description = "A schedule with this name exists", body = ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Schedule>)> {
    let new = NewSchedule::try_from(body::<ScheduleBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(state.engine.create_schedule(&new).await?)))
}

/// `GET /schedules/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/schedules/{id}",
    operation_id = "getSchedule",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule's id")),
    responses((status = 200, description = "The schedule and its decisions", body = Schedule))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Schedule>> {
    Ok(Json(schedules::get(&state.engine.pool, path_id("schedule", &id)?).await?))
}

/// `PATCH /schedules/{id}`.
#[utoipa::path(
    patch,
    path = "/api/v1/schedules/{id}",
    operation_id = "updateSchedule",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule's id")),
    request_body(content = ScheduleBody, content_type = "application/json"),
    responses((status = 200, description = "The schedule after", body = Schedule), (status = 409, description = "A schedule with this name exists", body = ErrorBody))
)]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<Schedule>> {
    let id: ScheduleId = path_id("schedule", &id)?;
    let patch = SchedulePatch::try_from(body::<ScheduleBody>(&headers, &bytes)?)?;
    Ok(Json(state.engine.update_schedule(id, &patch).await?))
}

/// `DELETE /schedules/{id}`: its runs stay.
#[utoipa::path(
    delete,
    path = "/api/v1/schedules/{id}",
    operation_id = "deleteSchedule",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule's id")),
    responses((status = 204, description = "Deleted"))
)]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    schedules::delete(&state.engine.pool, path_id("schedule", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The next fire times of a schedule.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Preview {
    schedule_id: ScheduleId,
    cron: String,
    timezone: String,
    enabled: bool,
    items: Vec<Upcoming>,
}

/// `GET /schedules/{id}/preview?count=N` (1 to 100, default 5): the next fire times,
/// in UTC and in the schedule's time zone.
#[utoipa::path(
    get,
    path = "/api/v1/schedules/{id}/preview",
    operation_id = "previewSchedule",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule's id"), ("count" = Option<i64>, Query, minimum = 1, maximum = 100, description = "How many fire times (default 5)")),
    responses((status = 200, description = "The next fire times", body = Preview))
)]
pub async fn preview(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Preview>> {
    let id: ScheduleId = path_id("schedule", &id)?;
    let q = QueryParams::new(q, &["count"])?;
    let count = match q.int("count")? {
        None => 5,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid("count", &format!("must be between 1 and 100 (got {n})"))),
    };
    let (s, items) = state.engine.preview_schedule(id, count).await?;
    Ok(Json(Preview { schedule_id: id, cron: s.cron, timezone: s.timezone, enabled: s.enabled, items }))
}

/// `POST /schedules/{id}/trigger`: a run now (`trigger: schedule`).
#[utoipa::path(
    post,
    path = "/api/v1/schedules/{id}/trigger",
    operation_id = "triggerSchedule",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule's id")),
    responses((status = 202, description = "The run, started now", body = Run))
)]
pub async fn trigger(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<Run>)> {
    Ok((StatusCode::ACCEPTED, Json(state.engine.trigger_schedule(path_id("schedule", &id)?).await?)))
}
