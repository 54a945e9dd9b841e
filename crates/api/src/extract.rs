//! Request parsing with precise errors: JSON bodies, path ids and query parameters.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode, header},
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};

/// Parses a JSON body: 415 without a JSON content type, 400 for malformed JSON (with
/// line and column). An empty body reads as `{}`.
pub fn json_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected Content-Type: application/json (got {:?})", content_type),
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

/// A UUID from the path; a malformed one is 404 (no such resource can exist).
pub fn path_id(kind: &str, raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("{kind} {raw} not found (ids are UUIDs)")))
}

/// Query parameters, checked against the names an endpoint accepts.
pub struct QueryParams(pub HashMap<String, String>);

impl QueryParams {
    pub fn new(raw: HashMap<String, String>, allowed: &[&str]) -> ApiResult<QueryParams> {
        for key in raw.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(ApiError::invalid(key, &format!("unknown query parameter (expected one of {})", allowed.join(", "))));
            }
        }
        Ok(QueryParams(raw))
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).filter(|s| !s.is_empty())
    }

    pub fn parse<T: std::str::FromStr<Err = String>>(&self, key: &str) -> ApiResult<Option<T>> {
        self.str(key).map(|s| s.parse::<T>().map_err(|e| ApiError::invalid(key, &e))).transpose()
    }

    pub fn uuid(&self, key: &str) -> ApiResult<Option<Uuid>> {
        self.str(key).map(|s| Uuid::parse_str(s).map_err(|_| ApiError::invalid(key, "must be a UUID"))).transpose()
    }

    pub fn int(&self, key: &str) -> ApiResult<Option<i64>> {
        self.str(key).map(|s| s.parse::<i64>().map_err(|_| ApiError::invalid(key, "must be an integer"))).transpose()
    }

    pub fn time(&self, key: &str) -> ApiResult<Option<DateTime<Utc>>> {
        self.str(key)
            .map(|s| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| ApiError::invalid(key, "must be an RFC 3339 time, e.g. 2026-11-22T02:00:00Z"))
            })
            .transpose()
    }

    pub fn limit(&self) -> ApiResult<i64> {
        Ok(switchboard_core::pagination::limit(self.int("limit")?)?)
    }

    pub fn cursor(&self) -> ApiResult<Option<switchboard_core::pagination::Cursor>> {
        Ok(self.str("cursor").map(switchboard_core::pagination::Cursor::decode).transpose()?)
    }
}
