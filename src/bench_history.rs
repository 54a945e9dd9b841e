//! `switchboard bench history --runs N`: seeds a database of its own with synthetic
//! history (N runs over 90 days on 200 devices, their steps, ten events per run) and
//! times every dashboard, search and filtered-list query against it, as the API runs
//! them (core's repository functions, on a pool like the API's). Reported, never
//! asserted: `docs/performance.md` keeps the table.
//!
//! The seed is generated inside Postgres (`INSERT … SELECT` over `generate_series`), in
//! chunks: no rows cross the wire, which is faster here than COPY from the client.

use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::PgPool;
use switchboard_core::{
    db,
    history::{HistoryFilter, Window},
    ids::{DeviceId, RunId},
    model::RunStatus,
    repo::{dashboard, rollup, runs, search},
};

use crate::bench::percentile;

/// Settings of `switchboard bench history`.
#[derive(clap::Args, Debug, Clone)]
pub struct HistoryConfig {
    /// Postgres server to create the bench database on (its database name is ignored).
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/switchboard")]
    pub database_url: String,
    /// Runs of synthetic history (spread over the last 90 days).
    #[arg(long, default_value_t = 1_000_000)]
    pub runs: i64,
    /// Events per run.
    #[arg(long, default_value_t = 10)]
    pub events_per_run: i64,
    /// Times each query is run after a first call; p50 and p95 are reported.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Keep the database afterwards (its name is printed), to EXPLAIN by hand.
    #[arg(long)]
    pub keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Seeds, measures, prints, and drops the database (unless `--keep`).
pub async fn run(cfg: HistoryConfig) -> anyhow::Result<()> {
    let suffix: String = (0..10).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
    let (server, _) = cfg.database_url.rsplit_once('/').context("DATABASE_URL needs a database path")?;
    let name = format!("switchboard_history_{suffix}");
    let url = format!("{server}/{name}");
    db::create_database_if_missing(&url).await?;
    let pool = db::connect(&url, 8).await?;
    db::migrate(&pool).await?;
    let result = async {
        let seeded = seed(&pool, &cfg).await?;
        let timings = measure(&pool, &cfg).await?;
        anyhow::Ok(json!({"seed": seeded, "queries": timings}))
    }
    .await;
    pool.close().await;
    if cfg.keep {
        eprintln!("kept the database: {url}");
    } else {
        db::drop_database(&cfg.database_url, &name).await?;
    }
    let report = result?;
    if cfg.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

/// The synthetic history: 200 devices in 10 pools, 20 schedules, then runs in chunks
/// of 100,000 with their steps and events, then ANALYZE.
async fn seed(pool: &PgPool, cfg: &HistoryConfig) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    sqlx::query("SET statement_timeout = 0").execute(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO devices (id, serial, name, model, pool, labels, driver, metadata)
         SELECT gen_random_uuid(), 'dev-' || lpad(i::text, 4, '0'), 'Phone ' || i, 'Pixel ' || (6 + i % 4),
                'pool-' || (i % 10), CASE WHEN i % 3 = 0 THEN ARRAY['volte', '5g'] ELSE ARRAY['lte'] END, 'sim', '{}'
         FROM generate_series(1, 200) i",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO schedules (id, name, cron, timezone, target, enabled)
         SELECT gen_random_uuid(), 'nightly-' || i, '0 0 2 * * *', 'UTC',
                jsonb_build_object('kind', 'module', 'id', 'ping', 'params', '{}', 'device', jsonb_build_object('pool', 'pool-1')), false
         FROM generate_series(1, 20) i",
    )
    .execute(&mut *conn)
    .await?;
    let chunk = 100_000i64;
    let mut from = 0i64;
    while from < cfg.runs {
        let n = chunk.min(cfg.runs - from);
        seed_chunk(&mut conn, from, n, cfg.runs, cfg.events_per_run).await?;
        from += n;
        eprintln!("history: {from} of {} runs seeded ({:.0} s)", cfg.runs, started.elapsed().as_secs_f64());
    }
    // As autovacuum leaves a table that has settled: statistics, and the visibility map
    // that lets window reads come from the covering indexes alone.
    sqlx::query("VACUUM (ANALYZE)").execute(&mut *conn).await?;
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM run_steps), (SELECT count(*) FROM events)",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(json!({"runs": counts.0, "steps": counts.1, "events": counts.2, "seconds": started.elapsed().as_secs_f64()}))
}

