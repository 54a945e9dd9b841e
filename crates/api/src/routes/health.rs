//! Liveness and readiness.

use std::time::{Duration, Instant};

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::{Value, json};
use switchboard_core::{db, model::ProcessRole, repo::processes};

use crate::AppState;

/// Each dependency check gets this long; the whole answer comes within 2 s.
const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// `GET /health`: liveness, no dependency checked.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "operations", security(()),
    responses((status = 200, description = "The process is up", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

fn check(ok: bool, latency: Duration, extra: Value) -> Value {
    let mut v = json!({"ok": ok, "latency_ms": (latency.as_secs_f64() * 1000.0 * 100.0).round() / 100.0});
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    v
}

async fn timed<F, T, E>(f: F) -> (Result<T, String>, Duration)
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let r = match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            // The driver's text is for the log: this answer is unauthenticated.
            tracing::warn!(error = %e, "a health check failed");
            Err("unreachable".to_string())
        }
        Err(_) => Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
    };
    (r, start.elapsed())
}

fn err_json(e: Option<&String>) -> Value {
    e.map(|e| json!({"error": e})).unwrap_or(json!({}))
}

/// `GET /health/full`: Postgres, Redis, live workers and schedulers; 503 when Postgres
/// or Redis is down.
#[utoipa::path(get, path = "/health/full", operation_id = "healthFull", tag = "operations", security(()),
    responses(
        (status = 200, description = "Healthy or degraded (no worker or scheduler alive)", body = serde_json::Value),
        (status = 503, description = "Postgres or Redis unreachable", body = serde_json::Value),
    ))]
pub async fn full(State(state): State<AppState>) -> impl IntoResponse {
    let pool = &state.engine.pool;
    let pg = timed(db::ping(pool));
    let redis = timed(state.engine.queue.ping());
    let workers = timed(processes::alive(pool, ProcessRole::Worker, 15));
    let schedulers = timed(processes::alive(pool, ProcessRole::Scheduler, 30));
    let ((pg, pg_t), (redis, redis_t), (workers, w_t), (schedulers, s_t)) =
        tokio::join!(pg, redis, workers, schedulers);

    let pg_check = check(pg.is_ok(), pg_t, err_json(pg.as_ref().err()));
    let redis_check = check(redis.is_ok(), redis_t, err_json(redis.as_ref().err()));
    let worker_count = workers.as_ref().map(|w| w.len()).unwrap_or(0);
    let scheduler_count = schedulers.as_ref().map(|s| s.len()).unwrap_or(0);
    let workers_check = check(worker_count > 0, w_t, json!({"count": worker_count}));
    let scheduler_check = check(scheduler_count > 0, s_t, json!({"count": scheduler_count}));

    let status = if pg.is_err() || redis.is_err() {
        "unhealthy"
    } else if worker_count == 0 || scheduler_count == 0 {
        "degraded"
    } else {
        "healthy"
    };
    let code = if status == "unhealthy" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (
        code,
        Json(json!({"status": status, "checks": {
            "postgres": pg_check, "redis": redis_check, "workers": workers_check, "scheduler": scheduler_check
        }})),
    )
}
