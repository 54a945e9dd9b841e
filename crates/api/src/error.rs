//! The error envelope, written in one place: every non-2xx answer is
//! `{"error": {"code", "message", "details", "request_id"}}`.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use switchboard_core::CoreError;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The current request's id (empty outside a request).
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default()
}

/// The error envelope, as the OpenAPI document describes it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of the error envelope.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// One of the codes of `docs/api.md`, fixed by the status (`validation_failed`,
    /// `not_found`, `rate_limited`, ...).
    #[schema(example = "validation_failed")]
    pub code: String,
    /// Said for people; match on `code` and `details`, never on this.
    pub message: String,
    /// `{fields: {name: problem}}` for 422, `{required_role, role}` for 403,
    /// `{limit, retry_after_s}` for 429, `{}` otherwise.
    #[schema(value_type = Object)]
    pub details: Value,
    /// The answer's `X-Request-Id`: quote it, the log has the rest.
    pub request_id: String,
}

/// An error answer: status, envelope code, message and details.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The envelope code of the status.
    pub code: &'static str,
    /// Said for people.
    pub message: String,
    /// `{"fields": {...}}` for validation errors.
    pub details: Value,
}

/// Results of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error of `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code_for(status), message: message.into(), details: json!({}) }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
    /// 422 about one field.
    pub fn invalid(field: &str, problem: &str) -> ApiError {
        CoreError::invalid(field, problem).into()
    }
    /// The same error with details.
    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }
}

/// The envelope code of each status.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "validation_failed",
        426 => "upgrade_required",
        429 => "rate_limited",
        503 | 504 => "unavailable",
        _ => "internal",
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        match e {
            CoreError::NotFound { what } => ApiError::not_found(format!("{what} not found")),
            CoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            CoreError::Validation { message, fields } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message).with_details(json!({"fields": fields}))
            }
            CoreError::BadRequest(m) => ApiError::bad_request(m),
            CoreError::Unauthorized(m) => ApiError::unauthorized(m),
            CoreError::IdempotencyKeyReused(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m.clone())
                .with_details(json!({"reason": "idempotency_key_reused", "fields": {"Idempotency-Key": m}})),
            // Internals (driver texts, SQL, constraint names) go to the log under the
            // request id, never into the answer: the caller gets what happened and
            // the id to quote.
            CoreError::Unavailable(m) => {
                tracing::warn!(error = %m, request_id = %current_request_id(), "a dependency is unavailable");
                let what = if m.starts_with("redis") { "redis" } else { "postgres" };
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{what} is unavailable; try again shortly"))
            }
            CoreError::Redis(m) => {
                tracing::warn!(error = %m, request_id = %current_request_id(), "redis error");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "redis is unavailable; try again shortly")
            }
            CoreError::Database(e) => {
                tracing::error!(error = %e, request_id = %current_request_id(), "database error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
            CoreError::Unreadable(m) => {
                // Stored data that does not decode: said plainly, so an operator knows
                // to mend a row; which column and why is in the log.
                tracing::error!(error = %m, request_id = %current_request_id(), "unreadable stored data");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "stored data is unreadable (the log names it under this request id)",
                )
            }
            CoreError::Internal(m) => {
                tracing::error!(error = %m, request_id = %current_request_id(), "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        envelope(self.status, self.code, &self.message, self.details, &current_request_id())
    }
}

/// Builds an envelope response.
pub fn envelope(status: StatusCode, code: &str, message: &str, details: Value, request_id: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message, "details": details, "request_id": request_id}});
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6750: say which scheme would be accepted.
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"switchboard\""));
    }
    resp
}