/// Runs `from..from + n`: statuses 90 % succeeded, 5 % failed, 3 % errored, 1 % timed
/// out, 1 % cancelled; 85 % module runs, 15 % workflow runs (three steps); 10 % from a
/// schedule; 1 % retries (of a failed run, so that some failures are flaky by their
/// retry); device and module independent of the status; ended evenly over the last 90
/// days.
async fn seed_chunk(conn: &mut sqlx::PgConnection, from: i64, n: i64, total: i64, events: i64) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS seed_devices AS SELECT row_number() OVER (ORDER BY serial) - 1 AS k, id FROM devices",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS seed_schedules AS SELECT row_number() OVER (ORDER BY name) - 1 AS k, id FROM schedules",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO runs (id, kind, target, definition, params, selector, device_id, status, attempt, max_attempts,
                           priority, timeout_s, trigger, schedule_id, retry_of, queued_at, started_at, finished_at,
                           created_at, updated_at, waiting_since, idempotency_key, idempotency_scope)
         SELECT md5('run' || i)::uuid,
                CASE WHEN i % 20 < 3 THEN 'workflow' ELSE 'module' END::run_kind,
                m.module,
                CASE WHEN i % 20 < 3
                     THEN jsonb_build_object('workflow_id', md5('wf' || (i % 5))::uuid, 'name', 'wf-' || (i % 5), 'version', 1,
                              'steps', jsonb_build_array(jsonb_build_object('module', 'ping', 'params', '{}'),
                                                         jsonb_build_object('module', m.module, 'params', '{}'),
                                                         jsonb_build_object('module', 'sleep', 'params', '{\"ms\": 1}')))
                     ELSE jsonb_build_object('module', m.module, 'params', '{}', 'timeout_s', 60) END,
                '{}', jsonb_build_object('pool', 'pool-' || (h.dk % 10)), d.id,
                (CASE WHEN i % 100 < 90 THEN 'succeeded' WHEN i % 100 < 95 THEN 'failed' WHEN i % 100 < 98 THEN 'errored'
                      WHEN i % 100 < 99 THEN 'timed_out' ELSE 'cancelled' END)::run_status,
                1, 3, 5, 3600,
                (CASE WHEN i % 10 = 0 THEN 'schedule' WHEN i % 100 = 7 THEN 'retry' ELSE 'api' END)::run_trigger,
                CASE WHEN i % 10 = 0 THEN s.id END,
                CASE WHEN i % 100 = 7 AND i >= 17 THEN md5('run' || (i - 17))::uuid END,
                t.fin - make_interval(secs => 2 + i % 60) - make_interval(secs => (i % 5)::float8 / 10),
                t.fin - make_interval(secs => 2 + i % 60), t.fin,
                t.fin - make_interval(secs => 3 + i % 60), t.fin, t.fin - make_interval(secs => 3 + i % 60),
                CASE WHEN i % 50 = 0 THEN 'ci-' || i END, CASE WHEN i % 50 = 0 THEN 'bench' END
         FROM generate_series($1::int8, $1 + $2 - 1) i
         -- Ended in order over the last 90 days, as a real history is appended.
         CROSS JOIN LATERAL (SELECT now() - make_interval(secs => ($3 - i) * 7776000.0 / $3) AS fin) t
         -- Device and module drawn apart from the status (a hash of the run's number), so
         -- that a module fails and passes on the same device, as flaky detection needs.
         CROSS JOIN LATERAL (SELECT abs(hashint8(i)) % 200 AS dk, abs(hashint8(-i)) % 10 AS mk) h
         CROSS JOIN LATERAL (SELECT (ARRAY['ping', 'airplane_mode', 'sms_send', 'call_dial', 'data_session', 'wifi_toggle',
                                            'device_info', 'signal_strength', 'reboot', 'sleep'])[1 + h.mk] AS module) m
         JOIN seed_devices d ON d.k = h.dk
         JOIN seed_schedules s ON s.k = i % 20",
    )
    .bind(from)
    .bind(n)
    .bind(total)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO run_steps (run_id, idx, module, params, status, attempt, started_at, finished_at,
                                run_finished_at, device_id, run_kind, schedule_id)
         SELECT r.id, x.idx, CASE WHEN r.kind = 'workflow' THEN r.definition -> 'steps' -> x.idx ->> 'module' ELSE r.target END,
                '{}',
                (CASE r.status WHEN 'succeeded' THEN 'passed' WHEN 'failed' THEN 'failed' WHEN 'errored' THEN 'errored'
                      WHEN 'timed_out' THEN 'timed_out' ELSE 'cancelled' END)::step_status,
                1, r.started_at, r.finished_at, r.finished_at, r.device_id, r.kind, r.schedule_id
         FROM runs r CROSS JOIN LATERAL generate_series(0, CASE WHEN r.kind = 'workflow' THEN 2 ELSE 0 END) x(idx)
         WHERE r.id IN (SELECT md5('run' || i)::uuid FROM generate_series($1::int8, $1 + $2 - 1) i)",
    )
    .bind(from)
    .bind(n)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO events (type, at, run_id, device_id, schedule_id, data)
         SELECT CASE WHEN e = 0 THEN 'run.queued' WHEN e = 1 THEN 'run.started' WHEN e = $3 - 1 THEN 'run.finished' ELSE 'run.step' END,
                r.started_at + make_interval(secs => e::float8 / 10), r.id, r.device_id, r.schedule_id,
                jsonb_build_object('attempt', 1, 'status', r.status)
         FROM runs r CROSS JOIN generate_series(0, $3 - 1) e
         WHERE r.id IN (SELECT md5('run' || i)::uuid FROM generate_series($1::int8, $1 + $2 - 1) i)",
    )
    .bind(from)
    .bind(n)
    .bind(events)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Each query once, then `samples` times: the first call's time, and p50 and p95 of
