//! `switchboard bench`: measures a deployment with simulated devices, beside a baseline
//! of raw Postgres, Redis and HTTP round trips taken in the same run, so the figures
//! can be read as ratios on any machine.
//!
//! By default it starts its own deployment (a fresh database and Redis namespace, one
//! `api` and one `worker` child process of this binary) and removes it afterwards.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_core::{
    db,
    ids::{RunId, ScheduleId},
    repo,
};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchConfig {
    /// Postgres server to create the bench database on (its database name is ignored).
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/switchboard")]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Simulated devices (zero latency) registered for the bench.
    #[arg(long, default_value_t = 32)]
    pub devices: usize,
    /// Runs per throughput round.
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
    /// Runs started one at a time with idle workers, for enqueue-to-start latency.
    #[arg(long, default_value_t = 200)]
    pub latency_samples: usize,
    /// Rounds of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Worker concurrency of the bench's worker process.
    #[arg(long, default_value_t = 32)]
    pub worker_concurrency: usize,
    /// Concurrent HTTP clients submitting runs.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// api processes (the clients spread over them); for scale-out figures.
    #[arg(long, default_value_t = 1)]
    pub apis: usize,
    /// worker processes, each of `worker_concurrency`; for scale-out figures.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Also measure schedule fire lag over an every-second schedule for this many
    /// seconds (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub fire_lag_seconds: u64,
    /// Also measure the WebSocket feed: this many clients on the api process follow
    /// every event while `feed_runs` runs go through (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub feed_clients: usize,
    /// Runs started while the feed clients follow.
    #[arg(long, default_value_t = 1000)]
    pub feed_runs: usize,
    /// Starts per second while the feed clients follow (0: as fast as the clients go,
    /// which saturates this machine; a rate under its capacity shows the feed's own
    /// latency rather than the queueing of a saturated box).
    #[arg(long, default_value_t = 0.0)]
    pub feed_rate: f64,
    /// Also measure what a `/metrics` scrape costs before and after this many finished
    /// runs (and twice as many events) are added to the history (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub scrape_history: usize,
    /// Also measure retention: add this many runs ended 100 days ago (each with a step
    /// and three events) and time pruning them in the scheduler's batches (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub prune_history: usize,
    /// Also measure draining a backlog: for each of these sizes (comma-separated, e.g.
    /// `1000,10000,100000`), the worker is stopped, that many runs are queued through
    /// `POST /runs/batch`, and the worker is let go: runs/s and Postgres work per run.
    #[arg(long, value_delimiter = ',')]
    pub backlog: Vec<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

const TOKEN: &str = "bench-admin-token";

struct Deployment {
    /// The first api, the first worker, the scheduler, then any more apis and workers.
    children: Vec<Child>,
    base: String,
    /// Every api's root, the first being `base`.
    bases: Vec<String>,
    /// Pids of every worker process.
    workers: Vec<u32>,
    pool: PgPool,
    url: String,
    admin_url: String,
    db: String,
    namespace: String,
    redis_url: String,
}

impl Deployment {
    async fn start(cfg: &BenchConfig) -> anyhow::Result<Deployment> {
        let suffix: String = (0..10).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
        let db = format!("switchboard_bench_{suffix}");
        let (server, _) = cfg.database_url.rsplit_once('/').context("DATABASE_URL needs a database path")?;
        let url = format!("{server}/{db}");
        db::create_database_if_missing(&url).await?;
        let pool = db::connect(&url, 8).await?;
        db::migrate(&pool).await?;
        let namespace = format!("sbbench_{suffix}");
        let exe = std::env::current_exe()?;
        let envs = [
            ("DATABASE_URL", url.clone()),
            ("REDIS_URL", cfg.redis_url.clone()),
            ("SWITCHBOARD_NAMESPACE", namespace.clone()),
            ("SWITCHBOARD_ADMIN_TOKEN", TOKEN.to_string()),
            ("SWITCHBOARD_API_ADDR", "127.0.0.1:0".to_string()),
            ("SWITCHBOARD_WORKER_CONCURRENCY", cfg.worker_concurrency.to_string()),
            // Every process's pool within Postgres' default max_connections (100).
            ("SWITCHBOARD_DB_MAX_CONNECTIONS", (84 / (cfg.apis + cfg.workers).max(2)).min(32).to_string()),
            ("RUST_LOG", "warn".to_string()),
            // The bench measures the engine, not the rate limiter.
            ("SWITCHBOARD_RATE_LIMIT_PER_S", "0".to_string()),
            ("SWITCHBOARD_ADDRESS_RATE_LIMIT_PER_S", "0".to_string()),
        ];
        let spawn = |role: &str| {
            Command::new(&exe)
                .arg(role)
                .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
        };
        let (api, base) = start_api(&exe, &envs)?;
        let worker = spawn("worker")?;
        let scheduler = spawn("scheduler")?;
        let (mut bases, mut workers) = (vec![base.clone()], vec![worker.id()]);
        let mut more = Vec::new();
        for _ in 1..cfg.apis.max(1) {
            let (api, base) = start_api(&exe, &envs)?;
            bases.push(base);
            more.push(api);
        }
        for _ in 1..cfg.workers.max(1) {
            let w = spawn("worker")?;
            workers.push(w.id());
            more.push(w);
        }
        let mut children = vec![api, worker, scheduler];
        children.extend(more);
        Ok(Deployment {
            children,
            base,
            bases,
            workers,
            pool,
            url,
            admin_url: format!("{server}/postgres"),
            db,
            namespace,
            redis_url: cfg.redis_url.clone(),
        })
    }

    /// The api root client `i` talks to.
    fn base_for(&self, i: usize) -> &str {
        &self.bases[i % self.bases.len()]
    }

    fn rss_kib(&self) -> Vec<u64> {
        self.children.iter().map(|c| rss_kib(c.id())).collect()
    }

    async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pool.close().await;
        let _ = db::drop_database(&self.admin_url, &self.db).await;
        if let Ok(client) = redis::Client::open(self.redis_url.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.namespace))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
            let member = switchboard_core::queue::Keys::new(&self.namespace).queue_list_member();
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg(switchboard_core::queue::APALIS_QUEUE_LIST)
                .arg(member)
                .query_async(&mut conn)
                .await;
        }
    }
}

