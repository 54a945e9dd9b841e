//! Campaign definitions, and starting a campaign run.

use std::collections::HashMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use switchboard_core::{
    ids::CampaignId,
    model::Run,
    pagination::Page,
    repo::campaigns::{self, Campaign, CampaignInput},
    repo::tokens::Principal,
    service::StartCampaign,
};

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, idempotency, path_id},
    requests::{CampaignBody, CampaignRunBody, Start},
};

/// `GET /campaigns`.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns",
    operation_id = "listCampaigns",
    tag = "campaigns",
    params(crate::extract::PageQuery),
    responses((status = 200, description = "A page of campaigns", body = Page<Campaign>))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Campaign>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(campaigns::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /campaigns`.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns",
    operation_id = "createCampaign",
    tag = "campaigns",
    request_body(content = CampaignBody, content_type = "application/json"),
    responses((status = 201, description = "The campaign", body = Campaign), (status = 409, description = "A campaign with this name exists", body = ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Campaign>)> {
    let input = CampaignInput::try_from(body::<CampaignBody>(&headers, &bytes)?)?;
    Ok((StatusCode::CREATED, Json(campaigns::create(&state.engine.pool, &input).await?)))
}

/// `GET /campaigns/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns/{id}",
    operation_id = "getCampaign",
    tag = "campaigns",
    params(("id" = uuid::Uuid, Path, description = "The campaign's id")),
    responses((status = 200, description = "The campaign", body = Campaign))
)]
pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Campaign>> {
    Ok(Json(campaigns::get(&state.engine.pool, path_id("campaign", &id)?).await?))
}

/// `PUT /campaigns/{id}`.
#[utoipa::path(
    put,
    path = "/api/v1/campaigns/{id}",
    operation_id = "replaceCampaign",
    tag = "campaigns",
    params(("id" = uuid::Uuid, Path, description = "The campaign's id")),
    request_body(content = CampaignBody, content_type = "application/json"),
    responses((status = 200, description = "The campaign, its version one higher", body = Campaign), (status = 409, description = "A campaign with this name exists", body = ErrorBody))
)]
pub async fn replace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<Campaign>> {
    let id: CampaignId = path_id("campaign", &id)?;
    let input = CampaignInput::try_from(body::<CampaignBody>(&headers, &bytes)?)?;
    Ok(Json(campaigns::update(&state.engine.pool, id, &input).await?))
}

/// `DELETE /campaigns/{id}`: 409 while a schedule uses it.
#[utoipa::path(
    delete,
    path = "/api/v1/campaigns/{id}",
    operation_id = "deleteCampaign",
    tag = "campaigns",
    params(("id" = uuid::Uuid, Path, description = "The campaign's id")),
    responses((status = 204, description = "Deleted"), (status = 409, description = "A schedule uses it", body = ErrorBody))
)]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    campaigns::delete(&state.engine.pool, path_id("campaign", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /campaigns/{id}/runs` `{priority?, timeout_s?}`: the campaign run and all its
/// children in one transaction; the first `max_parallel` children start at once.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns/{id}/runs",
    operation_id = "startCampaignRun",
    tag = "campaigns",
    params(("id" = uuid::Uuid, Path, description = "The campaign's id"), ("Idempotency-Key" = Option<String>, Header, description = "Replays the first run for the same request (per token, 24 h)")),
    request_body(content = CampaignRunBody, content_type = "application/json"),
    responses((status = 202, description = "The campaign run", body = Run), (status = 200, description = "The run this Idempotency-Key started before", body = Run))
)]
pub async fn start(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<Run>)> {
    let id: CampaignId = path_id("campaign", &id)?;
    campaigns::get(&state.engine.pool, id).await?;
    let ttl = state.config.idempotency_ttl_s;
    let key = idempotency(&headers, &caller, &format!("campaigns {id}"), &bytes, ttl)?;
    let request = Start { of: id, body: body::<CampaignRunBody>(&headers, &bytes)?, idempotency: key };
    let cmd = StartCampaign::try_from(request)?;
    let started = state.engine.launch_campaign(&cmd).await?;
    Ok(crate::started(started))
}
