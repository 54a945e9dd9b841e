//! The host registry: agents register (getting their secret, shown once) and heartbeat
//! with their devices; operators list, read and delete hosts.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use serde::Serialize;
use switchboard_core::{
    ids::HostId,
    model::{Device, Host, HostStatus},
    pagination::{MAX_LIMIT, Page},
    repo::{
        devices::{self, DeviceFilter},
        hosts,
        presence::Synced,
    },
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, path_id},
    requests::{Heartbeat, HeartbeatBody, RegisterBody},
};

/// A host with its devices (`GET /hosts/{id}`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HostView {
    /// The host.
    #[serde(flatten)]
    pub host: Host,
    /// Its devices (up to 500), with their status and why.
    pub devices: Vec<Device>,
}

/// What registration answers: the host, its secret (only when new: keep it, it is
/// never shown again), and what its device report changed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Registered {
    /// The host.
    #[serde(flatten)]
    pub host: Host,
    /// The per-host secret, for heartbeats and for the worker's calls to the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// What the device report changed.
    pub device_report: Synced,
}

/// A heartbeat's answer: the host after it, and what its device report changed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Beat {
    /// The host.
    #[serde(flatten)]
    pub host: Host,
    /// What the device report changed.
    pub device_report: Synced,
}

/// `GET /hosts`: filter `status`.
#[utoipa::path(
    get,
    path = "/api/v1/hosts",
    operation_id = "listHosts",
    tag = "hosts",
    params(("status" = Option<HostStatus>, Query), crate::extract::PageQuery),
    responses((status = 200, description = "A page of hosts", body = Page<Host>))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Host>>> {
    let q = QueryParams::new(q, &["status", "limit", "cursor"])?;
    Ok(Json(hosts::list(&state.engine.pool, q.parse("status")?, q.limit()?, q.cursor()?).await?))
}

/// `POST /hosts/register`: 201 with the new host and its secret; 200 when the holder
/// of an existing host's secret (header `X-Host-Secret`) registers it again (new URL,
/// back online); 409 for anyone else.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/register",
    operation_id = "registerHost",
    tag = "hosts",
    request_body(content = RegisterBody, content_type = "application/json"),
    responses((status = 201, description = "The host and its secret (shown once)", body = Registered), (status = 200, description = "Registered again by the holder of its secret (X-Host-Secret): no new secret", body = Registered), (status = 409, description = "A host with this name exists", body = ErrorBody))
)]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    let reg = body::<RegisterBody>(&headers, &bytes)?.into_registration(state.config.host_timeout_s)?;
    let presented = headers.get("x-host-secret").and_then(|v| v.to_str().ok());
    let (report, secret) = state.engine.register_host(&reg.host, presented, reg.devices.as_deref()).await?;
    let status = if secret.is_some() { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(Registered { host: report.host, secret, device_report: report.devices })))
}

/// `POST /hosts/{id}/heartbeat`, authenticated by the host's own secret
/// (`Authorization: Bearer <host secret>`), not an API token.
#[utoipa::path(
    post,
    path = "/api/v1/hosts/{id}/heartbeat",
    operation_id = "hostHeartbeat",
    tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "The host's id")),
    request_body(content = HeartbeatBody, content_type = "application/json"),
    security(("host_secret" = [])),
    responses(
        (status = 200, description = "The host, and what its device report changed", body = Beat),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong host secret", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is wrong", body = ErrorBody),
        (status = 429, description = "Over the address's rate limit", body = ErrorBody),
        (status = 500, description = "A fault of ours", body = ErrorBody),
        (status = 503, description = "Postgres or Redis unavailable", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<Beat>> {
    let secret = crate::middleware::bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("missing host secret (Authorization: Bearer <host secret>)"))?;
    let id: HostId = path_id("host", &id)?;
    let beat = Heartbeat::try_from(body::<HeartbeatBody>(&headers, &bytes)?)?;
    let report =
        state.engine.host_heartbeat(id, secret, beat.agent_version.as_deref(), beat.devices.as_deref()).await?;
    Ok(Json(Beat { host: report.host, device_report: report.devices }))
}

/// `GET /hosts/{id}`: the host and its devices.
#[utoipa::path(
    get,
    path = "/api/v1/hosts/{id}",
    operation_id = "getHost",
    tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "The host's id")),
    responses((status = 200, description = "The host and its devices", body = HostView))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<HostView>> {
    let id: HostId = path_id("host", &id)?;
    let host = hosts::get(&state.engine.pool, id).await?;
    let filter = DeviceFilter { host_id: Some(id), ..DeviceFilter::default() };
    let devices = devices::list(&state.engine.pool, &filter, MAX_LIMIT, None).await?.items;
    Ok(Json(HostView { host, devices }))
}

/// `DELETE /hosts/{id}`: its devices go offline ("host X was deleted").
#[utoipa::path(
    delete,
    path = "/api/v1/hosts/{id}",
    operation_id = "deleteHost",
    tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "The host's id")),
    responses((status = 204, description = "Deleted"), (status = 409, description = "Its devices are running runs", body = ErrorBody))
)]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    state.engine.delete_host(path_id("host", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