/// Starts an api process and waits for the address it prints.
fn start_api(exe: &std::path::Path, envs: &[(&str, String)]) -> anyhow::Result<(Child, String)> {
    let mut api = Command::new(exe)
        .arg("api")
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = api.stdout.take().context("api stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("switchboard api listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(20)).context("api did not start")?;
    Ok((api, base))
}

/// A process's resident memory (KiB, from /proc; 0 when unreadable).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn stats(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    percentile(&xs, 0.5)
}

async fn timed<F, Fut, T>(n: usize, mut f: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

pub(crate) async fn start_run(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/api/v1/modules/sleep/runs"))
        .bearer_auth(TOKEN)
        .json(&json!({"params": {"ms": 0}, "device": {"pool": "bench"}}))
        .send()
        .await?;
    if resp.status().as_u16() != 202 {
        bail!("start run answered {}", resp.status());
    }
    let body: Value = resp.json().await?;
    Ok(body["id"].as_str().unwrap_or_default().to_string())
}

pub(crate) async fn wait_idle(pool: &PgPool, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        crate::bench_pg::OWN_STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let left = repo::stats::open_runs(pool).await?;
        if left == 0 {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{left} runs still unfinished after {timeout:?}");
        }
        // Counting a big backlog is itself work for Postgres: look often only near the end.
        tokio::time::sleep(Duration::from_millis(if left > 500 { 250 } else { 20 })).await;
    }
}

pub async fn run(cfg: BenchConfig) -> anyhow::Result<()> {
    let dep = Deployment::start(&cfg).await?;
    let result = measure(&cfg, &dep).await;
    dep.stop().await;
    let report = result?;
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&cfg, &report);
    }
    Ok(())
}

