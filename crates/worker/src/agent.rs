//! `switchboard host-agent`: runs on the machine the phones are plugged into. It
//! registers with the API (getting its per-host secret), heartbeats with what its
//! `adb devices -l` lists, and executes the modules workers send it with the same adb
//! driver code as a worker. Every request to it must carry the host secret. SIGTERM
//! stops it cleanly: no new executions, the running ones stopped, exit 0.
//!
//! The protocol is documented in `docs/hosts.md`, so a lab can write its own agent.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use switchboard_core::{catalog, config::AgentConfig, ids::RunId, repo::presence::Listed};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::drivers::{
    Captures, DriverError, Verdict,
    adb::{AdbDriver, Task},
    host::{AgentError, CancelRequest, ExecuteRequest, ExecuteResponse},
};

/// What the agent keeps between restarts: who it is to the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    server_url: String,
    name: String,
    host_id: String,
    secret: String,
}

/// The agent's shared state.
struct Agent {
    adb: AdbDriver,
    creds: RwLock<Option<Credentials>>,
    /// Modules running, by run and attempt: a late cancel or a dropped connection of
    /// one attempt must not stop the next attempt of the same run.
    running: Mutex<HashMap<(RunId, i32), (u64, CancellationToken)>>,
    next_id: AtomicU64,
    stopping: CancellationToken,
    /// How long a heartbeat waits for `adb devices` before it reports no list.
    list_timeout: Duration,
}

/// Runs the agent until `shutdown`.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    // Listening on one address, that is where workers find it; on all of them
    // (0.0.0.0), by this machine's name.
    let url = cfg.advertise_url.clone().unwrap_or_else(|| match addr.ip() {
        ip if ip.is_unspecified() => format!("http://{}:{}", switchboard_core::ids::hostname(), addr.port()),
        _ => format!("http://{addr}"),
    });
    let name = cfg.name.clone().unwrap_or_else(switchboard_core::ids::hostname);
    let agent = Arc::new(Agent {
        adb: crate::adb_driver(&cfg.adb),
        creds: RwLock::new(None),
        running: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        stopping: CancellationToken::new(),
        list_timeout: Duration::from_secs(cfg.adb.adb_timeout_s.clamp(1, 5)),
    });
    println!("switchboard host-agent listening on http://{addr}");
    tracing::info!(%addr, %url, host = %name, server = %cfg.server_url, "host agent starting");
    let link = Link::new(&cfg, name, url, agent.clone())?;
    let beating = tokio::spawn(link.run(shutdown.clone()));
    let app = router(agent.clone());
    let (stop, stopping) = (shutdown.clone(), agent.stopping.clone());
    // On SIGTERM the running modules are stopped at once (their adb calls killed, each
    // answered `interrupted`), so the graceful shutdown has nothing long to wait for.
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            stopping.cancel();
        })
        .await?;
    beating.abort();
    tracing::info!("host agent stopped");
    Ok(())
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/execute", post(execute))
        .route("/v1/cancel", post(cancel))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(agent)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message.into()}}))).into_response()
}

/// Checks the bearer secret: 503 before registration, 401 when wrong.
fn authorize(agent: &Agent, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let creds = agent.creds.read().ok().and_then(|c| c.clone());
    let Some(creds) = creds else {
        return Err(Box::new(error(StatusCode::SERVICE_UNAVAILABLE, "not registered with a server yet")));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if switchboard_core::repo::hosts::secret_matches(&creds.secret, presented) {
        Ok(())
    } else {
        Err(Box::new(error(StatusCode::UNAUTHORIZED, "missing or wrong host secret")))
    }
}

async fn health(State(agent): State<Arc<Agent>>) -> Json<Value> {
    let creds = agent.creds.read().ok().and_then(|c| c.clone());
    Json(json!({"status": "ok", "registered": creds.is_some(), "host_id": creds.map(|c| c.host_id)}))
}

/// Stops a running module when its request is gone (a dropped connection) or done.
struct Running<'a> {
    agent: &'a Agent,
    key: (RunId, i32),
    id: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.agent.running.lock()
            && m.get(&self.key).is_some_and(|(id, _)| *id == self.id)
            && let Some((_, t)) = m.remove(&self.key)
        {
            t.cancel();
        }
    }
}

