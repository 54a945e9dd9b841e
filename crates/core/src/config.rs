//! Configuration, one struct per role, read from environment variables and the same
//! names as CLI flags (clap). Defaults work for `switchboard dev` on a machine with
//! Postgres and Redis on their standard local ports.

use std::time::Duration;

/// Settings every role shares: where the stores are and how keys are named.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonConfig {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/switchboard")]
    pub database_url: String,
    /// Redis connection URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key, so several deployments (or tests) share one Redis.
    #[arg(long, env = "SWITCHBOARD_NAMESPACE", default_value = "switchboard")]
    pub namespace: String,
    /// Lease of a running run and its device, renewed by heartbeat (seconds).
    #[arg(long, env = "SWITCHBOARD_LEASE_TTL_S", default_value_t = 15)]
    pub lease_ttl_s: u64,
    /// Most Postgres connections this process opens.
    #[arg(long, env = "SWITCHBOARD_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Log format: `text` or `json`.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// When set, every role's `GET /metrics` needs it as a bearer token.
    #[arg(long, env = "SWITCHBOARD_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Where a worker or scheduler process serves its own `GET /metrics`
    /// (`0.0.0.0:9464`); unset, it serves none. The api serves its metrics on its own
    /// address, and `dev` (every role in one process) there too.
    #[arg(long, env = "SWITCHBOARD_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

impl CommonConfig {
    /// The lease TTL (at least one second).
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s.max(1))
    }

    /// One line for the start-up log, with passwords removed.
    pub fn summary(&self) -> String {
        format!(
            "database_url={} redis_url={} namespace={} lease_ttl_s={} metrics_token={}",
            redact_url(&self.database_url),
            redact_url(&self.redis_url),
            self.namespace,
            self.lease_ttl_s,
            if self.metrics_token.is_some() { "<set>" } else { "<unset>" },
        )
    }
}

/// Settings of the HTTP API.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiConfig {
    /// Address the API listens on (`127.0.0.1:0` picks a free port).
    #[arg(long = "api-addr", env = "SWITCHBOARD_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// An admin token accepted from start-up, for bootstrapping.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Comma-separated origins allowed by CORS (`*` for any); empty disables CORS.
    #[arg(long, env = "SWITCHBOARD_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// Upper bound on the time one request may take before it answers 503 (seconds).
    #[arg(long, env = "SWITCHBOARD_REQUEST_TIMEOUT_S", default_value_t = 10)]
    pub request_timeout_s: u64,
    /// Largest request body accepted (bytes).
    #[arg(long, env = "SWITCHBOARD_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// A host agent silent this long goes offline with its devices (seconds); set on
    /// each host when it registers.
    #[arg(long, env = "SWITCHBOARD_HOST_TIMEOUT_S", default_value_t = 30)]
    pub host_timeout_s: u32,
    /// How long an `Idempotency-Key` is kept (seconds): the same key from the same
    /// token replays its run until then, and may start a new one after.
    #[arg(long, env = "SWITCHBOARD_IDEMPOTENCY_TTL_S", default_value_t = 86_400)]
    pub idempotency_ttl_s: u32,
    /// Requests a second each token may make sustained (0: no limit); over it they
    /// answer 429 with `Retry-After`.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_PER_S", default_value_t = 200)]
    pub rate_limit_per_s: u32,
    /// Requests a token may make at once before the sustained rate applies.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_BURST", default_value_t = 2000)]
    pub rate_limit_burst: u32,
    /// Requests a second each client address may make sustained, authenticated or not
    /// (0: no limit; behind a proxy every client has its address).
    #[arg(long, env = "SWITCHBOARD_ADDRESS_RATE_LIMIT_PER_S", default_value_t = 500)]
    pub address_rate_limit_per_s: u32,
    /// Requests an address may make at once before its sustained rate applies.
    #[arg(long, env = "SWITCHBOARD_ADDRESS_RATE_LIMIT_BURST", default_value_t = 5000)]
    pub address_rate_limit_burst: u32,
    /// A client must send a request's headers within this long (seconds), or its
    /// connection is closed.
    #[arg(long, env = "SWITCHBOARD_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    pub header_read_timeout_s: u64,
    /// A client must send a request's whole body within this long (seconds), or it is
    /// answered 408 and its connection closed.
    #[arg(long, env = "SWITCHBOARD_BODY_READ_TIMEOUT_S", default_value_t = 15)]
    pub body_read_timeout_s: u64,
    /// How often the WebSocket feed pings each client (seconds); a client that has not
    /// answered the previous ping by the next one is closed.
    #[arg(long, env = "SWITCHBOARD_WS_PING_S", default_value_t = 30)]
    pub ws_ping_s: u64,
    /// How long one send to a WebSocket client may wait (seconds) before the client is
    /// closed as too slow (close code 4008; it resumes with `since`).
    #[arg(long, env = "SWITCHBOARD_WS_SEND_TIMEOUT_S", default_value_t = 10)]
    pub ws_send_timeout_s: u64,
    /// WebSocket feed clients one api process serves at once; more are refused with
    /// 503 (and `Retry-After`) until some leave.
    #[arg(long, env = "SWITCHBOARD_WS_MAX_CLIENTS", default_value_t = 1000)]
    pub ws_max_clients: usize,
    /// How often the gauges only Postgres knows (queue depth, devices, breakers) are
    /// read for `/metrics` (seconds): one query per interval, whatever the scrapers do.
    #[arg(long, env = "SWITCHBOARD_METRICS_REFRESH_S", default_value_t = 5)]
    pub metrics_refresh_s: u64,
    /// Group commit of run starts: the `POST .../runs` that arrive together share one
    /// INSERT and one commit (`false`: each start writes alone).
    #[arg(long, env = "SWITCHBOARD_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub group_commit: bool,
    /// How long a start may wait for others to share its INSERT (microseconds, at most
    /// 2000). 0: no waiting; the starts that arrive while an INSERT is being written go
    /// together in the next one.
    #[arg(long, env = "SWITCHBOARD_GROUP_COMMIT_WINDOW_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=2000))]
    pub group_commit_window_us: u64,
}