async fn measure(cfg: &BenchConfig, dep: &Deployment) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    for i in 0..cfg.devices {
        let r = http
            .post(format!("{}/api/v1/devices", dep.base))
            .bearer_auth(TOKEN)
            .json(&json!({"serial": format!("bench-{i:03}"), "pool": "bench", "driver": "sim"}))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("registering a device answered {}", r.status());
        }
    }
    let redis_client = redis::Client::open(cfg.redis_url.as_str())?;
    let redis_conn = redis_client.get_multiplexed_async_connection().await?;
    // Warm up every path once, then at the measured concurrency: pools open their
    // connections lazily, and each new connection first reads the catalog for the
    // enum types (sqlx), which a first round would otherwise pay for.
    let id = start_run(&http, &dep.base).await?;
    let warm = (0..cfg.clients.max(1)).map(|_| async {
        for _ in 0..10 {
            start_run(&http, &dep.base).await?;
        }
        anyhow::Ok(())
    });
    for w in futures::future::join_all(warm).await {
        w?;
    }
    wait_idle(&dep.pool, Duration::from_secs(60)).await?;

    let mut rounds = Vec::new();
    for round in 0..cfg.rounds {
        eprintln!("round {}/{} ...", round + 1, cfg.rounds);
        let pg = timed(300, || async { db::ping(&dep.pool).await.map(|_| ()).map_err(Into::into) }).await?;
        let rd = timed(300, || {
            let mut c = redis_conn.clone();
            async move { redis::cmd("PING").query_async::<String>(&mut c).await.map(|_| ()).map_err(Into::into) }
        })
        .await?;
        let health = timed(300, || async {
            http.get(format!("{}/health", dep.base)).send().await?.bytes().await.map(|_| ()).map_err(Into::into)
        })
        .await?;
        let get_run = timed(300, || async {
            http.get(format!("{}/api/v1/runs/{id}", dep.base))
                .bearer_auth(TOKEN)
                .send()
                .await?
                .bytes()
                .await
                .map(|_| ())
                .map_err(Into::into)
        })
        .await?;

        // Enqueue-to-start with idle workers: one run at a time.
        let mut lat_ids = Vec::new();
        let mut post = Vec::new();
        for _ in 0..cfg.latency_samples {
            let t = Instant::now();
            lat_ids.push(start_run(&http, &dep.base).await?);
            post.push(t.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        wait_idle(&dep.pool, Duration::from_secs(60)).await?;
        let ids: Vec<RunId> = lat_ids.iter().filter_map(|s| s.parse().ok()).collect();
        let e2s = repo::stats::start_latencies_ms(&dep.pool, &ids).await?;

        // The same-run baseline: raw INSERT+UPDATE transactions, 8 sessions, 3 s.
        let baseline_txn = crate::bench_pg::baseline_txn_per_s(&dep.url, 8, 3.0).await?;

        // Throughput: many clients submit `runs` zero-length runs.
        let work = crate::bench_pg::PgWork::start(&dep.pool).await;
        let t0 = Instant::now();
        let per_client = cfg.runs / cfg.clients.max(1);
        let mut tasks = Vec::new();
        for client in 0..cfg.clients.max(1) {
            let http = http.clone();
            let base = dep.base_for(client).to_string();
            tasks.push(tokio::spawn(async move {
                let mut ms = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    start_run(&http, &base).await?;
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(ms)
            }));
        }
        let mut loaded = Vec::with_capacity(cfg.runs);
        for t in tasks {
            loaded.extend(t.await??);
        }
        let submit_s = t0.elapsed().as_secs_f64();
        wait_idle(&dep.pool, Duration::from_secs(600)).await?;
        let total_s = t0.elapsed().as_secs_f64();
        let submitted = per_client * cfg.clients.max(1);
        let pg_work = work.per_run(&dep.pool, submitted).await;
        let batched = batch_throughput(cfg, dep, &http).await?;
        rounds.push(json!({
            "baseline_txn_per_s": baseline_txn, "postgres_per_run": pg_work, "batch": batched,
            "pg_ms": stats(pg), "redis_ms": stats(rd), "http_health_ms": stats(health), "api_get_run_ms": stats(get_run),
            "api_post_run_ms": stats(post), "enqueue_to_start_ms": stats(e2s), "api_post_run_loaded_ms": stats(loaded),
            "enqueue_per_s": submitted as f64 / submit_s, "end_to_end_runs_per_s": submitted as f64 / total_s,
        }));
    }
    let fire_lag = if cfg.fire_lag_seconds > 0 { Some(fire_lag(cfg, dep, &http).await?) } else { None };
    let rss = dep.rss_kib();
    let scrape = if cfg.scrape_history > 0 { Some(scrape_cost(cfg, dep, &http, &id).await?) } else { None };
    let prune = if cfg.prune_history > 0 { Some(prune_cost(cfg, dep, &id).await?) } else { None };
    let feed = if cfg.feed_clients > 0 {
        Some(crate::bench_feed::measure(cfg, &dep.base, TOKEN, &dep.pool, dep.children[0].id()).await?)
    } else {
        None
    };
    let pick = |key: &str, i: usize| median(rounds.iter().map(|r| r[key][i].as_f64().unwrap_or(f64::NAN)).collect());
    let pick1 = |key: &str| median(rounds.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect());
    let pick2 =
        |key: &str, sub: &str| median(rounds.iter().map(|r| r[key][sub].as_f64().unwrap_or(f64::NAN)).collect());
    let backlog = drain_backlogs(cfg, dep, &http).await?;
    let e2s_p50 = pick("enqueue_to_start_ms", 0);
    let pg_p50 = pick("pg_ms", 0);
    Ok(json!({
        "config": {"devices": cfg.devices, "runs_per_round": cfg.runs, "latency_samples": cfg.latency_samples, "rounds": cfg.rounds,
                   "worker_concurrency": cfg.worker_concurrency, "clients": cfg.clients, "apis": cfg.apis, "workers": cfg.workers},
        "baseline": {"postgres_select1_ms": {"p50": pg_p50, "p99": pick("pg_ms", 1)},
                     "redis_ping_ms": {"p50": pick("redis_ms", 0), "p99": pick("redis_ms", 1)},
                     "http_health_ms": {"p50": pick("http_health_ms", 0), "p99": pick("http_health_ms", 1)}},
        "enqueue_to_start_ms": {"p50": e2s_p50, "p99": pick("enqueue_to_start_ms", 1), "p50_in_postgres_round_trips": e2s_p50 / pg_p50},
        "api_ms": {"post_run": {"p50": pick("api_post_run_ms", 0), "p99": pick("api_post_run_ms", 1)},
                   "post_run_under_load": {"p50": pick("api_post_run_loaded_ms", 0), "p99": pick("api_post_run_loaded_ms", 1)},
                   "get_run": {"p50": pick("api_get_run_ms", 0), "p99": pick("api_get_run_ms", 1)}},
        "throughput": {"enqueue_per_s": pick1("enqueue_per_s"), "end_to_end_runs_per_s": pick1("end_to_end_runs_per_s"),
                       "baseline_txn_per_s": pick1("baseline_txn_per_s"),
                       "end_to_end_ratio_to_baseline": pick1("end_to_end_runs_per_s") / pick1("baseline_txn_per_s"),
                       "batch_enqueue_per_s": pick2("batch", "enqueue_per_s"),
                       "batch_end_to_end_runs_per_s": pick2("batch", "end_to_end_runs_per_s")},
        "postgres_per_run": {"cpu_ms": pick2("postgres_per_run", "postgres_cpu_ms"),
                             "statements": pick2("postgres_per_run", "statements"),
                             "statements_without_begin_commit": pick2("postgres_per_run", "statements_without_begin_commit")},
        "backlog": backlog,
        "memory_rss_mib": {"api": rss.first().copied().unwrap_or(0) as f64 / 1024.0, "worker": rss.get(1).copied().unwrap_or(0) as f64 / 1024.0,
                           "scheduler": rss.get(2).copied().unwrap_or(0) as f64 / 1024.0},
        "schedule_fire_lag_ms": fire_lag,
        "feed": feed,
        "metrics_scrape_ms": scrape,
        "retention": prune,
        "rounds": rounds,
    }))
}

/// Submits `cfg.runs` runs through `POST /runs/batch` (500 per call, 4 clients at
/// once) and waits for them to finish: the enqueue and end-to-end rates of bulk starts.
async fn batch_throughput(cfg: &BenchConfig, dep: &Deployment, http: &reqwest::Client) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let calls = cfg.runs.div_ceil(500);
    let mut submitted = 0;
    for wave in (0..calls).collect::<Vec<_>>().chunks(4) {
        let sends = wave.iter().map(|i| submit_batch(http, dep.base_for(*i), (cfg.runs - i * 500).min(500)));
        for n in futures::future::join_all(sends).await {
            submitted += n?;
        }
    }
    let submit_s = t0.elapsed().as_secs_f64();
    wait_idle(&dep.pool, Duration::from_secs(600)).await?;
    Ok(json!({"runs": submitted, "enqueue_per_s": submitted as f64 / submit_s,
              "end_to_end_runs_per_s": submitted as f64 / t0.elapsed().as_secs_f64()}))
}

