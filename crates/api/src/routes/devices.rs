//! The device registry, and a device's run history.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use switchboard_core::{
    ids::DeviceId,
    model::{Device, Run},
    pagination::Page,
    repo::{
        devices::{self, DeviceFilter, DevicePatch, NewDevice},
        runs::{self, RunFilter},
    },
};

use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, path_id},
    requests::{DeviceBody, DevicePatchBody},
};

/// `GET /devices`: filters `status`, `pool`, `label`, `host_id`.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Device>>> {
    let q = QueryParams::new(q, &["status", "pool", "label", "host_id", "limit", "cursor"])?;
    let filter = DeviceFilter {
        status: q.parse("status")?,
        pool: q.str("pool").map(str::to_string),
        label: q.str("label").map(str::to_string),
        host_id: q.id("host_id")?,
    };
    Ok(Json(devices::list(&state.engine.pool, &filter, q.limit()?, q.cursor()?).await?))
}

/// `POST /devices`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Device>)> {
    let new = NewDevice::try_from(body::<DeviceBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(state.engine.create_device(&new).await?)))
}

/// `GET /devices/{id}`.
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    let id: DeviceId = path_id("device", &id)?;
    Ok(Json(devices::get(&state.engine.pool, id).await?))
}

/// `PATCH /devices/{id}`.
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<Device>> {
    let id: DeviceId = path_id("device", &id)?;
    let patch = DevicePatch::try_from(body::<DevicePatchBody>(&headers, &bytes)?)?;
    Ok(Json(state.engine.update_device(id, &patch).await?))
}

/// `DELETE /devices/{id}`.
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.engine.delete_device(path_id("device", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /devices/{id}/breaker/reset`: closes the breaker; waiting runs may use the
/// device at once.
pub async fn reset_breaker(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    Ok(Json(state.engine.reset_breaker(path_id("device", &id)?).await?))
}

/// `GET /devices/{id}/runs`: the device's run history, newest first.
pub async fn runs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Run>>> {
    let id: DeviceId = path_id("device", &id)?;
    let q = QueryParams::new(q, &["status", "kind", "since", "until", "limit", "cursor"])?;
    devices::get(&state.engine.pool, id).await?;
    let filter = RunFilter {
        status: q.parse("status")?,
        kind: q.parse("kind")?,
        device_id: Some(id),
        since: q.time("since")?,
        until: q.time("until")?,
        ..RunFilter::default()
    };
    Ok(Json(runs::list(&state.engine.pool, &filter, q.limit()?, q.cursor()?).await?))
}