async fn execute(State(agent): State<Arc<Agent>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(denied) = authorize(&agent, &headers) {
        return *denied;
    }
    if agent.stopping.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    }
    let req: ExecuteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("unreadable execute request: {e}")),
    };
    let Some(module) = catalog::find(&req.module) else {
        return Json(answer(Err(DriverError::Unknown(req.module.clone())), vec![])).into_response();
    };
    // The params were validated at enqueue; the agent checks them again before any of
    // them reaches a phone's shell.
    let params = match catalog::validate_params(module, Some(&req.params), "params") {
        Ok(p) => p,
        Err(fields) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("params rejected: {fields:?}")),
    };
    let cancel = agent.stopping.child_token();
    let key = (req.run_id, req.attempt);
    let id = agent.next_id.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut m) = agent.running.lock()
        && let Some((_, older)) = m.insert(key, (id, cancel.clone()))
    {
        older.cancel();
    }
    let _running = Running { agent: &agent, key, id };
    let captures = Captures::default();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.timeout_ms.max(1));
    // The worker sends the run's trace context: the agent's work is part of that trace.
    let span = tracing::info_span!("agent.execute", run_id = %req.run_id, serial = %req.serial, module = module.id,
        otel.kind = "server", trace_id = tracing::field::Empty);
    let parent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    switchboard_core::telemetry::adopt(&span, parent);
    let work = async {
        tracing::info!("executing");
        if module.id == "sleep" {
            crate::drivers::sleep(&params, cancel.clone()).await
        } else {
            let task = Task {
                serial: &req.serial,
                module,
                params: &params,
                cancel: cancel.clone(),
                deadline,
                captures: captures.clone(),
            };
            tokio::select! {
                r = agent.adb.run(task) => r,
                _ = tokio::time::sleep_until(deadline) => Err(DriverError::Unreachable(format!(
                    "{} did not finish within its {} ms on the agent", module.id, req.timeout_ms))),
            }
        }
    };
    let result = work.instrument(span).await;
    Json(answer(result, captures.take())).into_response()
}

fn answer(result: Result<Verdict, DriverError>, captures: Vec<crate::drivers::Capture>) -> ExecuteResponse {
    match result {
        Ok(Verdict::Passed(r)) => ExecuteResponse { outcome: "passed".into(), result: Some(r), error: None, captures },
        Ok(Verdict::Failed(r)) => ExecuteResponse { outcome: "failed".into(), result: Some(r), error: None, captures },
        Err(e) => ExecuteResponse {
            outcome: "error".into(),
            result: None,
            error: Some(AgentError::from_driver(&e)),
            captures,
        },
    }
}

async fn cancel(State(agent): State<Arc<Agent>>, headers: HeaderMap, Json(req): Json<CancelRequest>) -> Response {
    if let Err(denied) = authorize(&agent, &headers) {
        return *denied;
    }
    let tokens: Vec<CancellationToken> = agent
        .running
        .lock()
        .map(|m| {
            m.iter()
                .filter(|((run, attempt), _)| *run == req.run_id && req.attempt.is_none_or(|a| a == *attempt))
                .map(|(_, (_, t))| t.clone())
                .collect()
        })
        .unwrap_or_default();
    tokens.iter().for_each(CancellationToken::cancel);
    Json(json!({"cancelled": !tokens.is_empty()})).into_response()
}

/// The agent's link to the server: registration and heartbeats.
struct Link {
    client: reqwest::Client,
    server: String,
    token: String,
    name: String,
    url: String,
    pool: String,
    capabilities: Vec<String>,
    every: Duration,
    state_file: PathBuf,
    agent: Arc<Agent>,
}

/// Why a heartbeat did not land.
enum Beat {
    /// The server no longer knows this host or its secret: register again.
    Forgotten,
    /// Anything else: try again next time.
    Failed(String),
}