impl ApiConfig {
    /// One line for the start-up log, the admin token redacted.
    pub fn summary(&self) -> String {
        format!(
            "api_addr={} admin_token={} cors_origins={:?} request_timeout_s={} \
             rate_limit={}/s burst {} group_commit={} window_us={}",
            self.addr,
            if self.admin_token.is_some() { "<set>" } else { "<unset>" },
            self.cors_origins,
            self.request_timeout_s,
            self.rate_limit_per_s,
            self.rate_limit_burst,
            self.group_commit,
            self.group_commit_window_us,
        )
    }
}

/// Settings of a worker process.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Runs this process executes at once.
    #[arg(long = "concurrency", env = "SWITCHBOARD_WORKER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Fallback poll interval of the queue (milliseconds); pushes also wake workers at once.
    #[arg(long, env = "SWITCHBOARD_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Time in-flight runs get to finish after SIGTERM before they are handed back (seconds).
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Consecutive infrastructure errors that open a device's breaker.
    #[arg(long, env = "SWITCHBOARD_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: i32,
    /// How long an open breaker stays open before a probe run (seconds).
    #[arg(long, env = "SWITCHBOARD_BREAKER_COOLDOWN_S", default_value_t = 60)]
    pub breaker_cooldown_s: u64,
    /// First retry delay after an infrastructure error (milliseconds); doubles per attempt, with jitter.
    #[arg(long, env = "SWITCHBOARD_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest retry delay (seconds).
    #[arg(long, env = "SWITCHBOARD_RETRY_MAX_S", default_value_t = 300)]
    pub retry_max_s: u64,
    /// Outcomes written at once: the attempts that end together share one transaction
    /// and one statement per kind of write, up to this many (1 writes each alone).
    #[arg(long, env = "SWITCHBOARD_FINISH_BATCH_MAX", default_value_t = 32)]
    pub finish_batch_max: usize,
    /// Finish transactions in flight at once; outcomes that end while all are busy wait
    /// and are written together in the next one.
    #[arg(long, env = "SWITCHBOARD_FINISH_LANES", default_value_t = 4)]
    pub finish_lanes: usize,
    /// Register what `adb devices -l` lists on this machine, and follow it (new phones
    /// join, vanished ones go offline, and come back when seen again).
    #[arg(long, env = "SWITCHBOARD_ADB_DISCOVER", default_value = "false", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub adb_discover: bool,
    /// How often discovery runs `adb devices -l` (seconds).
    #[arg(long, env = "SWITCHBOARD_ADB_DISCOVER_INTERVAL_S", default_value_t = 5)]
    pub adb_discover_interval_s: u64,
    /// The pool discovered phones join.
    #[arg(long, env = "SWITCHBOARD_ADB_POOL", default_value = "default")]
    pub adb_pool: String,
    /// The adb driver's settings.
    #[command(flatten)]
    pub adb: AdbConfig,
}

/// Settings of the adb driver (the worker's and the host agent's).
#[derive(clap::Args, Debug, Clone)]
pub struct AdbConfig {
    /// The adb executable (a name is looked up on PATH).
    #[arg(long, env = "SWITCHBOARD_ADB_PATH", default_value = "adb")]
    pub adb_path: String,
    /// The timeout of a plain adb call (seconds); calls long by nature (ping: count ×
    /// interval + 15 s) get their own, and every call ends by the module's deadline.
    #[arg(long, env = "SWITCHBOARD_ADB_TIMEOUT_S", default_value_t = 20)]
    pub adb_timeout_s: u64,
    /// How often state is polled while a module waits: a boot, a call, a delivery
    /// report (milliseconds).
    #[arg(long, env = "SWITCHBOARD_ADB_POLL_MS", default_value_t = 1000)]
    pub adb_poll_ms: u64,
    /// The largest capture (logcat excerpt) stored with a run (bytes); longer ones keep
    /// their newest part and say `truncated`.
    #[arg(long, env = "SWITCHBOARD_CAPTURE_MAX_BYTES", default_value_t = 1_048_576)]
    pub capture_max_bytes: usize,
}

