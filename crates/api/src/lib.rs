//! The HTTP API (axum): routes, the error envelope, authentication.

pub mod error;
pub mod extract;
pub mod limits;
pub mod middleware;
pub mod openapi;
pub mod requests;
pub mod routes;
pub mod server;
pub mod table;

use std::{sync::Arc, time::Instant};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderValue, Method, header},
    middleware::from_fn_with_state,
    routing::{get, post},
};
use switchboard_core::{
    config::{ApiConfig, CommonConfig},
    db, ids, meters,
    model::ProcessRole,
    queue::Queue,
    repo::processes,
    service::Engine,
};
use tokio_util::sync::CancellationToken;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
};

use crate::error::ApiError;

/// The answer to a start: 202 with the new run, or 200 with the first run when an
/// `Idempotency-Key` was seen before.
pub(crate) fn started(
    s: switchboard_core::service::Started,
) -> (axum::http::StatusCode, axum::Json<switchboard_core::model::Run>) {
    let status = if s.created { axum::http::StatusCode::ACCEPTED } else { axum::http::StatusCode::OK };
    (status, axum::Json(s.run))
}

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    /// Postgres and the queue.
    pub engine: Engine,
    /// This process's settings.
    pub config: Arc<ApiConfig>,
    /// When the process started.
    pub started_at: Instant,
    /// Token uses not yet written.
    pub usage: Arc<middleware::Usage>,
    /// The rate limits' budgets.
    pub limits: Arc<limits::Limits>,
    /// `SWITCHBOARD_METRICS_TOKEN`: `/metrics` needs it when set.
    pub metrics_token: Option<Arc<str>>,
    /// What the process-wide feed reader hands to WebSocket clients.
    pub feed: tokio::sync::broadcast::Sender<Arc<routes::feed::Shared>>,
    /// WebSocket clients connected to this process.
    pub ws_clients: Arc<std::sync::atomic::AtomicUsize>,
    /// Cancelled when the process starts shutting down (WebSocket clients are told).
    pub stop: CancellationToken,
}

impl AppState {
    /// The state of an api process with these settings.
    pub fn new(engine: Engine, config: ApiConfig) -> AppState {
        AppState {
            engine,
            limits: Arc::new(limits::Limits::new(&config)),
            config: Arc::new(config),
            started_at: Instant::now(),
            usage: Default::default(),
            metrics_token: None,
            feed: tokio::sync::broadcast::Sender::new(32),
            ws_clients: Default::default(),
            stop: CancellationToken::new(),
        }
    }
}

/// The whole router, with its middleware.
pub fn router(state: AppState) -> Router {
    use routes::*;
    let v1 = table::router()
        .route_layer(from_fn_with_state(state.clone(), middleware::authenticate))
        // Added after the token layer: an agent authenticates with its host secret.
        .route("/hosts/{id}/heartbeat", post(hosts::heartbeat));
    let app = Router::new()
        .route("/health", get(health::live))
        .route("/health/full", get(health::full))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::prometheus))
        .nest("/api/v1", v1);
    with_layers(app, state)
}

/// The fallbacks and middleware every route gets: 404 and 405 envelopes, the body
/// limit, CORS, the panic guard, and the request context (id, timeout, envelopes).
pub fn with_layers(app: Router<AppState>, state: AppState) -> Router {
    let mut app = app
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path")
        })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        app = app.layer(cors);
    }
    // Inside the request context, so a panic's 500 envelope carries the request id.
    app.layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(from_fn_with_state(state.clone(), middleware::request_context))
        .with_state(state)
}

fn cors_layer(origins: &str) -> Option<CorsLayer> {
    let origins: Vec<&str> = origins.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                "idempotency-key".parse().expect("header name"),
                "x-request-id".parse().expect("header name"),
            ])
            .expose_headers(["x-request-id".parse().expect("header name")]),
    )
}

/// Serves the API until `shutdown`. Prints `switchboard api listening on http://ADDR` on
/// stdout once bound (tests and scripts read it to learn the port).
pub async fn run(common: CommonConfig, cfg: ApiConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = bind(&cfg).await?;
    serve(common, cfg, listener, shutdown).await
}

/// Binds the API's address (so a caller can learn the port before serving).
pub async fn bind(cfg: &ApiConfig) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(&cfg.addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.addr))
}