impl Link {
    fn new(cfg: &AgentConfig, name: String, url: String, agent: Arc<Agent>) -> anyhow::Result<Link> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let capabilities =
            cfg.capabilities.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
        Ok(Link {
            client,
            server: cfg.server_url.trim_end_matches('/').to_string(),
            token: cfg.token.clone(),
            name,
            url,
            pool: cfg.pool.clone(),
            capabilities,
            every: Duration::from_secs(cfg.heartbeat_s.max(1)),
            state_file: PathBuf::from(&cfg.state_file),
            agent,
        })
    }

    /// Registers (again and again until it works), then heartbeats until `stop`.
    async fn run(self, stop: CancellationToken) {
        let mut registered = false;
        let mut delay = Duration::from_millis(500);
        loop {
            if !registered {
                match self.register().await {
                    Ok(()) => {
                        registered = true;
                        delay = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "could not register with the server");
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            } else {
                match self.heartbeat().await {
                    Ok(()) => {}
                    Err(Beat::Forgotten) => {
                        tracing::warn!("the server no longer knows this host; registering again");
                        registered = false;
                        continue;
                    }
                    Err(Beat::Failed(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            let wait = if registered { self.every } else { delay };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The phones adb lists now, or `None` when adb fails (then the heartbeat says
    /// nothing of them rather than "none").
    async fn devices(&self) -> Option<Vec<Listed>> {
        match self.agent.adb.list_devices(self.agent.list_timeout, &self.agent.stopping).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "adb devices failed; this heartbeat reports no device list");
                None
            }
        }
    }

    fn saved(&self) -> Option<Credentials> {
        let text = std::fs::read_to_string(&self.state_file).ok()?;
        let c: Credentials = serde_json::from_str(&text).ok()?;
        (c.server_url == self.server && c.name == self.name).then_some(c)
    }

    fn save(&self, c: &Credentials) -> anyhow::Result<()> {
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }

    async fn register(&self) -> anyhow::Result<()> {
        let saved = self.saved();
        let body = json!({"name": self.name, "url": self.url, "capabilities": self.capabilities, "pool": self.pool,
                          "agent_version": env!("CARGO_PKG_VERSION"), "devices": self.devices().await});
        let mut req =
            self.client.post(format!("{}/api/v1/hosts/register", self.server)).bearer_auth(&self.token).json(&body);
        if let Some(c) = &saved {
            req = req.header("x-host-secret", &c.secret);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            anyhow::bail!("register answered {status}: {}", answer["error"]["message"]);
        }
        let host_id = answer["id"].as_str().context("register answered no host id")?.to_string();
        let secret = match (answer["secret"].as_str(), saved) {
            (Some(s), _) => s.to_string(),
            (None, Some(c)) => c.secret,
            (None, None) => anyhow::bail!("register answered no secret"),
        };
        let creds = Credentials { server_url: self.server.clone(), name: self.name.clone(), host_id, secret };
        if let Err(e) = self.save(&creds) {
            tracing::warn!(error = %e, file = %self.state_file.display(), "could not save the host credentials");
        }
        tracing::info!(host_id = %creds.host_id, "registered with the server");
        if let Ok(mut c) = self.agent.creds.write() {
            *c = Some(creds);
        }
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), Beat> {
        let Some(creds) = self.agent.creds.read().ok().and_then(|c| c.clone()) else { return Err(Beat::Forgotten) };
        let body = json!({"agent_version": env!("CARGO_PKG_VERSION"), "devices": self.devices().await});
        let url = format!("{}/api/v1/hosts/{}/heartbeat", self.server, creds.host_id);
        let resp = self.client.post(url).bearer_auth(&creds.secret).json(&body).send().await;
        let resp = resp.map_err(|e| Beat::Failed(e.to_string()))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND => Err(Beat::Forgotten),
            s => Err(Beat::Failed(format!("heartbeat answered {s}"))),
        }
    }
}
