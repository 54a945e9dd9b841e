//! `GET /metrics`: this process's metrics in the Prometheus text format, rendered by
//! `metrics-exporter-prometheus` from what the `metrics` crate recorded (see
//! `switchboard_core::meters`). A scrape reads no table: the gauges only Postgres
//! knows are refreshed by `refresh_gauges` on an interval. Worker and scheduler
//! processes serve the same route on `SWITCHBOARD_METRICS_ADDR` (`serve_metrics`).

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::get,
};
use sqlx::PgPool;
use switchboard_core::meters;
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    middleware::bearer_matches,
};

/// The metrics, in Prometheus text format. With `SWITCHBOARD_METRICS_TOKEN` set, the
/// scraper must present it as a bearer token.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "SWITCHBOARD_METRICS_TOKEN is set and was not presented", body = crate::error::ErrorBody),
        (status = 500, description = "A fault of ours", body = crate::error::ErrorBody),
    ))]
pub async fn prometheus(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    render(state.metrics_token.as_deref(), &headers)
}

fn render(token: Option<&str>, headers: &HeaderMap) -> ApiResult<impl IntoResponse + use<>> {
    if token.is_some_and(|t| !bearer_matches(headers, t)) {
        return Err(ApiError::unauthorized("/metrics needs the metrics token (Authorization: Bearer <token>)"));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], meters::render()))
}

/// Refreshes the Postgres gauges every `every` until `stop`, and this process's
/// WebSocket client count with them. A failed read keeps the last values (and logs).
pub async fn refresh_gauges(
    pool: PgPool,
    ws_clients: Arc<std::sync::atomic::AtomicUsize>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = meters::refresh(&pool).await {
            tracing::warn!(error = %e, "could not refresh the metrics gauges");
        }
        meters::ws_clients(ws_clients.load(std::sync::atomic::Ordering::Relaxed));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Serves `GET /metrics` (and nothing else) on `listener` until `stop`: the endpoint
/// of a worker or scheduler process.
pub async fn serve_metrics(listener: tokio::net::TcpListener, token: Option<String>, stop: CancellationToken) {
    let token: Option<Arc<str>> = token.map(Into::into);
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(token): State<Option<Arc<str>>>, headers: HeaderMap| async move {
                render(token.as_deref(), &headers)
            }),
        )
        .fallback(|| async { ApiError::not_found("only /metrics is served here") })
        .with_state(token);
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("switchboard metrics listening on http://{addr}/metrics");
    tracing::info!(%addr, "metrics listening");
    crate::server::serve(listener, app, Duration::from_secs(10), stop, Duration::from_secs(1)).await;
}
