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

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, path_id},
    requests::ScheduleBody,
};

/// `GET /schedules`.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Schedule>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(schedules::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /schedules`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Schedule>)> {
    let new = NewSchedule::try_from(body::<ScheduleBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(state.engine.create_schedule(&new).await?)))
}

/// `GET /schedules/{id}`.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Schedule>> {
    Ok(Json(schedules::get(&state.engine.pool, path_id("schedule", &id)?).await?))
}

/// `PATCH /schedules/{id}`.
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
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    schedules::delete(&state.engine.pool, path_id("schedule", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The next fire times of a schedule.
#[derive(Serialize)]
pub struct Preview {
    schedule_id: ScheduleId,
    cron: String,
    timezone: String,
    enabled: bool,
    items: Vec<Upcoming>,
}

/// `GET /schedules/{id}/preview?count=N` (1 to 100, default 5): the next fire times,
/// in UTC and in the schedule's time zone.
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
pub async fn trigger(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<Run>)> {
    Ok((StatusCode::ACCEPTED, Json(state.engine.trigger_schedule(path_id("schedule", &id)?).await?)))
}
