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
pub async fn list(Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Page<ModuleSpec>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(pagination::slice(catalog::builtin(), q.limit()?, q.str("cursor"))?))
}

/// `GET /modules/{id}`.
pub async fn get(Path(id): Path<String>) -> ApiResult<Json<&'static ModuleSpec>> {
    Ok(Json(module(&id)?))
}

/// `POST /modules/{id}/runs` `{params, device, priority?, timeout_s?, max_attempts?, max_queue_wait_s?}`.
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
