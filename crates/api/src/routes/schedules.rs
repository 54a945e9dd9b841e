//! Schedules: cron-triggered runs of a module, workflow or campaign.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use serde_json::{Value, json};
use switchboard_core::{
    cron_expr::parse_tz,
    repo::{
        runs,
        schedules::{self, Schedule, ScheduleInput},
    },
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, json_body, path_id},
};

pub async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(json!(schedules::list(&state.pool, q.limit()?, q.cursor()?).await?)))
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let input = ScheduleInput::parse(&json_body(&headers, &body)?, true)?;
    Ok((StatusCode::CREATED, Json(schedules::create(&state.pool, &input).await?)))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Schedule>> {
    Ok(Json(schedules::get(&state.pool, path_id("schedule", &id)?).await?))
}

pub async fn update(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Schedule>> {
    let id = path_id("schedule", &id)?;
    let input = ScheduleInput::parse(&json_body(&headers, &body)?, false)?;
    Ok(Json(schedules::update(&state.pool, id, &input).await?))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    schedules::delete(&state.pool, path_id("schedule", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/schedules/{id}/preview?count=N` (1 to 100, default 5): the next fire
/// times, in UTC and in the schedule's time zone.
pub async fn preview(State(state): State<AppState>, Path(id): Path<String>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let id = path_id("schedule", &id)?;
    let q = QueryParams::new(q, &["count"])?;
    let count = match q.int("count")? {
        None => 5,
        Some(n) if (1..=100).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid("count", &format!("must be between 1 and 100 (got {n})"))),
    };
    let s = schedules::get(&state.pool, id).await?;
    let tz = parse_tz(&s.timezone).map_err(|e| ApiError::invalid("timezone", &e))?;
    let times = schedules::preview(&state.pool, id, count).await?;
    let items: Vec<Value> = times
        .iter()
        .map(|t| json!({"at": t, "local": t.with_timezone(&tz).to_rfc3339()}))
        .collect();
    Ok(Json(json!({"schedule_id": id, "cron": s.cron, "timezone": s.timezone, "enabled": s.enabled, "items": items})))
}

/// `POST /api/v1/schedules/{id}/trigger`: a run now (`trigger: schedule`).
pub async fn trigger(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let id = path_id("schedule", &id)?;
    let (run, push) = schedules::trigger_now(&state.pool, id).await?;
    if !push.is_empty() && state.queue.push_many(&push).await.is_ok() {
        let _ = runs::mark_dispatched(&state.pool, &push).await;
    }
    let _ = runs::mark_dispatched(&state.pool, &[run]).await;
    Ok((StatusCode::ACCEPTED, Json(runs::get(&state.pool, run).await?)))
}
