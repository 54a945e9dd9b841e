//! Cross-cutting request handling: request ids, the request timeout, authentication,
//! and turning every plain-text error (axum's own rejections, 405s, 413s) into the
//! envelope.

use std::{net::SocketAddr, time::Duration};

use axum::{
    body::{Body, to_bytes},
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;

use switchboard_core::{
    ids::TokenId,
    meters,
    model::Role,
    repo::tokens::{self, Principal, Refused},
    telemetry,
};

use crate::{
    AppState,
    error::{ApiError, REQUEST_ID, envelope},
    limits,
};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Outermost layer: assigns (or echoes) the request id, bounds the request's time, and
/// makes sure every error answer is an envelope carrying that id.
pub async fn request_context(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 200 && s.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let timeout = Duration::from_secs(state.config.request_timeout_s.max(1));
    // The route template (`/api/v1/runs/{id}`), never the path: metric labels and span
    // names stay few whatever ids clients send.
    let route = req.extensions().get::<MatchedPath>().map_or("(unmatched)", |m| m.as_str()).to_string();
    let (method, started) = (req.method().clone(), std::time::Instant::now());
    let early = REQUEST_ID.scope(request_id.clone(), admit(&state, req)).await;
    let req = match early {
        Ok(req) => req,
        Err(resp) => {
            meters::http_request(method.as_str(), &route, resp.status().as_u16(), started.elapsed());
            return finish(resp, &request_id).await;
        }
    };
    let path = req.uri().path().to_string();
    let span = request_span(&req, &request_id, &route);
    let rid = request_id.clone();
    let resp = REQUEST_ID
        .scope(rid.clone(), async move {
            // The handler runs in a task of its own: at the timeout the client gets its
            // 503, and when the client goes away the handler is left to finish; it is
            // never cancelled halfway (a `begin()` cancelled mid-way leaves a pooled
            // connection inside a transaction: see `switchboard_core::db::Detached`).
            // Every request gets the timeout, whatever its headers say.
            let record = span.clone();
            let mut handler = tokio::spawn(REQUEST_ID.scope(rid.clone(), next.run(req)).instrument(span));
            let resp = match tokio::time::timeout(timeout, &mut handler).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a request's task failed");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
                }
                Err(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("request did not complete within {} s (a dependency may be unavailable)", timeout.as_secs()),
                )
                .into_response(),
            };
            record.record("http.response.status_code", resp.status().as_u16());
            meters::http_request(method.as_str(), &route, resp.status().as_u16(), started.elapsed());
            tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, request_id = %rid, "request");
            resp
        })
        .await;
    finish(resp, &request_id).await
}

/// The request's span. Every line logged while handling it carries the request id
/// (its fields: `span.request_id` in JSON logs) and its trace id. The path, never the
/// query: a WebSocket's `?token=` stays out of the log. A client's W3C `traceparent`
/// makes the request part of the client's trace.
fn request_span(req: &Request, request_id: &str, route: &str) -> tracing::Span {
    let (method, path) = (req.method(), req.uri().path());
    let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %path,
        otel.name = format!("{method} {route}"), otel.kind = "server", http.route = %route,
        http.response.status_code = tracing::field::Empty, trace_id = tracing::field::Empty);
    telemetry::adopt(&span, req.headers().get("traceparent").and_then(|v| v.to_str().ok()));
    span
}

/// Every answer leaves as an envelope (when an error) carrying the request id.
async fn finish(resp: Response, request_id: &str) -> Response {
    let mut resp = ensure_envelope(resp, request_id).await;
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// What a request must pass before a handler sees it: its address's rate limit, and
/// its whole body within the body read timeout and size limit. Reading the body here,
/// under a deadline, is what stops a body trickled in byte by byte from holding a
/// handler open (the handler's own timeout would leave its task running).
async fn admit(state: &AppState, req: Request) -> Result<Request, Response> {
    if let (Some(limit), Some(ConnectInfo(addr))) =
        (&state.limits.address, req.extensions().get::<ConnectInfo<SocketAddr>>())
    {
        limit.check(&addr.ip().to_string()).map_err(|wait| limits::too_many("address", wait))?;
    }
    let max = state.config.max_body_bytes;
    let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|len| len > max as u64) {
        return Err(too_large(max));
    }
    let (parts, body) = req.into_parts();
    let deadline = Duration::from_secs(state.config.body_read_timeout_s.max(1));
    let bytes = match tokio::time::timeout(deadline, read_body(body, max)).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {} s", deadline.as_secs()),
            )
            .into_response());
        }
        Ok(Err(resp)) => return Err(resp),
        Ok(Ok(bytes)) => bytes,
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

