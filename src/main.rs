//! `switchboard`: one binary, one subcommand per role.

mod bench;
mod bench_feed;
mod bench_history;
mod bench_pg;
mod run_cmd;
mod watch;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use switchboard_core::{
    config::{AgentConfig, ApiConfig, CommonConfig, SchedulerConfig, WorkerConfig},
    db, meters,
    model::{DeviceStatus, Driver},
    repo::devices::{self, NewDevice},
    shutdown, telemetry,
};

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Durable test orchestration for device farms")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Api {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        api: ApiConfig,
    },
    /// Execute runs from the queue.
    Worker {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    },
    /// Reconcile stranded runs (and, later, fire cron schedules).
    Scheduler {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        scheduler: SchedulerConfig,
    },
    /// The agent for a machine with phones plugged in: registers with the API,
    /// heartbeats with its adb devices, and runs the modules workers send it.
    HostAgent {
        #[command(flatten)]
        agent: AgentConfig,
    },
    /// Create the database if missing and apply migrations.
    Migrate {
        #[command(flatten)]
        common: CommonConfig,
    },
    /// Measure a deployment (its own, started and removed) against raw Postgres, Redis
    /// and HTTP round trips taken in the same run.
    Bench {
        #[command(subcommand)]
        mode: Option<BenchMode>,
        #[command(flatten)]
        bench: bench::BenchConfig,
    },
    /// Start a run for CI and follow it to its end: exit 0 passed, 10 a verdict failed,
    /// 15 timed out, 19 cancelled, 20 infrastructure error (1-9: usage or API errors).
    Run {
        #[command(flatten)]
        run: run_cmd::RunConfig,
    },
    /// Follow the event feed in a terminal (reconnects and resumes by itself).
    Watch {
        #[command(flatten)]
        watch: watch::WatchConfig,
    },
    /// Everything in one process, with a simulated device farm: for trying Switchboard.
    Dev {
        #[command(flatten)]
        common: CommonConfig,
        #[command(flatten)]
        api: ApiConfig,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        scheduler: SchedulerConfig,
    },
}

/// What `switchboard bench` measures besides the deployment's throughput.
#[derive(Subcommand)]
enum BenchMode {
    /// Seed a database of its own with synthetic run history and time every dashboard,
    /// search and filtered-list query against it.
    History {
        #[command(flatten)]
        history: bench_history::HistoryConfig,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Api { common, api } => {
            let t = telemetry::init(&common.log_format, "api");
            finish(t, switchboard_api::run(common, api, shutdown::on_signal()).await).await
        }
        Command::Worker { common, worker } => {
            let t = telemetry::init(&common.log_format, "worker");
            let stop = shutdown::on_signal();
            let done = match serve_metrics(&common, &stop).await {
                Ok(()) => switchboard_worker::run(common, worker, stop).await,
                Err(e) => Err(e),
            };
            finish(t, done).await
        }
        Command::Scheduler { common, scheduler } => {
            let t = telemetry::init(&common.log_format, "scheduler");
            let stop = shutdown::on_signal();
            let done = match serve_metrics(&common, &stop).await {
                Ok(()) => switchboard_scheduler::run(common, scheduler, stop).await,
                Err(e) => Err(e),
            };
            finish(t, done).await
        }
        Command::HostAgent { agent } => {
            let t = telemetry::init(&agent.log_format, "host-agent");
            finish(t, switchboard_worker::agent::run(agent, shutdown::on_signal()).await).await
        }
        Command::Migrate { common } => {
            let t = telemetry::init(&common.log_format, "migrate");
            let done = migrate(&common).await.map(|_| println!("migrations applied"));
            finish(t, done).await
        }
        Command::Bench { mode, bench } => {
            let t = telemetry::init("text", "bench");
            let done = match mode {
                Some(BenchMode::History { history }) => bench_history::run(history).await,
                None => bench::run(bench).await,
            };
            finish(t, done).await
        }
        Command::Watch { watch } => watch::run(watch).await,
        Command::Run { run } => std::process::exit(run_cmd::run(run).await),
        Command::Dev { common, api, worker, scheduler } => {
            let t = telemetry::init(&common.log_format, "dev");
            finish(t, dev(common, api, worker, scheduler).await).await
        }
    }
}

