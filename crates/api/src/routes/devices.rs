//! The device registry.

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
    model::Device,
    repo::devices::{self, DeviceFilter, DevicePatch, NewDevice},
};

use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, json_body, path_id},
};

pub async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let q = QueryParams::new(q, &["status", "pool", "label", "host_id", "limit", "cursor"])?;
    let filter = DeviceFilter {
        status: q.parse("status")?,
        pool: q.str("pool").map(str::to_string),
        label: q.str("label").map(str::to_string),
        host_id: q.uuid("host_id")?,
    };
    let page = devices::list(&state.pool, &filter, q.limit()?, q.cursor()?).await?;
    Ok(Json(json!(page)))
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let body = json_body(&headers, &body)?;
    let new = NewDevice::parse(&body)?;
    let device = devices::create(&state.pool, &new).await?;
    crate::routes::runs::dispatch_waiting(&state, device.id).await;
    Ok((StatusCode::CREATED, Json(device)))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    let id = path_id("device", &id)?;
    Ok(Json(devices::get(&state.pool, id).await?))
}

pub async fn update(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Device>> {
    let id = path_id("device", &id)?;
    let body = json_body(&headers, &body)?;
    let patch = DevicePatch::parse(&body)?;
    let device = devices::update(&state.pool, id, &patch).await?;
    crate::routes::runs::dispatch_waiting(&state, device.id).await;
    Ok(Json(device))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = path_id("device", &id)?;
    devices::delete(&state.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/devices/{id}/breaker/reset`: closes the breaker; waiting runs may use
/// the device at once.
pub async fn reset_breaker(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    let id = path_id("device", &id)?;
    let device = devices::reset_breaker(&state.pool, id).await?;
    crate::routes::runs::dispatch_waiting(&state, id).await;
    Ok(Json(device))
}
