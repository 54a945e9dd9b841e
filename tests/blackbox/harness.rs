//! Test harness: each test gets its own database and Redis namespace, starts the real
//! `switchboard` binary as separate processes, and talks HTTP to it. Everything is
//! removed on drop (processes killed, database dropped, namespace keys deleted).

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const PG_BASE: &str = "postgres://postgres@127.0.0.1:5432";

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// One test's private world.
pub struct Env {
    pub db: String,
    pub database_url: String,
    pub namespace: String,
    pub log_dir: PathBuf,
    pub extra_env: Vec<(String, String)>,
}

impl Env {
    /// A fresh database (migrated by the real binary) and namespace.
    pub fn new() -> Env {
        let db = unique("sbt");
        let env = Env {
            database_url: format!("{PG_BASE}/{db}"),
            namespace: unique("sbt"),
            log_dir: std::env::temp_dir().join("switchboard-tests").join(&db),
            db,
            extra_env: Vec::new(),
        };
        std::fs::create_dir_all(&env.log_dir).expect("log dir");
        let out = Command::new(bin())
            .arg("migrate")
            .env("DATABASE_URL", &env.database_url)
            .env("REDIS_URL", redis_url())
            .output()
            .expect("run migrate");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
        env
    }

    /// Same database and namespace, with a different Postgres URL for the processes
    /// (through a proxy, say).
    pub fn with_database_url(&self, url: &str) -> Vec<(String, String)> {
        vec![("DATABASE_URL".into(), url.into())]
    }

    fn command(&self, role: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg(role)
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", redis_url())
            .env("SWITCHBOARD_NAMESPACE", &self.namespace)
            .env("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SWITCHBOARD_API_ADDR", "127.0.0.1:0")
            .env("SWITCHBOARD_DB_MAX_CONNECTIONS", "8")
            .env("RUST_LOG", std::env::var("SB_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        let mut n = 0;
        loop {
            let path = self.log_dir.join(format!("{name}-{n}.log"));
            if !path.exists() {
                return std::fs::File::create(path).expect("log file");
            }
            n += 1;
        }
    }

    /// Starts `switchboard api` and waits for its address.
    pub fn api(&self, env: &[(&str, &str)]) -> Api {
        let (proc, base) = self.spawn_reporting("api", env, "switchboard api listening on ");
        Api { proc, base, client: client() }
    }

    /// Starts `role` with its stdout piped, and waits for the line starting with
    /// `prefix` (where it says it listens); returns it and the rest of that line.
    fn spawn_reporting(&self, role: &str, env: &[(&str, &str)], prefix: &'static str) -> (Proc, String) {
        let mut cmd = self.command(role, env);
        cmd.stdout(Stdio::piped()).stderr(self.log_file(role));
        let mut child = cmd.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(prefix) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let said =
            rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{role} did not report its address"));
        (Proc { child: Some(child), name: role.into() }, said)
    }

    pub fn worker(&self, env: &[(&str, &str)]) -> Proc {
        self.spawn("worker", env)
    }

    pub fn scheduler(&self, env: &[(&str, &str)]) -> Proc {
        self.spawn("scheduler", env)
    }

    /// Starts a worker or scheduler serving its own `/metrics` on a free port; returns
    /// it and that endpoint's URL.
    pub fn metered(&self, role: &str, env: &[(&str, &str)]) -> (Proc, String) {
        let env = with(env, &[("SWITCHBOARD_METRICS_ADDR", "127.0.0.1:0")]);
        self.spawn_reporting(role, &env, "switchboard metrics listening on ")
    }

    fn spawn(&self, role: &str, env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command(role, env);
        cmd.stdout(Stdio::null()).stderr(self.log_file(role));
        Proc { child: Some(cmd.spawn().expect("spawn")), name: role.into() }
    }

    /// A direct Postgres connection to this test's database (for assertions only).
    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&self.database_url).await.expect("pg")
    }

    /// A direct Redis connection (for fault injection on this test's namespace only).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.expect("redis")
    }

    /// Keys of this test's namespace.
    pub async fn redis_keys(&self) -> Vec<String> {
        let mut conn = self.redis().await;
        scan(&mut conn, &format!("{}:*", self.namespace)).await
    }

    /// Deletes every Redis key of this test's namespace.
    pub async fn delete_redis_keys(&self) -> usize {
        let mut conn = self.redis().await;
        let keys = scan(&mut conn, &format!("{}:*", self.namespace)).await;
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await.expect("del");
        }
        keys.len()
    }
}

