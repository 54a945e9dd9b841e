//! Reading requests, with precise errors: JSON bodies into typed request structs
//! (serde, then `TryFrom` into core commands), path ids, query parameters and the
//! `Idempotency-Key` header.
//!
//! A request struct's fields are `Field<T>`: deserializing one never fails, it records
//! what it found (missing, null, a value, or why the value is not a `T`), so one answer
//! can name every bad field, which plain serde (stopping at the first) cannot.

use std::{collections::BTreeMap, collections::HashMap, str::FromStr};

use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode, header},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;
use switchboard_core::{
    launch::Idempotency,
    pagination::{self, Cursor},
    repo::tokens::{self, Principal},
    validation::{Problems, find_nul},
};

use crate::error::{ApiError, ApiResult};

/// One field of a request body, as found.
#[derive(Debug, Default)]
pub enum Field<T> {
    /// Absent.
    #[default]
    Missing,
    /// `null`.
    Null,
    /// A value of the right type.
    Value(T),
    /// A value of the wrong type: why.
    Invalid(String),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(d)?;
        if raw.is_null() {
            return Ok(Field::Null);
        }
        Ok(match T::deserialize(raw) {
            Ok(v) => Field::Value(v),
            Err(e) => Field::Invalid(plain(&e.to_string())),
        })
    }
}

/// serde's "invalid type: string \"x\", expected i64" as "must be an integer (got a
/// string \"x\")".
fn plain(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: ") else { return message.to_string() };
    let Some((got, want)) = rest.split_once(", expected ") else { return message.to_string() };
    let want = match want {
        "i16" | "i32" | "i64" | "u16" | "u32" | "u64" => "an integer",
        "a sequence" => "an array",
        "a map" => "an object",
        other => other,
    };
    format!("must be {want} (got {got})")
}

impl<T> Field<T> {
    /// The value of a required field; records a problem (so `None` is always
    /// accompanied by one) when it is missing, null or invalid.
    pub fn required(self, name: &str, p: &mut Problems, hint: &str) -> Option<T> {
        match self {
            Field::Value(v) => Some(v),
            Field::Missing | Field::Null => {
                p.add(name, if hint.is_empty() { "is required".to_string() } else { format!("is required: {hint}") });
                None
            }
            Field::Invalid(why) => {
                p.add(name, why);
                None
            }
        }
    }

    /// The value of an optional field (absent and null both mean `None`).
    pub fn optional(self, name: &str, p: &mut Problems) -> Option<T> {
        match self {
            Field::Value(v) => Some(v),
            Field::Missing | Field::Null => None,
            Field::Invalid(why) => {
                p.add(name, why);
                None
            }
        }
    }

    /// A PATCH field: absent means "unchanged", null is refused.
    pub fn patch(self, name: &str, p: &mut Problems) -> Option<T> {
        match self {
            Field::Null => {
                p.add(name, "cannot be null");
                None
            }
            other => other.optional(name, p),
        }
    }

    /// A PATCH field that may be cleared: `None` unchanged, `Some(None)` cleared.
    pub fn clearable(self, name: &str, p: &mut Problems) -> Option<Option<T>> {
        match self {
            Field::Missing => None,
            Field::Null => Some(None),
            other => other.optional(name, p).map(Some),
        }
    }

    /// Whether the field was given at all (even as null).
    pub fn given(&self) -> bool {
        !matches!(self, Field::Missing)
    }
}

/// The fields of a body that its request struct does not know.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct Unknown(BTreeMap<String, Value>);

impl Unknown {
    /// Records each unknown field, naming the ones expected.
    pub fn check(&self, expected: &[&str], p: &mut Problems) {
        for key in self.0.keys() {
            p.add(key.clone(), format!("unknown field (expected one of {})", expected.join(", ")));
        }
    }
}

