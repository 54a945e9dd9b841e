//! Workflow definitions, and starting a workflow run.

use std::collections::HashMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use switchboard_core::{
    ids::WorkflowId,
    model::Run,
    pagination::Page,
    repo::tokens::Principal,
    repo::workflows::{self, Workflow, WorkflowInput},
    service::StartWorkflow,
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, idempotency, path_id},
    requests::{Start, WorkflowBody, WorkflowRunBody},
};

/// `GET /workflows`.
#[utoipa::path(
    get,
    path = "/api/v1/workflows",
    operation_id = "listWorkflows",
    tag = "workflows",
    params(crate::extract::PageQuery),
    responses((status = 200, description = "A page of workflows", body = Page<Workflow>))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Workflow>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(workflows::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /workflows`.
#[utoipa::path(
    post,
    path = "/api/v1/workflows",
    operation_id = "createWorkflow",
    tag = "workflows",
    request_body(content = WorkflowBody, content_type = "application/json"),
    responses((status = 201, description = "The workflow", body = Workflow), (status = 409, description = "A workflow with this name exists", body = ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Workflow>)> {
    let input = WorkflowInput::try_from(body::<WorkflowBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(workflows::create(&state.engine.pool, &input).await?)))
}

/// `GET /workflows/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/workflows/{id}",
    operation_id = "getWorkflow",
    tag = "workflows",
    params(("id" = uuid::Uuid, Path, description = "The workflow's id")),
    responses((status = 200, description = "The workflow", body = Workflow))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workflow>> {
    Ok(Json(workflows::get(&state.engine.pool, path_id("workflow", &id)?).await?))
}

/// `PUT /workflows/{id}`: a new version; runs already started keep their snapshot.
#[utoipa::path(
    put,
    path = "/api/v1/workflows/{id}",
    operation_id = "replaceWorkflow",
    tag = "workflows",
    params(("id" = uuid::Uuid, Path, description = "The workflow's id")),
    request_body(content = WorkflowBody, content_type = "application/json"),
    responses((status = 200, description = "The workflow, its version one higher", body = Workflow), (status = 409, description = "A workflow with this name exists", body = ErrorBody))
)]
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<Workflow>> {
    let id: WorkflowId = path_id("workflow", &id)?;
    let input = WorkflowInput::try_from(body::<WorkflowBody>(&headers, &bytes)?)?;
    Ok(Json(workflows::update(&state.engine.pool, id, &input).await?))
}

/// `DELETE /workflows/{id}`: 409 while a campaign or schedule uses it.
#[utoipa::path(
    delete,
    path = "/api/v1/workflows/{id}",
    operation_id = "deleteWorkflow",
    tag = "workflows",
    params(("id" = uuid::Uuid, Path, description = "The workflow's id")),
    responses((status = 204, description = "Deleted"), (status = 409, description = "A campaign or schedule uses it", body = ErrorBody))
)]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    workflows::delete(&state.engine.pool, path_id("workflow", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /workflows/{id}/runs` `{device, params?, priority?, timeout_s?, max_attempts?, max_queue_wait_s?}`.
/// `params` are defaults for every step whose module takes them (a step's own params
/// win); the run snapshots the workflow as it is now.
#[utoipa::path(
    post,
    path = "/api/v1/workflows/{id}/runs",
    operation_id = "startWorkflowRun",
    tag = "workflows",
    params(("id" = uuid::Uuid, Path, description = "The workflow's id"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first run for the same request (per token, 24 h)")),
    request_body(content = WorkflowRunBody, content_type = "application/json"),
    responses((status = 202, description = "The run, queued", body = Run), (status = 200, description = "The run this Idempotency-Key started before", body = Run))
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Run>)> {
    let id: WorkflowId = path_id("workflow", &id)?;
    workflows::get(&state.engine.pool, id).await?;
    let ttl = state.config.idempotency_ttl_s;
    let key = idempotency(&headers, &caller, &format!("workflows {id}"), &bytes, ttl)?;
    let request = Start { of: id, body: body::<WorkflowRunBody>(&headers, &bytes)?, idempotency: key };
    let cmd = StartWorkflow::try_from(request)?;
    let started = state.engine.start_workflow(&cmd).await?;
    Ok(crate::started(started))
}
