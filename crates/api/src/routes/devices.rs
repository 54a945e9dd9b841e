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
    model::{Device, DeviceStatus, Run, RunKind, RunStatus},
    pagination::Page,
    repo::{
        devices::{self, DeviceFilter, DevicePatch, NewDevice},
        runs::{self, RunFilter},
    },
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, path_id},
    requests::{DeviceBody, DevicePatchBody},
};

/// `GET /devices`: filters `status`, `pool`, `label`, `host_id`.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    operation_id = "listDevices",
    tag = "devices",
    params(("status" = Option<DeviceStatus>, Query), ("pool" = Option<String>, Query), ("label" = Option<String>, Query, description = "Devices carrying this label"), ("host_id" = Option<uuid::Uuid>, Query), crate::extract::PageQuery),
    responses((status = 200, description = "A page of devices", body = Page<Device>))
)]
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
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    operation_id = "createDevice",
    tag = "devices",
    request_body(content = DeviceBody, content_type = "application/json"),
    responses((status = 201, description = "The device registered", body = Device), (status = 409, description = "A device with this serial exists", body = ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Device>)> {
    let new = NewDevice::try_from(body::<DeviceBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(state.engine.create_device(&new).await?)))
}

/// `GET /devices/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    operation_id = "getDevice",
    tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "The device's id")),
    responses((status = 200, description = "The device", body = Device))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    let id: DeviceId = path_id("device", &id)?;
    Ok(Json(devices::get(&state.engine.pool, id).await?))
}

/// `PATCH /devices/{id}`.
#[utoipa::path(
    patch,
    path = "/api/v1/devices/{id}",
    operation_id = "updateDevice",
    tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "The device's id")),
    request_body(content = DevicePatchBody, content_type = "application/json"),
    responses((status = 200, description = "The device after", body = Device))
)]
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
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}",
    operation_id = "deleteDevice",
    tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "The device's id")),
    responses((status = 204, description = "Deleted; its queued runs end errored"), (status = 409, description = "The device is running a run", body = ErrorBody))
)]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.engine.delete_device(path_id("device", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /devices/{id}/breaker/reset`: closes the breaker; waiting runs may use the
/// device at once.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/breaker/reset",
    operation_id = "resetDeviceBreaker",
    tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "The device's id")),
    responses((status = 200, description = "The device, its breaker closed", body = Device))
)]
pub async fn reset_breaker(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Device>> {
    Ok(Json(state.engine.reset_breaker(path_id("device", &id)?).await?))
}

/// `GET /devices/{id}/runs`: the device's run history, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/runs",
    operation_id = "listDeviceRuns",
    tag = "devices",
    params(("id" = uuid::Uuid, Path, description = "The device's id"), ("status" = Option<RunStatus>, Query), ("kind" = Option<RunKind>, Query), ("since" = Option<chrono::DateTime<chrono::Utc>>, Query), ("until" = Option<chrono::DateTime<chrono::Utc>>, Query), crate::extract::PageQuery),
    responses((status = 200, description = "The device's runs, newest first", body = Page<Run>))
)]
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