/// Installs a worker's or scheduler's metrics recorder, and serves its `/metrics` on
/// `SWITCHBOARD_METRICS_ADDR` when set (a taken address fails the start, as the api's
/// does).
async fn serve_metrics(common: &CommonConfig, stop: &tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    // These roles set no Postgres gauges: nothing of theirs goes stale.
    meters::install(std::time::Duration::from_secs(3600));
    if let Some(addr) = common.metrics_addr.as_deref().filter(|a| !a.is_empty()) {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        tokio::spawn(switchboard_api::routes::metrics::serve_metrics(
            listener,
            common.metrics_token.clone(),
            stop.clone(),
        ));
    }
    Ok(())
}

/// Flushes the spans not yet exported, then passes the role's result on.
async fn finish(telemetry: telemetry::Telemetry, result: anyhow::Result<()>) -> anyhow::Result<()> {
    telemetry.shutdown().await;
    result
}

async fn migrate(common: &CommonConfig) -> anyhow::Result<sqlx::PgPool> {
    db::create_database_if_missing(&common.database_url).await.context("creating the database")?;
    let pool = db::connect(&common.database_url, 4).await.context("connecting to postgres")?;
    db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// The simulated farm `dev` seeds: 8 phones in pool `sim`, a little latency each.
fn dev_farm() -> Vec<NewDevice> {
    let models = ["Pixel 8", "Pixel 7a", "Galaxy S24", "Galaxy A54"];
    (1..=8)
        .map(|i| NewDevice {
            serial: format!("sim-{i:02}"),
            name: format!("Simulated phone {i}"),
            platform: "android".into(),
            model: Some(models[(i - 1) % models.len()].into()),
            pool: "sim".into(),
            labels: if i % 2 == 0 {
                vec!["android".into(), "lte".into(), "volte".into()]
            } else {
                vec!["android".into(), "lte".into()]
            },
            driver: Driver::Sim,
            host_id: None,
            status: DeviceStatus::Online,
            metadata: json!({"sim": {"latency_ms": 100 + 25 * i}}),
        })
        .collect()
}

async fn dev(
    common: CommonConfig,
    mut api: ApiConfig,
    worker: WorkerConfig,
    scheduler: SchedulerConfig,
) -> anyhow::Result<()> {
    let pool = migrate(&common).await?;
    let created = devices::seed(&pool, &dev_farm()).await?;
    pool.close().await;
    let token = api.admin_token.clone().unwrap_or_else(|| {
        let t: String = (0..32).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
        format!("sb_dev_{t}")
    });
    api.admin_token = Some(token.clone());
    // Bind first, so the banner shows the real address (`SWITCHBOARD_API_ADDR=127.0.0.1:0` works).
    let listener = switchboard_api::bind(&api).await?;
    let addr = listener.local_addr()?;
    println!();
    println!("Switchboard dev is starting ({created} simulated devices added; 8 in pool \"sim\").");
    println!("  API:         http://{addr}");
    println!("  Admin token: {token}");
    println!("  Start a run:");
    println!(
        "    curl -s -X POST http://{addr}/api/v1/modules/ping/runs -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"params\": {{\"host\": \"8.8.8.8\", \"count\": 4}}, \"device\": {{\"pool\": \"sim\"}}}}'"
    );
    println!("  Then: curl -s http://{addr}/api/v1/runs/<id> -H 'Authorization: Bearer {token}'");
    if worker.adb_discover {
        println!(
            "  adb discovery is on: phones `adb devices` lists join pool {:?} (device: {{\"serial\": \"<serial>\"}}).",
            worker.adb_pool
        );
    } else {
        println!("  Real phones: SWITCHBOARD_ADB_DISCOVER=true adds what `adb devices` lists (docs/drivers.md).");
    }
    println!();
    let stop = shutdown::on_signal();
    let (a, w, s) = tokio::join!(
        switchboard_api::serve(common.clone(), api, listener, stop.clone()),
        switchboard_worker::run(common.clone(), worker, stop.clone()),
        switchboard_scheduler::run(common, scheduler, stop.clone()),
    );
    a.and(w).and(s)
}