/// One `POST /runs/batch` of `n` zero-length runs; the runs it queued.
async fn submit_batch(http: &reqwest::Client, base: &str, n: usize) -> anyhow::Result<usize> {
    let runs: Vec<Value> =
        (0..n).map(|_| json!({"module": "sleep", "params": {"ms": 0}, "device": {"pool": "bench"}})).collect();
    let resp =
        http.post(format!("{base}/api/v1/runs/batch")).bearer_auth(TOKEN).json(&json!({"runs": runs})).send().await?;
    if resp.status().as_u16() != 202 {
        bail!("a batch start answered {}", resp.status());
    }
    Ok(n)
}

/// For each `--backlog` size: the worker stopped (SIGSTOP), that many runs queued, the
/// worker let go (SIGCONT), and the drain timed, with Postgres' work per run.
async fn drain_backlogs(cfg: &BenchConfig, dep: &Deployment, http: &reqwest::Client) -> anyhow::Result<Value> {
    let workers: Vec<String> = dep.workers.iter().map(u32::to_string).collect();
    let mut out = Vec::new();
    for &n in &cfg.backlog {
        eprintln!("backlog of {n} runs ...");
        std::process::Command::new("kill").arg("-STOP").args(&workers).status()?;
        let queued = async {
            for chunk in (0..n).step_by(1000) {
                submit_batch(http, &dep.base, (n - chunk).min(1000)).await?;
            }
            anyhow::Ok(())
        }
        .await;
        std::process::Command::new("kill").arg("-CONT").args(&workers).status()?;
        queued?;
        let work = crate::bench_pg::PgWork::start(&dep.pool).await;
        let t0 = Instant::now();
        wait_idle(&dep.pool, Duration::from_secs(3600)).await?;
        let secs = t0.elapsed().as_secs_f64();
        out.push(json!({"queued": n, "drain_runs_per_s": n as f64 / secs, "postgres_per_run": work.per_run(&dep.pool, n).await}));
    }
    Ok(Value::Array(out))
}