async fn scan(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // `SB_TEST_KEEP=1` keeps a failed test's database and keys for a look.
        if std::env::var("SB_TEST_KEEP").is_ok_and(|v| v == "1") && std::thread::panicking() {
            eprintln!("kept database {} and Redis namespace {}", self.db, self.namespace);
            return;
        }
        let db = self.db.clone();
        let ns = self.namespace.clone();
        // Drop runs outside any runtime guarantee: clean up on a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            rt.block_on(async move {
                if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&format!("{PG_BASE}/postgres"))
                    .await
                {
                    let sql = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
                if let Ok(client) = redis::Client::open(redis_url())
                    && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                {
                    let keys = scan(&mut conn, &format!("{ns}:*")).await;
                    for chunk in keys.chunks(500) {
                        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                    }
                    // apalis lists every queue it has seen in one key outside any
                    // namespace ("core:apalis:queues:list"): take this test's out too.
                    let member = format!("{ns}:runs:workers");
                    let _: Result<(), _> =
                        redis::cmd("ZREM").arg("core:apalis:queues:list").arg(member).query_async(&mut conn).await;
                }
            });
        })
        .join();
    }
}

/// A child process, killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }
    /// Waits for the process to exit; its exit code (None if killed by a signal or still
    /// running after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

/// The API process and an HTTP client for it.
pub struct Api {
    pub proc: Proc,
    pub base: String,
    pub client: reqwest::Client,
}

/// A response: status, headers and JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Api {
    pub async fn request(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, body }
    }
    pub async fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None, Some(ADMIN_TOKEN)).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.request("POST", path, Some(body), Some(ADMIN_TOKEN)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> Resp {
        self.request("PATCH", path, Some(body), Some(ADMIN_TOKEN)).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, None, Some(ADMIN_TOKEN)).await
    }

    /// Registers `n` sim devices, `{prefix}-0` to `{prefix}-{n-1}`, in one pool.
    pub async fn devices(&self, prefix: &str, pool: &str, n: usize, sim: Value) {
        for i in 0..n {
            self.device(&format!("{prefix}-{i}"), pool, sim.clone()).await;
        }
    }

    /// Registers a sim device and returns it.
    pub async fn device(&self, serial: &str, pool: &str, sim: Value) -> Value {
        let r = self
            .post(
                "/api/v1/devices",
                json!({"serial": serial, "pool": pool, "driver": "sim", "model": "Pixel 8", "metadata": {"sim": sim}}),
            )
            .await;
        assert_eq!(r.status, 201, "create device: {:?}", r.body);
        r.body
    }

    /// Starts a module run; returns the 202 body.
    pub async fn start(&self, module: &str, body: Value) -> Value {
        let r = self.post(&format!("/api/v1/modules/{module}/runs"), body).await;
        assert_eq!(r.status, 202, "start run: {:?}", r.body);
        r.body
    }

    pub async fn run(&self, id: &str) -> Value {
        let r = self.get(&format!("/api/v1/runs/{id}")).await;
        assert_eq!(r.status, 200, "get run: {:?}", r.body);
        r.body
    }

    /// Polls a run until it is terminal (or panics after `timeout`).
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let run = self.run(id).await;
            let status = run["status"].as_str().unwrap_or_default();
            if !matches!(status, "queued" | "running") {
                return run;
            }
            assert!(start.elapsed() < timeout, "run {id} still {status} after {timeout:?}: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn events(&self, id: &str) -> Vec<Value> {
        let r = self.get(&format!("/api/v1/runs/{id}/events?limit=500")).await;
        assert_eq!(r.status, 200);
        r.body["items"].as_array().cloned().unwrap_or_default()
    }
}

/// Waits until `f` returns Some, polling every 100 ms.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn types(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["type"].as_str().unwrap_or_default().to_string()).collect()
}

/// A TCP proxy the test owns, to cut a process off from Postgres (or Redis) without
/// touching the shared server. `cut` drops every connection and refuses new ones until
/// `restore`; `blackhole` is a silent partition: connections stay open, but nothing
/// passes either way (the peer's calls hang instead of failing) until `restore`.
pub struct Proxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    /// While true, no byte is forwarded (but nothing is closed either).
    held: tokio::sync::watch::Sender<bool>,
    generation: tokio::sync::watch::Sender<u64>,
}

