//! Runs: listing, one run, its events; and the shared "insert then push" of a new run.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::IntoResponse,
};
use serde_json::{Value, json};
use switchboard_core::{
    input::Fields,
    model::{Run, RunKind, Trigger},
    repo::{
        campaigns, devices, events,
        runs::{self, NewRun, RunFilter},
    },
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{QueryParams, json_body, path_id},
    routes::modules::idempotency_key,
};

/// Inserts the run (Postgres first: guarantee 1), then pushes its id to Redis. A failed
/// push is not an error for the client: the run is safe in Postgres and the reconciler
/// delivers it.
pub async fn start_run(state: &AppState, new: &NewRun) -> ApiResult<(Run, bool)> {
    let (run, created) = runs::insert(&state.pool, new).await?;
    if created {
        match state.queue.push(run.id).await {
            Ok(()) => {
                // Recording the dispatch is bookkeeping: off the answer's path.
                let (pool, id) = (state.pool.clone(), run.id);
                tokio::spawn(async move {
                    if let Err(e) = runs::mark_dispatched(&pool, &[id]).await {
                        tracing::warn!(run_id = %id, error = %e, "could not record dispatch");
                    }
                });
            }
            Err(e) => tracing::warn!(run_id = %run.id, error = %e, "push to redis failed; the reconciler will deliver the run"),
        }
    }
    Ok((run, created))
}

const RUN_FILTERS: &[&str] = &["status", "kind", "device_id", "parent_run_id", "schedule_id", "since", "until", "limit", "cursor"];

fn run_filter(q: &QueryParams) -> ApiResult<RunFilter> {
    Ok(RunFilter {
        status: q.parse("status")?,
        kind: q.parse("kind")?,
        device_id: q.uuid("device_id")?,
        parent_run_id: q.uuid("parent_run_id")?,
        schedule_id: q.uuid("schedule_id")?,
        since: q.time("since")?,
        until: q.time("until")?,
    })
}

pub async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult<Json<Value>> {
    let q = QueryParams::new(q, RUN_FILTERS)?;
    let filter = run_filter(&q)?;
    let page = runs::list(&state.pool, &filter, q.limit()?, q.cursor()?).await?;
    Ok(Json(json!(page)))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    let id = path_id("run", &id)?;
    Ok(Json(runs::get(&state.pool, id).await?))
}

/// `GET /api/v1/runs/{id}/events?after=<event id>&limit=` in order; `next_cursor` is the
/// last event id when more follow.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let id = path_id("run", &id)?;
    let q = QueryParams::new(q, &["after", "cursor", "limit"])?;
    let limit = q.limit()?;
    let after = match (q.int("after")?, q.str("cursor")) {
        (Some(a), _) => a,
        (None, Some(c)) => c.parse::<i64>().map_err(|_| ApiError::invalid("cursor", "is not a cursor this API returned"))?,
        (None, None) => 0,
    };
    if !runs::exists(&state.pool, id).await? {
        return Err(ApiError::not_found(format!("run {id} not found")));
    }
    let mut items = events::for_run(&state.pool, id, after, limit + 1).await?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next = if more { items.last().map(|e| e.id.to_string()) } else { None };
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// `GET /api/v1/devices/{id}/runs`: the device's run history, newest first.
pub async fn for_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let id = path_id("device", &id)?;
    let q = QueryParams::new(q, &["status", "kind", "since", "until", "limit", "cursor"])?;
    devices::get(&state.pool, id).await?;
    let mut filter = run_filter(&q)?;
    filter.device_id = Some(id);
    let page = runs::list(&state.pool, &filter, q.limit()?, q.cursor()?).await?;
    Ok(Json(json!(page)))
}