/// `/metrics` scrape time and the gauge refresh query's time (medians of 30) with the
/// history as it is, then with `scrape_history` more finished runs and twice as many
/// events: a scrape reads no table and the refresh reads only open runs and devices,
/// so the two should match.
async fn scrape_cost(cfg: &BenchConfig, dep: &Deployment, http: &reqwest::Client, run: &str) -> anyhow::Result<Value> {
    let scrape = || async {
        let times = timed(30, || async {
            http.get(format!("{}/metrics", dep.base)).send().await?.bytes().await.map(|_| ()).map_err(Into::into)
        })
        .await?;
        anyhow::Ok(median(times))
    };
    let refresh = || async {
        let times =
            timed(30, || async { repo::stats::gauges(&dep.pool).await.map(|_| ()).map_err(Into::into) }).await?;
        anyhow::Ok(median(times))
    };
    let runs_before: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&dep.pool).await?;
    let (before, refresh_before) = (scrape().await?, refresh().await?);
    eprintln!("metrics scrape: adding {} finished runs to the history ...", cfg.scrape_history);
    let run: uuid::Uuid = run.parse()?;
    // Copies of a finished run (new ids), each with a queued and a finished event: one
    // long statement, past the pool's statement timeout.
    let mut tx = dep.pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await?;
    sqlx::query(
        "WITH copies AS (
             INSERT INTO runs SELECT (jsonb_populate_record(NULL::runs, to_jsonb(r)
                 || jsonb_build_object('id', gen_random_uuid(), 'idempotency_key', NULL, 'idempotency_scope', NULL))).*
             FROM runs r, generate_series(1, $2) WHERE r.id = $1 RETURNING id, kind)
         INSERT INTO events (type, run_id, data)
         SELECT t, c.id, jsonb_build_object('status', 'succeeded') FROM copies c, unnest(ARRAY['run.queued', 'run.finished']) t",
    )
    .bind(run)
    .bind(cfg.scrape_history as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("ANALYZE runs").execute(&dep.pool).await?;
    sqlx::query("ANALYZE events").execute(&dep.pool).await?;
    let (after, refresh_after) = (scrape().await?, refresh().await?);
    Ok(json!({
        "runs_before": runs_before, "runs_after": runs_before + cfg.scrape_history as i64,
        "p50_before": before, "p50_after": after, "ratio": after / before,
        "refresh_p50_before": refresh_before, "refresh_p50_after": refresh_after,
        "refresh_ratio": refresh_after / refresh_before,
    }))
}