async fn read_body(body: Body, max: usize) -> Result<Vec<u8>, Response> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("the request body could not be read").into_response())?;
        if buf.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn too_large(max: usize) -> Response {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {max} bytes")).into_response()
}

/// An error answer that is not already JSON (axum's rejections and fallbacks) becomes an
/// envelope, keeping the status and using the original text as the message.
async fn ensure_envelope(resp: Response, request_id: &str) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text =
        to_bytes(body, 64 * 1024).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this path".to_string(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_string(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type".to_string(),
        StatusCode::NOT_FOUND if text.is_empty() => "no such route".to_string(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let mut out = envelope(status, crate::error::code_for(status), &message, json!({}), request_id);
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// The answer to a handler that panicked: the 500 envelope with the request id (set
/// by `request_context`, outside this layer), and the panic logged. Nothing reachable
/// from a request should panic; this keeps one that does from dropping the connection.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    tracing::error!(panic = message, request_id = %crate::error::current_request_id(), "a handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

/// Bearer authentication for `/api/v1` (the OpenAPI document and the host heartbeat
/// are routed outside it): the bootstrap admin token, or an API token found by its hash
/// in Postgres on every request, so a revocation or an expiry takes effect at the next
/// request on every api process. The caller (`Principal`) goes into the request's
/// extensions for the role check and for handlers.
pub async fn authenticate(State(state): State<AppState>, mut req: Request<Body>, next: Next) -> Response {
    // The WebSocket feed also takes `?token=` (a browser cannot set headers on a
    // WebSocket); the request log shows paths only, so the secret never reaches it.
    let from_query = req.uri().path().ends_with("/ws").then(|| query_token(req.uri())).flatten();
    let Some(presented) = bearer(req.headers()).map(str::to_string).or(from_query) else {
        return ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)").into_response();
    };
    let principal = match &state.config.admin_token {
        Some(admin) if constant_time_eq(admin.as_bytes(), presented.as_bytes()) => Principal::bootstrap(),
        _ => match tokens::authenticate(&state.engine.pool, &presented).await {
            Ok(Ok(p)) => p,
            Ok(Err(refused)) => return ApiError::unauthorized(refusal(refused)).into_response(),
            Err(e) => return ApiError::from(e).into_response(),
        },
    };
    if let Some(id) = principal.token_id {
        state.usage.saw(id);
    }
    if let Some(Err(wait)) = state.limits.token.as_ref().map(|l| l.check(&principal.scope())) {
        return limits::too_many("token", wait);
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// The `token` query parameter (percent-decoded), if any.
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    let axum::extract::Query(pairs) =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri).ok()?;
    pairs.get("token").filter(|t| !t.is_empty()).cloned()
}

/// Whether a request's bearer token is `secret` (compared in constant time).
pub fn bearer_matches(headers: &HeaderMap, secret: &str) -> bool {
    bearer(headers).is_some_and(|p| constant_time_eq(p.as_bytes(), secret.as_bytes()))
}

fn refusal(r: Refused) -> &'static str {
    match r {
        Refused::Unknown => "invalid token",
        Refused::Revoked => "this token was revoked",
        Refused::Expired => "this token has expired",
    }
}

/// The role check of one route (its role is part of the route's declaration in
/// `routes::table`): 403 naming the role needed.
pub async fn require_role(State(needed): State<Role>, req: Request<Body>, next: Next) -> Response {
    let Some(have) = req.extensions().get::<Principal>().map(|p| p.role) else {
        return ApiError::unauthorized("not authenticated").into_response();
    };
    if have < needed {
        return ApiError::new(StatusCode::FORBIDDEN, format!("this needs the {needed} role (this token is {have})"))
            .with_details(json!({"required_role": needed, "role": have}))
            .into_response();
    }
    next.run(req).await
}

/// When tokens were last used, kept in memory and written in batches (`flush`), so a
/// request costs no write.
#[derive(Debug, Default)]
pub struct Usage(std::sync::Mutex<std::collections::HashMap<TokenId, chrono::DateTime<chrono::Utc>>>);

impl Usage {
    /// Notes a use now.
    pub fn saw(&self, id: TokenId) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(id, chrono::Utc::now());
        }
    }

    /// Writes the uses noted since the last flush.
    pub async fn flush(&self, pool: &sqlx::PgPool) {
        let uses: Vec<_> = match self.0.lock() {
            Ok(mut m) => m.drain().collect(),
            Err(_) => return,
        };
        if uses.is_empty() {
            return;
        }
        if let Err(e) = tokens::record_uses(pool, &uses).await {
            tracing::debug!(error = %e, "could not record token uses");
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
