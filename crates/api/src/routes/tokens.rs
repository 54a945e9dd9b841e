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

use crate::error::ErrorBody;
use crate::{
    AppState,
    error::ApiResult,
    extract::{QueryParams, body, path_id},
    requests::{NewToken, TokenBody},
};

/// `GET /tokens`.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    operation_id = "listTokens",
    tag = "tokens",
    params(crate::extract::PageQuery),
    responses((status = 200, description = "A page of tokens, without secrets", body = Page<Token>))
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Page<Token>>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(tokens::list(&state.engine.pool, q.limit()?, q.cursor()?).await?))
}

/// `POST /tokens`: 201 `{id, name, role, expires_at, …, token}`.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    operation_id = "createToken",
    tag = "tokens",
    request_body(content = TokenBody, content_type = "application/json"),
    responses((status = 201, description = "The token and its secret, shown this once", body = CreatedToken), (status = 409, description = "A token with this name exists", body = ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let new = NewToken::try_from(body::<TokenBody>(&headers, &bytes)?)?;
    let (info, token) = tokens::create(&state.engine.pool, &new.name, new.role, new.expires_at).await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { info, token })))
}

/// A token as created: its fields and, this once, its secret.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The token.
    #[serde(flatten)]
    pub info: Token,
    /// The secret (`sb_` and 64 hex digits), shown this once: only its hash is kept.
    #[schema(example = "sb_3f7c…")]
    pub token: String,
}

/// `DELETE /tokens/{id}`: revoked at once, on every api process.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    operation_id = "revokeToken",
    tag = "tokens",
    params(("id" = uuid::Uuid, Path, description = "The token's id")),
    responses((status = 204, description = "Revoked, at once on every api process"))
)]
pub async fn revoke(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id: TokenId = path_id("token", &id)?;
    tokens::revoke(&state.engine.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