/// Retention's cost: `prune_history` runs ended 100 days ago, pruned batch by batch
/// as the scheduler does (500 runs a statement); total, per 10,000 runs, and the
/// longest batch (how long one prune statement holds its rows).
async fn prune_cost(cfg: &BenchConfig, dep: &Deployment, run: &str) -> anyhow::Result<Value> {
    eprintln!("retention: adding {} runs ended 100 days ago ...", cfg.prune_history);
    let run: uuid::Uuid = run.parse()?;
    let mut tx = dep.pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await?;
    sqlx::query(
        "WITH copies AS (
             INSERT INTO runs SELECT (jsonb_populate_record(NULL::runs, to_jsonb(r)
                 || jsonb_build_object('id', gen_random_uuid(), 'idempotency_key', NULL, 'idempotency_scope', NULL,
                        'started_at', now() - interval '100 days 1 second', 'finished_at', now() - interval '100 days'))).*
             FROM runs r, generate_series(1, $2) WHERE r.id = $1 RETURNING id),
         st AS (INSERT INTO run_steps (run_id, idx, module, params, status, attempt)
                SELECT c.id, 0, 'sleep', '{}', 'passed', 1 FROM copies c)
         INSERT INTO events (type, run_id, data)
         SELECT t, c.id, '{}' FROM copies c, unnest(ARRAY['run.queued', 'run.started', 'run.finished']) t",
    )
    .bind(run)
    .bind(cfg.prune_history as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("ANALYZE runs").execute(&dep.pool).await?;
    let keep = Duration::from_secs(90 * 86_400);
    let (mut total, mut longest, started) = (repo::retention::Pruned::default(), 0.0f64, Instant::now());
    loop {
        let t = Instant::now();
        let p = repo::retention::prune_runs(&dep.pool, keep, 500).await?;
        longest = longest.max(t.elapsed().as_secs_f64() * 1000.0);
        total += p;
        if p.runs < 500 {
            break;
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "runs": total.runs, "steps": total.steps, "events": total.events, "total_ms": ms,
        "ms_per_10000_runs": ms * 10_000.0 / total.runs.max(1) as f64, "longest_batch_ms": longest,
    }))
}