/// Copies one direction, pausing (not dropping) while the proxy is black-holed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the partition began are held back, like packets in flight.
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (held, _) = tokio::sync::watch::channel(false);
        let state = std::sync::Arc::new(ProxyState { cut: false.into(), held, generation });
        let upstream = upstream.to_string();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                if st.cut.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut gen_rx = st.generation.subscribe();
                let held = st.held.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, held.clone()) => {}
                        _ = pump(sr, cw, held) => {}
                        _ = gen_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { port, state }
    }

    pub fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// A silent partition: every call through the proxy hangs.
    pub fn blackhole(&self) {
        self.state.held.send_replace(true);
    }

    pub fn restore(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        if self.state.held.send_replace(false) {
            // Connections that sat through a partition are dropped, as a real one would be.
            self.state.generation.send_modify(|g| *g += 1);
        }
    }
}

/// The JSON log lines a process wrote (started with `SWITCHBOARD_LOG_FORMAT=json`).
pub fn json_logs(env: &Env, role: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0.. {
        let Ok(text) = std::fs::read_to_string(env.log_dir.join(format!("{role}-{n}.log"))) else { break };
        out.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
    }
    out
}

/// Fast leases, reconciles and retries, so recovery tests finish in seconds.
pub const FAST: &[(&str, &str)] = &[
    ("SWITCHBOARD_LEASE_TTL_S", "2"),
    ("SWITCHBOARD_RECONCILE_INTERVAL_S", "1"),
    ("SWITCHBOARD_REDISPATCH_AFTER_S", "1"),
    ("SWITCHBOARD_RETRY_BASE_MS", "300"),
];

/// `base` settings plus `more`.
pub fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more.iter()).cloned().collect()
}

/// Each device's (started_at, finished_at) spans.
pub type SpansByDevice =
    std::collections::HashMap<String, Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>>;

/// An RFC 3339 timestamp from a JSON value.
pub fn ts(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().expect("timestamp").parse().expect("rfc3339")
}

/// The fake `adb` (tests/fake_adb/adb) with this test's own phones: a state file the
/// test writes and changes, and the log of every command the phones ran.
pub struct FakeAdb {
    pub state: PathBuf,
}

impl FakeAdb {
    /// Phones from `devices` (`{"SERIAL": {overrides}}`, see the fake's defaults).
    pub fn new(env: &Env, devices: Value) -> FakeAdb {
        let state = env.log_dir.join(format!("adb-{}.json", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let fake = FakeAdb { state };
        fake.update(json!({"devices": devices}));
        fake
    }

    pub fn path() -> String {
        format!("{}/tests/fake_adb/adb", env!("CARGO_MANIFEST_DIR"))
    }

    /// Deep-merges a patch into the fake's state.
    pub fn update(&self, patch: Value) {
        let out = Command::new(Self::path())
            .arg("__fake_update")
            .arg(patch.to_string())
            .env("FAKE_ADB_STATE", &self.state)
            .output()
            .expect("run the fake adb");
        assert!(out.status.success(), "fake adb update: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Changes one phone.
    pub fn set(&self, serial: &str, patch: Value) {
        self.update(json!({"devices": {serial: patch}}));
    }

    /// Every entry of the fake's log (commands run, SMS sent, hung calls).
    pub fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.state.with_extension("json.log")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The device commands (argv) phone `serial` ran.
    pub fn commands(&self, serial: &str) -> Vec<Vec<String>> {
        self.log()
            .into_iter()
            .filter(|e| e["serial"] == serial && e["argv"].is_array())
            .map(|e| serde_json::from_value(e["argv"].clone()).unwrap())
            .collect()
    }

    /// What a worker or an agent needs to use it.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SWITCHBOARD_ADB_PATH".into(), Self::path()),
            ("FAKE_ADB_STATE".into(), self.state.display().to_string()),
            ("SWITCHBOARD_ADB_POLL_MS".into(), "100".into()),
            ("SWITCHBOARD_ADB_TIMEOUT_S".into(), "10".into()),
        ]
    }
}

/// `env` as borrowed pairs, plus `more`.
pub fn pairs<'a>(env: &'a [(String, String)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(more.iter().cloned()).collect()
}

/// Whether a process is gone (or a zombie nobody reaped).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A `switchboard host-agent` process and its base URL.
pub struct Agent {
    pub proc: Proc,
    pub base: String,
}

impl Env {
    /// Starts `switchboard host-agent` against `api` and waits for its address.
    pub fn agent(&self, api: &Api, env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(bin());
        cmd.arg("host-agent")
            .env("SWITCHBOARD_SERVER_URL", &api.base)
            .env("SWITCHBOARD_TOKEN", ADMIN_TOKEN)
            .env("SWITCHBOARD_AGENT_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", std::env::var("SB_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log_file("agent"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn host-agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("switchboard host-agent listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(20)).expect("agent did not report its address");
        Agent { proc: Proc { child: Some(child), name: "agent".into() }, base }
    }
}
