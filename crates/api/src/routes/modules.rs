//! The module catalog, and starting a module run.

use std::collections::HashMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use switchboard_core::{
    catalog::{self, ModuleSpec},
    model::Run,
    pagination::{self, Page},
    repo::tokens::Principal,
    service::StartModule,
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, body, idempotency},
    requests::{ModuleRunBody, Start},
};

fn module(id: &str) -> ApiResult<&'static ModuleSpec> {
    catalog::find(id).ok_or_else(|| ApiError::not_found(format!("module {id} not found")))
}

/// `GET /modules`: the catalog in a stable order, paged like every list.
#[utoipa::path(
    get,
    path = "/api/v1/modules",
    operation_id = "listModules",
    tag = "modules",
    params(crate::extract::PageQuery),
    responses((status = 200, description = "The module catalog", body = Page<ModuleSpec>))
)]
pub async fn list(Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Page<ModuleSpec>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(pagination::slice(catalog::builtin(), q.limit()?, q.str("cursor"))?))
}

/// `GET /modules/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/modules/{id}",
    operation_id = "getModule",
    tag = "modules",
    params(("id" = String, Path, description = "The module's id")),
    responses((status = 200, description = "The module and its parameter schema", body = ModuleSpec))
)]
pub async fn get(Path(id): Path<String>) -> ApiResult<Json<&'static ModuleSpec>> {
    Ok(Json(module(&id)?))
}

/// `POST /modules/{id}/runs` `{params, device, priority?, timeout_s?, max_attempts?, max_queue_wait_s?}`.
#[utoipa::path(
    post,
    path = "/api/v1/modules/{id}/runs",
    operation_id = "startModuleRun",
    tag = "modules",
    params(("id" = String, Path, description = "The module's id"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first run for the same request (per token, 24 h)")),
    request_body(content = ModuleRunBody, content_type = "application/json"),
    responses((status = 202, description = "The run, queued", body = Run), (status = 200, description = "The run this Idempotency-Key started before", body = Run))
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Run>)> {
    let module = module(&id)?;
    let request = Start {
        of: module,
        body: body::<ModuleRunBody>(&headers, &bytes)?,
        idempotency: idempotency(&headers, &caller, &format!("modules {id}"), &bytes, state.config.idempotency_ttl_s)?,
    };
    let cmd = StartModule::try_from(request)?;
    let started = state.engine.start_module(&cmd).await?;
    Ok(crate::started(started))
}
