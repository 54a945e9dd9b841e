//! `GET /api/v1/search?q=`: one box to find anything by name (`repo::search`).

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Query, State},
};
use serde::Serialize;
use switchboard_core::repo::search::{self, Hit, MAX_QUERY};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::QueryParams,
};

/// What a search found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SearchResults {
    /// The query, trimmed.
    pub q: String,
    /// Best first.
    pub items: Vec<Hit>,
}

/// Devices (serial, name, labels), modules, workflows, campaigns, schedules and hosts
/// by name, and runs by id prefix (4 hex digits or more) or idempotency key; ranked
/// (exact, prefix, substring, near miss) and bounded.
#[utoipa::path(get, path = "/api/v1/search", operation_id = "search", tag = "system",
    params(
        ("q" = String, Query, min_length = 1, max_length = 200, description = "What to look for"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "At most this many (default 20)"),
    ),
    responses((status = 200, description = "What matched, best first", body = SearchResults)))]
pub async fn search(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<SearchResults>> {
    let q = QueryParams::new(q, &["q", "limit"])?;
    let text =
        q.str("q").map(str::trim).filter(|t| !t.is_empty()).ok_or_else(|| ApiError::invalid("q", "is required"))?;
    if text.chars().count() > MAX_QUERY {
        return Err(ApiError::invalid("q", &format!("must be at most {MAX_QUERY} characters")));
    }
    let limit = match q.int("limit")? {
        None => 20,
        Some(n) if (1..=100).contains(&n) => n,
        Some(_) => return Err(ApiError::invalid("limit", "must be between 1 and 100")),
    };
    let items = search::search(&state.engine.pool, text, limit).await?;
    Ok(Json(SearchResults { q: text.to_string(), items }))
}