/// `POST /api/v1/runs/{id}/cancel`: a queued run is cancelled at once; a running one is
/// interrupted by its worker (signalled through Redis, noticed by the lease heartbeat
/// otherwise) and its device released. Answers with the run after, waiting up to 3 s
/// for a running one to stop; 409 on a terminal run.
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    let id = path_id("run", &id)?;
    let outcome = runs::cancel(&state.pool, id, "cancelled by request").await?;
    if let runs::CancelOutcome::Terminal(status) = outcome {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!("run {id} is already {status}; a terminal run never changes"),
        )
        .with_details(json!({"status": status})));
    }
    let run = runs::get(&state.pool, id).await?;
    // A campaign cascades to its children; a child lets its campaign move on.
    if run.kind == RunKind::Campaign {
        advance_campaign(&state, id).await?;
    } else if let Some(parent) = run.parent_run_id {
        advance_campaign(&state, parent).await?;
    }
    if matches!(outcome, runs::CancelOutcome::Requested) && run.kind != RunKind::Campaign {
        state.queue.signal_cancel(id).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let run = runs::get(&state.pool, id).await?;
        if run.status.is_terminal() || std::time::Instant::now() >= deadline {
            return Ok(Json(run));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn advance_campaign(state: &AppState, parent: uuid::Uuid) -> ApiResult<()> {
    let a = campaigns::advance(&state.pool, parent).await?;
    if !a.admit.is_empty() {
        let _ = state.queue.push_many(&a.admit).await;
    }
    for child in a.signal {
        state.queue.signal_cancel(child).await;
    }
    Ok(())
}

/// `POST /api/v1/runs/{id}/pause`: a running workflow stops before its next step and
/// keeps its device lease while paused.
pub async fn pause(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    let id = path_id("run", &id)?;
    runs::set_paused(&state.pool, id, true).await?;
    Ok(Json(runs::get(&state.pool, id).await?))
}

/// `POST /api/v1/runs/{id}/resume`.
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Run>> {
    let id = path_id("run", &id)?;
    runs::set_paused(&state.pool, id, false).await?;
    Ok(Json(runs::get(&state.pool, id).await?))
}

/// `POST /api/v1/runs/{id}/retry` `{failed_only?}`: a new run of the same snapshot
/// (`trigger: retry`, `retry_of` set). For a campaign run, `failed_only: true` retries
/// only its failed, errored and timed-out children.
pub async fn retry(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult<impl IntoResponse> {
    let id = path_id("run", &id)?;
    let original = runs::get(&state.pool, id).await?;
    let body = json_body(&headers, &body)?;
    let mut f = Fields::new(&body, &["failed_only"])?;
    let failed_only = f.opt_bool("failed_only").unwrap_or(false);
    if failed_only && original.kind != RunKind::Campaign {
        f.errors.insert("failed_only".into(), "only applies to campaign runs".into());
    }
    f.finish()?;
    if !original.status.is_terminal() {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!("run {id} is still {}; only a finished run can be retried", original.status),
        ));
    }
    let key = idempotency_key(&headers)?;
    let (run, created) = if original.kind == RunKind::Campaign {
        let mut children: Vec<campaigns::ChildSpec> = serde_json::from_value(original.definition["items"].clone())
            .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("unreadable campaign snapshot: {e}")))?;
        if failed_only {
            let failed: Vec<i32> = sqlx::query_scalar(
                "SELECT parent_index FROM runs WHERE parent_run_id = $1 AND status IN ('failed', 'errored', 'timed_out')",
            )
            .bind(id)
            .fetch_all(&state.pool)
            .await
            .map_err(switchboard_core::CoreError::from)?;
            children.retain(|c| failed.contains(&c.index));
            if children.is_empty() {
                return Err(ApiError::new(axum::http::StatusCode::CONFLICT, format!("campaign run {id} has no failed or errored children")));
            }
        }
        let campaign_id = uuid::Uuid::parse_str(&original.target).unwrap_or_default();
        let header = campaigns::CampaignHeader::from_snapshot(campaign_id, &original.definition);
        let start = campaigns::CampaignStart {
            priority: original.priority,
            trigger: Trigger::Retry,
            schedule_id: None,
            scheduled_for: None,
            retry_of: Some(id),
            idempotency_key: key,
        };
        crate::routes::campaigns::launch(&state, &header, &children, &start).await?
    } else {
        let mut new = NewRun::new(original.kind, original.target.clone(), original.definition.clone(), original.params.clone(), original.selector.clone());
        new.priority = original.priority;
        new.timeout_s = original.timeout_s;
        new.max_attempts = original.max_attempts;
        new.trigger = Trigger::Retry;
        new.retry_of = Some(id);
        new.idempotency_key = key;
        start_run(&state, &new).await?
    };
    Ok((if created { axum::http::StatusCode::ACCEPTED } else { axum::http::StatusCode::OK }, Json(run)))
}

/// Pushes the queued runs a device could serve now (it joined, came back, or had its
/// breaker reset), so new capacity is used at once.
pub async fn dispatch_waiting(state: &AppState, device_id: uuid::Uuid) {
    let ids = match runs::waiting_for_device(&state.pool, device_id, 8).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for waiting runs");
            return;
        }
    };
    if !ids.is_empty() && state.queue.push_many(&ids).await.is_ok() {
        let _ = runs::mark_dispatched(&state.pool, &ids).await;
    }
}