/// the rest (ms).
async fn measure(pool: &PgPool, cfg: &HistoryConfig) -> anyhow::Result<Value> {
    let device: DeviceId = sqlx::query_scalar("SELECT id FROM devices ORDER BY serial LIMIT 1").fetch_one(pool).await?;
    let schedule = sqlx::query_scalar("SELECT id FROM schedules ORDER BY name LIMIT 1").fetch_one(pool).await?;
    let run_prefix: String = sqlx::query_scalar("SELECT left(id::text, 6) FROM runs LIMIT 1").fetch_one(pool).await?;
    let window = |w: &str| HistoryFilter { window: w.parse::<Window>().unwrap_or_default(), ..Default::default() };
    let pooled = |w: &str| HistoryFilter { pool: Some("pool-3".into()), ..window(w) };
    let labelled = HistoryFilter { label: Some("volte".into()), ..window("24h") };
    let scheduled = HistoryFilter { schedule_id: Some(schedule), ..window("7d") };
    let mut out = Vec::new();
    macro_rules! time {
        ($name:expr, $call:expr) => {{
            // The first call apart: it pays for what the others find cached (pages
            // read from disk, PL/pgSQL compiled once per connection).
            let mut ms = Vec::with_capacity(cfg.samples + 1);
            let mut failed = None;
            for _ in 0..=cfg.samples {
                let t = Instant::now();
                if let Err(e) = $call.await {
                    // The API's statement timeout: reported, not fatal to the bench.
                    failed = Some(e.to_string());
                    break;
                }
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            out.push(match failed {
                Some(e) => json!({"query": $name, "error": e}),
                None => {
                    let first = ms.remove(0);
                    ms.sort_by(f64::total_cmp);
                    json!({"query": $name, "first_ms": first, "p50_ms": percentile(&ms, 0.5),
                           "p95_ms": percentile(&ms, 0.95)})
                }
            });
        }};
    }
    // The per-module figures before the day rollup exists (every step counted live,
    // as before migration 0015), then the rollup as the scheduler makes it, then every
    // query as the API runs it.
    time!("dashboard modules, 7d, counted live", dashboard::modules(pool, &window("7d")));
    let rolled = roll_up(pool).await?;
    time!("dashboard summary, 24h", dashboard::summary(pool, &window("24h")));
    time!("dashboard summary, 7d", dashboard::summary(pool, &window("7d")));
    time!("dashboard summary, 24h, pool", dashboard::summary(pool, &pooled("24h")));
    time!("dashboard summary, 24h, label", dashboard::summary(pool, &labelled));
    time!("dashboard summary, 7d, schedule", dashboard::summary(pool, &scheduled));
    time!("dashboard devices, 24h", dashboard::devices(pool, &window("24h")));
    time!("dashboard devices, 7d", dashboard::devices(pool, &window("7d")));
    time!("dashboard modules, 24h", dashboard::modules(pool, &window("24h")));
    time!("dashboard modules, 7d", dashboard::modules(pool, &window("7d")));
    time!("dashboard modules, 7d, pool", dashboard::modules(pool, &pooled("7d")));
    time!("dashboard modules, 30d", dashboard::modules(pool, &window("30d")));
    let flaky = |f: HistoryFilter, limit: i64, after| async move { dashboard::flaky(pool, &f, limit, after).await };
    time!("dashboard flaky, 24h", flaky(window("24h"), 50, None));
    time!("dashboard flaky, 7d", flaky(window("7d"), 50, None));
    time!("dashboard flaky, 7d, limit 500", flaky(window("7d"), 500, None));
    // A page deep in the window: every failure before the cursor is decided again.
    let deep = dashboard::FlakyCursor {
        failed_at: chrono::Utc::now() - chrono::Duration::days(6),
        run_id: RunId(uuid::Uuid::nil()),
        step: 0,
    };
    time!("dashboard flaky, 7d, a page 6 days back", flaky(window("7d"), 50, Some(deep)));
    time!("dashboard activity, 24h", dashboard::recent(pool, &window("24h"), 50));
    time!("dashboard activity, 24h, pool", dashboard::recent(pool, &pooled("24h"), 50));
    time!("search: a device", search::search(pool, "dev-012", 20));
    time!("search: a name fragment", search::search(pool, "nightly", 20));
    time!("search: a run id prefix", search::search(pool, &run_prefix, 20));
    time!("search: an idempotency key", search::search(pool, "ci-500", 20));
    let list = |f: runs::RunFilter| async move { runs::list(pool, &f, 50, None).await };
    time!("runs list, newest", list(runs::RunFilter::default()));
    time!("runs list, status failed", list(runs::RunFilter { status: Some(RunStatus::Failed), ..Default::default() }));
    time!("runs list, one device", list(runs::RunFilter { device_id: Some(device), ..Default::default() }));
    time!("runs list, one schedule", list(runs::RunFilter { schedule_id: Some(schedule), ..Default::default() }));
    let week_ago = chrono::Utc::now() - chrono::Duration::days(7);
    time!(
        "runs list, a day a week ago",
        list(runs::RunFilter {
            since: Some(week_ago),
            until: Some(week_ago + chrono::Duration::days(1)),
            ..Default::default()
        })
    );
    Ok(json!({"rollup": rolled, "timings": out}))
}

/// Rolls up every ended day of the seed (`step_days`), as the scheduler does, and
/// reports what a day costs.
async fn roll_up(pool: &PgPool) -> anyhow::Result<Value> {
    let started = Instant::now();
    let mut ms = Vec::new();
    loop {
        let t = Instant::now();
        if rollup::roll_next_day(pool).await?.is_none() {
            break;
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM step_days").fetch_one(pool).await?;
    Ok(json!({"days": ms.len(), "rows": rows, "seconds": started.elapsed().as_secs_f64(),
              "day_p50_ms": percentile(&ms, 0.5), "day_max_ms": ms.last().copied().unwrap_or(0.0)}))
}

fn print(report: &Value) {
    let s = &report["seed"];
    println!(
        "switchboard bench history: {} runs, {} steps, {} events (seeded in {:.0} s)",
        s["runs"],
        s["steps"],
        s["events"],
        s["seconds"].as_f64().unwrap_or(0.0)
    );
    let r = &report["queries"]["rollup"];
    println!(
        "  day rollup: {} days into {} rows in {:.1} s (a day: p50 {:.1} ms, max {:.1} ms)",
        r["days"],
        r["rows"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["day_p50_ms"].as_f64().unwrap_or(f64::NAN),
        r["day_max_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  {:<42} {:>9} {:>9} {:>9}", "query", "first ms", "p50 ms", "p95 ms");
    for q in report["queries"]["timings"].as_array().into_iter().flatten() {
        if let Some(e) = q["error"].as_str() {
            println!("  {:<42} failed: {e}", q["query"].as_str().unwrap_or(""));
            continue;
        }
        println!(
            "  {:<42} {:>9.2} {:>9.2} {:>9.2}",
            q["query"].as_str().unwrap_or(""),
            q["first_ms"].as_f64().unwrap_or(f64::NAN),
            q["p50_ms"].as_f64().unwrap_or(f64::NAN),
            q["p95_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