/// Parses a JSON body into a request struct: 415 without a JSON content type, 400 for
/// malformed JSON (with line and column) or a body that is not an object, 422 for a
/// NUL character in any string (Postgres text and jsonb cannot hold it). An empty
/// body reads as `{}`.
pub fn body<T: DeserializeOwned>(headers: &HeaderMap, bytes: &Bytes) -> ApiResult<T> {
    let value: Value = if bytes.is_empty() {
        Value::Object(Default::default())
    } else {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("expected Content-Type: application/json (got {content_type:?})"),
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    if let Some(path) = find_nul(&value, "") {
        return Err(ApiError::invalid(&path, "must not contain a NUL character (\\u0000)"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("request body does not fit: {e}")))
}

/// A typed id from the path; a malformed one is 404 (no such resource can exist).
pub fn path_id<T: FromStr>(kind: &str, raw: &str) -> ApiResult<T> {
    raw.parse().map_err(|_| ApiError::not_found(format!("{kind} {raw} not found (ids are UUIDs)")))
}

/// The `Idempotency-Key` header, if given.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.trim().is_empty() && s.len() <= 200 => Ok(Some(s.trim().to_string())),
            _ => Err(ApiError::invalid("Idempotency-Key", "must be 1 to 200 visible ASCII characters")),
        },
    }
}

/// The `Idempotency-Key` header as kept: scoped to the calling token, and bound to
/// this request by a fingerprint of `what` (the operation and its path ids) and the
/// body in canonical form (keys sorted, no spacing), so a key sent again with the same
/// request replays its run and with another request is refused.
pub fn idempotency(
    headers: &HeaderMap,
    caller: &Principal,
    what: &str,
    bytes: &[u8],
    ttl_s: u32,
) -> ApiResult<Option<Idempotency>> {
    let Some(key) = idempotency_key(headers)? else { return Ok(None) };
    // `body` has read it already; an empty body means `{}` there, and here.
    let canonical = serde_json::from_slice::<Value>(bytes).map(|v| v.to_string()).unwrap_or_else(|_| "{}".into());
    Ok(Some(Idempotency {
        scope: caller.scope(),
        key,
        fingerprint: tokens::hash(&format!("{what}\n{canonical}")),
        ttl_s: i64::from(ttl_s),
    }))
}

/// The paging parameters every list takes, as the OpenAPI document shows them (lists
/// read them through `QueryParams`).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Query parameters, checked against the names an endpoint accepts.
pub struct QueryParams(HashMap<String, String>);

impl QueryParams {
    /// Refuses names the endpoint does not take, and NUL characters.
    pub fn new(raw: HashMap<String, String>, allowed: &[&str]) -> ApiResult<QueryParams> {
        for (key, value) in &raw {
            if !allowed.contains(&key.as_str()) {
                let expected = if allowed.is_empty() {
                    "this endpoint takes none".to_string()
                } else {
                    format!("expected one of {}", allowed.join(", "))
                };
                return Err(ApiError::invalid(key, &format!("unknown query parameter ({expected})")));
            }
            if value.contains('\0') {
                return Err(ApiError::invalid(key, "must not contain a NUL character"));
            }
        }
        Ok(QueryParams(raw))
    }

    /// A non-empty value.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).filter(|s| !s.is_empty())
    }

    /// A value parsed with `FromStr` (enums say "must be one of ...").
    pub fn parse<T: FromStr<Err = String>>(&self, key: &str) -> ApiResult<Option<T>> {
        self.str(key).map(|s| s.parse::<T>().map_err(|e| ApiError::invalid(key, &e))).transpose()
    }

    /// A typed id.
    pub fn id<T: FromStr>(&self, key: &str) -> ApiResult<Option<T>> {
        self.str(key).map(|s| s.parse::<T>().map_err(|_| ApiError::invalid(key, "must be a UUID"))).transpose()
    }

    /// An integer.
    pub fn int(&self, key: &str) -> ApiResult<Option<i64>> {
        self.str(key).map(|s| s.parse::<i64>().map_err(|_| ApiError::invalid(key, "must be an integer"))).transpose()
    }

    /// An RFC 3339 time.
    pub fn time(&self, key: &str) -> ApiResult<Option<DateTime<Utc>>> {
        self.str(key)
            .map(|s| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| ApiError::invalid(key, "must be an RFC 3339 time, e.g. 2026-11-22T02:00:00Z"))
            })
            .transpose()
    }

    /// `limit` (default 50, 1 to 500).
    pub fn limit(&self) -> ApiResult<i64> {
        Ok(pagination::limit(self.int("limit")?)?)
    }

    /// `cursor`, as a list endpoint returned it.
    pub fn cursor(&self) -> ApiResult<Option<Cursor>> {
        Ok(self.str("cursor").map(Cursor::decode).transpose()?)
    }
}
