//! Workflow definitions, and starting a workflow run.

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
    repo::{
        campaigns, devices,
        runs::NewRun,
        workflows::{self, Workflow, WorkflowInput},
    },
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, json_body, path_id},
    routes::{modules::idempotency_key, runs::start_run},
};

pub async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let q = QueryParams::new(q, &["limit", "cursor"])?;
    Ok(Json(json!(workflows::list(&state.pool, q.limit()?, q.cursor()?).await?)))
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let input = WorkflowInput::parse(&json_body(&headers, &body)?)?;
    Ok((StatusCode::CREATED, Json(workflows::create(&state.pool, &input).await?)))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workflow>> {
    Ok(Json(workflows::get(&state.pool, path_id("workflow", &id)?).await?))
}

pub async fn replace(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Workflow>> {
    let id = path_id("workflow", &id)?;
    let input = WorkflowInput::parse(&json_body(&headers, &body)?)?;
    Ok(Json(workflows::update(&state.pool, id, &input).await?))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    workflows::delete(&state.pool, path_id("workflow", &id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/workflows/{id}/runs` `{device, params?, priority?, timeout_s?, max_attempts?}`.
/// `params` are defaults for every step whose module takes them (a step's own params
/// win); the run snapshots the workflow as it is now.
pub async fn start(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let id = path_id("workflow", &id)?;
    let workflow = workflows::get(&state.pool, id).await?;
    let body = json_body(&headers, &body)?;
    let mut f = Fields::new(&body, &["device", "params", "priority", "timeout_s", "max_attempts"])?;
    let selector = f.selector("device", true);
    let shared = f.opt_object("params").unwrap_or_else(|| json!({}));
    let priority = f.opt_int("priority", 0, 9).unwrap_or(5) as i16;
    let timeout_s = f.opt_int("timeout_s", 1, 86_400).map(|n| n as i32);
    let max_attempts = f.opt_int("max_attempts", 1, 20).map(|n| n as i32);
    // Merge shared params into each step, then validate every step again.
    let mut steps = workflow.steps.clone();
    if let Some(shared) = shared.as_object().filter(|o| !o.is_empty()) {
        let mut used = std::collections::BTreeSet::new();
        for (i, step) in steps.iter_mut().enumerate() {
            let Some(module) = catalog::find(&step.module) else { continue };
            let props = module.params_schema["properties"].as_object().cloned().unwrap_or_default();
            let mut merged = step.params.as_object().cloned().unwrap_or_default();
            for (k, v) in shared {
                if props.contains_key(k) {
                    used.insert(k.clone());
                    if workflow.steps[i].params.get(k).is_none() || is_default(module, k, &workflow.steps[i].params[k]) {
                        merged.insert(k.clone(), v.clone());
                    }
                }
            }
            match catalog::validate_params(module, Some(&Value::Object(merged)), &format!("params (steps[{i}])")) {
                Ok(p) => step.params = p,
                Err(switchboard_core::CoreError::Validation { fields, .. }) => f.errors.extend(fields),
                Err(e) => return Err(e.into()),
            }
        }
        for k in shared.keys().filter(|k| !used.contains(*k)) {
            f.errors.insert(format!("params.{k}"), "no step of this workflow takes this parameter".into());
        }
    }
    f.finish()?;
    let selector = selector.expect("checked");
    if !devices::any_matching(&state.pool, &selector.to_json()).await? {
        return Err(ApiError::invalid("device", "no registered device matches this selector"));
    }
    let snapshot = workflows::Workflow { steps, ..workflow };
    let child = campaigns::workflow_child(0, &snapshot, &selector, shared);
    let mut new = NewRun::new(child.kind, child.target, child.definition, child.params, Some(child.selector));
    new.priority = priority;
    new.timeout_s = timeout_s.unwrap_or(child.timeout_s);
    new.max_attempts = max_attempts.unwrap_or(child.max_attempts);
    new.idempotency_key = idempotency_key(&headers)?;
    let (run, created) = start_run(&state, &new).await?;
    Ok((if created { StatusCode::ACCEPTED } else { StatusCode::OK }, Json(run)))
}

/// Whether a step's value for `key` is just the module default (filled in at write
/// time), so run-level params may override it.
fn is_default(module: &catalog::ModuleSpec, key: &str, value: &Value) -> bool {
    module.params_schema["properties"][key].get("default") == Some(value)
}
