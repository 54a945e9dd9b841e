//! The module catalog, and starting a module run.

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
    catalog,
    input::Fields,
    model::RunKind,
    repo::{devices, runs::NewRun},
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, json_body},
    routes::runs::start_run,
};

pub async fn list(Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    QueryParams::new(q, &[])?;
    Ok(Json(json!({"items": catalog::builtin(), "next_cursor": null})))
}

pub async fn get(Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let module = catalog::find(&id).ok_or_else(|| ApiError::not_found(format!("module {id} not found")))?;
    Ok(Json(json!(module)))
}

/// `POST /api/v1/modules/{id}/runs` `{params, device, priority?, timeout_s?, max_attempts?}`.
pub async fn start(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let module = catalog::find(&id).ok_or_else(|| ApiError::not_found(format!("module {id} not found")))?;
    let body = json_body(&headers, &body)?;
    let mut f = Fields::new(&body, &["params", "device", "priority", "timeout_s", "max_attempts"])?;
    let params = match catalog::validate_params(module, f.raw("params"), "params") {
        Ok(p) => Some(p),
        Err(switchboard_core::CoreError::Validation { fields, .. }) => {
            f.errors.extend(fields);
            None
        }
        Err(e) => return Err(e.into()),
    };
    let selector = f.selector("device", true);
    let priority = f.opt_int("priority", 0, 9).unwrap_or(5) as i16;
    let timeout_s = f.opt_int("timeout_s", 1, 86_400).unwrap_or(module.default_timeout_s as i64) as i32;
    let max_attempts = f.opt_int("max_attempts", 1, 20).unwrap_or(module.max_attempts as i64) as i32;
    f.finish()?;
    let (params, selector) = (params.expect("checked"), selector.expect("checked"));
    if !devices::any_matching(&state.pool, &selector.to_json()).await? {
        return Err(ApiError::invalid("device", "no registered device matches this selector"));
    }
    let mut new = NewRun::new(
        RunKind::Module,
        module.id.to_string(),
        json!({"module": module.id, "params": params, "timeout_s": timeout_s}),
        params,
        Some(selector),
    );
    new.priority = priority;
    new.timeout_s = timeout_s;
    new.max_attempts = max_attempts;
    new.idempotency_key = idempotency_key(&headers)?;
    let (run, created) = start_run(&state, &new).await?;
    let status = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(run)))
}

pub fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.trim().is_empty() && s.len() <= 200 => Ok(Some(s.trim().to_string())),
            _ => Err(ApiError::invalid("Idempotency-Key", "must be 1 to 200 visible ASCII characters")),
        },
    }
}
