//! API tokens (admin): create (the secret shown once), list (never the secret), revoke.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use switchboard_core::{
    ids::TokenId,
    pagination::Page,
    repo::tokens::{self, Token},
};

use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, path_id},
    requests::{NewToken, TokenBody},
};

/// `GET /tokens`.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Token>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(tokens::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /tokens`: 201 `{id, name, role, expires_at, …, token}`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let new = NewToken::try_from(body::<TokenBody>(&headers, &bytes)?)?;
    let (token, secret) = tokens::create(&state.engine.pool, &new.name, new.role, new.expires_at).await?;
    // SPEC §4 names the secret `token`.
    let mut answer = serde_json::to_value(&token).unwrap_or_default();
    answer["token"] = serde_json::Value::String(secret);
    Ok((StatusCode::CREATED, Json(answer)))
}

/// `DELETE /tokens/{id}`: revoked at once, on every api process.
pub async fn revoke(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id: TokenId = path_id("token", &id)?;
    tokens::revoke(&state.engine.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