/// Settings of `switchboard host-agent`, the process on the machine the phones are
/// plugged into.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentConfig {
    /// The Switchboard API the agent registers with (`http://switchboard:8080`).
    #[arg(long, env = "SWITCHBOARD_SERVER_URL")]
    pub server_url: String,
    /// A token allowed to register hosts (an admin token).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: String,
    /// This host's name (unique); the machine's hostname by default.
    #[arg(long, env = "SWITCHBOARD_HOST_NAME")]
    pub name: Option<String>,
    /// Where the agent listens for executions.
    #[arg(long, env = "SWITCHBOARD_AGENT_ADDR", default_value = "0.0.0.0:7070")]
    pub listen: String,
    /// The URL workers use to reach this agent; `http://HOSTNAME:PORT` by default.
    #[arg(long, env = "SWITCHBOARD_AGENT_URL")]
    pub advertise_url: Option<String>,
    /// The pool this host's new phones join.
    #[arg(long, env = "SWITCHBOARD_HOST_POOL", default_value = "default")]
    pub pool: String,
    /// What the host offers, comma-separated.
    #[arg(long, env = "SWITCHBOARD_HOST_CAPABILITIES", default_value = "adb")]
    pub capabilities: String,
    /// Where the agent keeps its host id and secret between restarts.
    #[arg(long, env = "SWITCHBOARD_AGENT_STATE", default_value = "switchboard-agent.json")]
    pub state_file: String,
    /// Seconds between heartbeats (keep well under the server's host timeout).
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_S", default_value_t = 5)]
    pub heartbeat_s: u64,
    /// `text` or `json` logs.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// The adb driver's settings.
    #[command(flatten)]
    pub adb: AdbConfig,
}

impl WorkerConfig {
    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "concurrency={} poll_interval_ms={} shutdown_grace_s={} breaker_threshold={} breaker_cooldown_s={} \
             finish_batch_max={} finish_lanes={}",
            self.concurrency,
            self.poll_interval_ms,
            self.shutdown_grace_s,
            self.breaker_threshold,
            self.breaker_cooldown_s,
            self.finish_batch_max,
            self.finish_lanes,
        )
    }
}

/// Settings of the scheduler (reconciler, and later cron ticks).
#[derive(clap::Args, Debug, Clone)]
pub struct SchedulerConfig {
    /// How often the reconciler looks for expired leases and stranded runs (seconds).
    #[arg(long, env = "SWITCHBOARD_RECONCILE_INTERVAL_S", default_value_t = 5)]
    pub reconcile_interval_s: u64,
    /// A queued run not delivered for this long is pushed to Redis again (seconds).
    #[arg(long, env = "SWITCHBOARD_REDISPATCH_AFTER_S", default_value_t = 10)]
    pub redispatch_after_s: u64,
    /// A schedule tick fired this late or less is on time; later ticks were missed
    /// (downtime) and follow the schedule's `misfire` policy (milliseconds).
    #[arg(long, env = "SWITCHBOARD_MISFIRE_GRACE_MS", default_value_t = 1000)]
    pub misfire_grace_ms: u64,
    /// Longest a run waits in the queue for a device before it ends `errored` with
    /// `queue_wait_exceeded`, unless it sets its own `max_queue_wait_s` (seconds).
    #[arg(long, env = "SWITCHBOARD_MAX_QUEUE_WAIT_S", default_value_t = 86_400)]
    pub max_queue_wait_s: u64,
    /// Ended runs are kept this many days, with their steps, captures and events (and
    /// events about devices, hosts and schedules as long); 0 keeps everything.
    #[arg(long, env = "SWITCHBOARD_RETENTION_DAYS", default_value_t = 90)]
    pub retention_days: u32,
    /// How often the scheduler prunes what is past retention (seconds).
    #[arg(long, env = "SWITCHBOARD_RETENTION_INTERVAL_S", default_value_t = 300)]
    pub retention_interval_s: u64,
}

impl SchedulerConfig {
    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "reconcile_interval_s={} redispatch_after_s={} misfire_grace_ms={} max_queue_wait_s={} retention_days={}",
            self.reconcile_interval_s,
            self.redispatch_after_s,
            self.misfire_grace_ms,
            self.max_queue_wait_s,
            self.retention_days
        )
    }
}

/// `scheme://user:secret@host/db` -> `scheme://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/d"), "postgres://u:***@h:5432/d");
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