/// Serves the API on a bound listener until `shutdown`.
pub async fn serve(
    common: CommonConfig,
    cfg: ApiConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let me = ids::process_identity("api");
    tracing::info!(api = %me, "api starting: {} {}", common.summary(), cfg.summary());
    if cfg.admin_token.is_none() {
        tracing::warn!("SWITCHBOARD_ADMIN_TOKEN is not set: every /api/v1 request will be refused");
    }
    let pool = db::connect_lazy(&common.database_url, common.db_max_connections)?;
    let queue = Queue::new(&common.redis_url, &common.namespace)?;
    let addr = listener.local_addr()?;
    let mut engine = Engine::new(pool.clone(), queue);
    if cfg.group_commit {
        engine = engine.with_group_commit(std::time::Duration::from_micros(cfg.group_commit_window_us));
    }
    let mut state = AppState::new(engine, cfg);
    state.stop = shutdown.clone();
    state.metrics_token = common.metrics_token.as_deref().map(Into::into);
    let refresh = std::time::Duration::from_secs(state.config.metrics_refresh_s.max(1));
    // A gauge not refreshed for three intervals (a deleted device's breaker) is dropped.
    meters::install(refresh * 3);
    let gauges = tokio::spawn(routes::metrics::refresh_gauges(
        pool.clone(),
        state.ws_clients.clone(),
        refresh,
        shutdown.clone(),
    ));
    println!("switchboard api listening on http://{addr}");
    tracing::info!(%addr, "api listening");
    let beat = {
        let pool = pool.clone();
        let me = me.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let info = serde_json::json!({"addr": addr.to_string(), "version": env!("CARGO_PKG_VERSION")});
            loop {
                let _ = processes::beat(&pool, &me, ProcessRole::Api, &info).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                }
            }
        })
    };
    let keys = state.engine.queue.keys();
    let wake = routes::feed::Wake {
        redis_url: common.redis_url.clone(),
        // Workers publish on `feed` after their writes; every push (a run enqueued,
        // requeued, recovered) publishes on `wake`.
        channels: vec![keys.feed_channel(), keys.wake_channel()],
    };
    let head = tokio::spawn(routes::feed::share(pool.clone(), wake, state.feed.clone(), shutdown.clone()));
    let usage = {
        let (pool, usage, stop) = (pool.clone(), state.usage.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
                usage.flush(&pool).await;
            }
            usage.flush(&pool).await;
        })
    };
    let header_timeout = std::time::Duration::from_secs(state.config.header_read_timeout_s.max(1));
    let grace = std::time::Duration::from_secs(state.config.request_timeout_s + 5);
    let ws_clients = state.ws_clients.clone();
    server::serve(listener, router(state), header_timeout, shutdown.clone(), grace).await;
    // WebSocket clients live on tasks of their own, past their connection's: give them
    // a moment to send their 1001 before the process exits.
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    while ws_clients.load(std::sync::atomic::Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    beat.abort();
    head.abort();
    gauges.abort();
    let _ = usage.await;
    let _ = processes::stopped(&pool, &me).await;
    tracing::info!("api stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    fn state() -> AppState {
        let api = ApiConfig {
            addr: "127.0.0.1:0".into(),
            admin_token: None,
            cors_origins: String::new(),
            request_timeout_s: 5,
            max_body_bytes: 1024,
            host_timeout_s: 30,
            idempotency_ttl_s: 60,
            rate_limit_per_s: 0,
            rate_limit_burst: 1,
            address_rate_limit_per_s: 0,
            address_rate_limit_burst: 1,
            header_read_timeout_s: 5,
            body_read_timeout_s: 5,
            metrics_refresh_s: 5,
            ws_ping_s: 30,
            ws_send_timeout_s: 10,
            ws_max_clients: 10,
            group_commit: false,
            group_commit_window_us: 0,
        };
        // Lazy: nothing connects, and nothing here needs to.
        let pool = db::connect_lazy("postgres://nobody@127.0.0.1:1/none", 2).unwrap();
        let queue = Queue::new("redis://127.0.0.1:1", "test").unwrap();
        AppState::new(Engine::new(pool, queue), api)
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_the_500_envelope_with_the_request_id() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app = Router::new().route("/boom", get(boom));
        let app = with_layers(app, state());
        let req = Request::get("/boom").header("x-request-id", "req-42").body(Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-request-id"], "req-42");
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert_eq!(body["error"]["request_id"], "req-42");
    }
}