/// An every-second schedule for `fire_lag_seconds`: lag from each tick to its run's push.
async fn fire_lag(cfg: &BenchConfig, dep: &Deployment, http: &reqwest::Client) -> anyhow::Result<Value> {
    eprintln!("fire lag: every-second schedule for {} s ...", cfg.fire_lag_seconds);
    let r = http
        .post(format!("{}/api/v1/schedules", dep.base))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "bench-every-second", "cron": "* * * * * *",
                      "target": {"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "bench"}}}))
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("creating the schedule answered {}", r.status());
    }
    let id: Value = r.json().await?;
    let id: ScheduleId = id["id"].as_str().unwrap_or_default().parse()?;
    tokio::time::sleep(Duration::from_secs(cfg.fire_lag_seconds)).await;
    let stop = http
        .patch(format!("{}/api/v1/schedules/{id}", dep.base))
        .bearer_auth(TOKEN)
        .json(&json!({"enabled": false}))
        .send()
        .await?;
    if !stop.status().is_success() {
        bail!("disabling the schedule answered {}", stop.status());
    }
    let lags = repo::stats::fire_lags_ms(&dep.pool, id).await?;
    let n = lags.len();
    let (p50, p99) = stats(lags.clone());
    let max = lags.iter().cloned().fold(f64::NAN, f64::max);
    Ok(json!({"ticks": n, "p50": p50, "p99": p99, "max": max}))
}

