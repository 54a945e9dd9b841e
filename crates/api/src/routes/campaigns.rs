//! Campaign definitions, and starting a campaign run.

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
    input::Fields,
    model::{Run, Trigger},
    repo::campaigns::{self, Campaign, CampaignInput, CampaignStart},
};

use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, json_body, path_id},
    routes::modules::idempotency_key,
};

pub async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(json!(campaigns::list(&state.pool, q.limit()?, q.cursor()?).await?)))
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let input = CampaignInput::parse(&json_body(&headers, &body)?)?;
    Ok((StatusCode::CREATED, Json(campaigns::create(&state.pool, &input).await?)))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Campaign>> {
    Ok(Json(campaigns::get(&state.pool, path_id("campaign", &id)?).await?))
}

pub async fn replace(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Campaign>> {
    let id = path_id("campaign", &id)?;
    let input = CampaignInput::parse(&json_body(&headers, &body)?)?;
    Ok(Json(campaigns::update(&state.pool, id, &input).await?))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    campaigns::delete(&state.pool, path_id("campaign", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/campaigns/{id}/runs` `{priority?}`: the campaign run and all its
/// children in one transaction; the first `max_parallel` children start at once.
pub async fn start(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let id = path_id("campaign", &id)?;
    let campaign = campaigns::get(&state.pool, id).await?;
    let body = json_body(&headers, &body)?;
    let mut f = Fields::new(&body, &["priority"])?;
    let priority = f.opt_int("priority", 0, 9).unwrap_or(5) as i16;
    f.finish()?;
    let children = campaigns::snapshot(&state.pool, &campaign).await?;
    let start = CampaignStart {
        priority,
        trigger: Trigger::Api,
        schedule_id: None,
        scheduled_for: None,
        retry_of: None,
        idempotency_key: idempotency_key(&headers)?,
    };
    let (run, created) = launch(&state, &(&campaign).into(), &children, &start).await?;
    Ok((if created { StatusCode::ACCEPTED } else { StatusCode::OK }, Json(run)))
}

/// Creates the campaign run and pushes the children it admitted.
pub async fn launch(
    state: &AppState,
    header: &campaigns::CampaignHeader,
    children: &[campaigns::ChildSpec],
    start: &CampaignStart,
) -> ApiResult<(Run, bool)> {
    let (run, created, advance) = campaigns::start_run(&state.pool, header, children, start).await?;
    if !advance.admit.is_empty()
        && let Err(e) = state.queue.push_many(&advance.admit).await
    {
        tracing::warn!(error = %e, "could not push campaign children; the reconciler will deliver them");
    }
    Ok((run, created))
}