fn print_report(cfg: &BenchConfig, r: &Value) {
    let f = |v: &Value| v.as_f64().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    println!(
        "switchboard bench: {} sim devices, {} api and {} worker process(es) of concurrency {}, {} rounds (medians)",
        cfg.devices, cfg.apis, cfg.workers, cfg.worker_concurrency, cfg.rounds
    );
    println!(
        "  baseline  postgres SELECT 1   p50 {} ms  p99 {} ms",
        f(&r["baseline"]["postgres_select1_ms"]["p50"]),
        f(&r["baseline"]["postgres_select1_ms"]["p99"])
    );
    println!(
        "  baseline  redis PING          p50 {} ms  p99 {} ms",
        f(&r["baseline"]["redis_ping_ms"]["p50"]),
        f(&r["baseline"]["redis_ping_ms"]["p99"])
    );
    println!(
        "  baseline  GET /health         p50 {} ms  p99 {} ms",
        f(&r["baseline"]["http_health_ms"]["p50"]),
        f(&r["baseline"]["http_health_ms"]["p99"])
    );
    println!(
        "  enqueue-to-start (idle)       p50 {} ms  p99 {} ms  (p50 = {} postgres round trips)",
        f(&r["enqueue_to_start_ms"]["p50"]),
        f(&r["enqueue_to_start_ms"]["p99"]),
        f(&r["enqueue_to_start_ms"]["p50_in_postgres_round_trips"])
    );
    println!(
        "  API POST .../runs             p50 {} ms  p99 {} ms",
        f(&r["api_ms"]["post_run"]["p50"]),
        f(&r["api_ms"]["post_run"]["p99"])
    );
    println!(
        "  API POST .../runs, {} clients  p50 {} ms  p99 {} ms",
        cfg.clients,
        f(&r["api_ms"]["post_run_under_load"]["p50"]),
        f(&r["api_ms"]["post_run_under_load"]["p99"])
    );
    println!(
        "  API GET /runs/{{id}}            p50 {} ms  p99 {} ms",
        f(&r["api_ms"]["get_run"]["p50"]),
        f(&r["api_ms"]["get_run"]["p99"])
    );
    println!(
        "  enqueue throughput            {} runs/s ({} clients)",
        f(&r["throughput"]["enqueue_per_s"]),
        cfg.clients
    );
    println!(
        "  end-to-end throughput         {} runs/s ({} runs per round)",
        f(&r["throughput"]["end_to_end_runs_per_s"]),
        cfg.runs
    );
    println!(
        "  baseline  INSERT+UPDATE txn   {} txn/s (8 sessions); end to end = {} of it",
        f(&r["throughput"]["baseline_txn_per_s"]),
        f(&r["throughput"]["end_to_end_ratio_to_baseline"])
    );
    println!(
        "  postgres per run              {} ms CPU, {} statements ({} without BEGIN/COMMIT)",
        f(&r["postgres_per_run"]["cpu_ms"]),
        f(&r["postgres_per_run"]["statements"]),
        f(&r["postgres_per_run"]["statements_without_begin_commit"])
    );
    println!(
        "  batch enqueue (POST /runs/batch, 500 a call)  {} runs/s; end to end {} runs/s",
        f(&r["throughput"]["batch_enqueue_per_s"]),
        f(&r["throughput"]["batch_end_to_end_runs_per_s"])
    );
    for b in r["backlog"].as_array().into_iter().flatten() {
        println!(
            "  backlog {:>7} queued          drained at {} runs/s; postgres per run {} ms CPU, {} statements",
            b["queued"],
            f(&b["drain_runs_per_s"]),
            f(&b["postgres_per_run"]["postgres_cpu_ms"]),
            f(&b["postgres_per_run"]["statements"])
        );
    }
    println!(
        "  memory (RSS)                  api {} MiB, worker {} MiB, scheduler {} MiB",
        f(&r["memory_rss_mib"]["api"]),
        f(&r["memory_rss_mib"]["worker"]),
        f(&r["memory_rss_mib"]["scheduler"])
    );
    if r["metrics_scrape_ms"].is_object() {
        let m = &r["metrics_scrape_ms"];
        println!(
            "  GET /metrics                  p50 {} ms at {} runs, {} ms at {} runs (x{}); gauge refresh query p50 {} ms, {} ms (x{})",
            f(&m["p50_before"]),
            m["runs_before"],
            f(&m["p50_after"]),
            m["runs_after"],
            f(&m["ratio"]),
            f(&m["refresh_p50_before"]),
            f(&m["refresh_p50_after"]),
            f(&m["refresh_ratio"])
        );
    }
    if r["retention"].is_object() {
        let p = &r["retention"];
        println!(
            "  retention                     pruned {} runs, {} steps, {} events in {} ms: {} ms per 10,000 runs; longest batch {} ms",
            p["runs"],
            p["steps"],
            p["events"],
            f(&p["total_ms"]),
            f(&p["ms_per_10000_runs"]),
            f(&p["longest_batch_ms"])
        );
    }
    if r["feed"].is_object() {
        let l = &r["feed"];
        println!(
            "  feed: {} WebSocket clients, {} runs {}, {} events each: delivered to all {}; latency p50 {} ms  p99 {} ms; api RSS {} MiB",
            l["clients"],
            l["runs"],
            l["rate_per_s"].as_f64().map(|r| format!("at {r}/s")).unwrap_or_else(|| "unpaced".into()),
            l["events_per_client"],
            l["complete"],
            f(&l["delivery_ms"]["p50"]),
            f(&l["delivery_ms"]["p99"]),
            f(&l["api_rss_mib"])
        );
        for (kind, ms) in l["delivery_ms_by_type"].as_object().into_iter().flatten() {
            println!("    {kind:<28}p50 {} ms  p99 {} ms", f(&ms["p50"]), f(&ms["p99"]));
        }
    }
    if r["schedule_fire_lag_ms"].is_object() {
        let l = &r["schedule_fire_lag_ms"];
        println!(
            "  schedule fire lag             p50 {} ms  p99 {} ms  max {} ms  over {} ticks",
            f(&l["p50"]),
            f(&l["p99"]),
            f(&l["max"]),
            l["ticks"]
        );
    }
}
