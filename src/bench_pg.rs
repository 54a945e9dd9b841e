//! What Postgres itself does for the bench: a same-run baseline of raw transactions,
//! the CPU its processes burn, and the statements it executes (issue 13's measures).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sqlx::PgPool;

/// Statements the bench itself sends while it waits for the queue to drain
/// (`wait_idle`'s polls): subtracted from the statements counted per run.
pub(crate) static OWN_STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// The same-run Postgres baseline, as the harness takes it: `connections`
/// sessions, each committing `INSERT … RETURNING id; UPDATE … WHERE id` transactions
/// as fast as it can for `secs`. Transactions per second.
pub(crate) async fn baseline_txn_per_s(url: &str, connections: u32, secs: f64) -> anyhow::Result<f64> {
    let pool = switchboard_core::db::connect(url, connections).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bench_baseline (id bigserial PRIMARY KEY, n int NOT NULL, data jsonb NOT NULL,
                                                    at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let sessions = (0..connections).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                let mut tx = pool.begin().await?;
                let id: i64 = sqlx::query_scalar("INSERT INTO bench_baseline (n, data) VALUES (0, $1) RETURNING id")
                    .bind(json!({"kind": "module", "target": "sleep"}))
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query("UPDATE bench_baseline SET n = n + 1, at = now() WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                done += 1;
            }
            anyhow::Ok(done)
        })
    });
    let mut total = 0;
    for s in futures::future::join_all(sessions).await {
        total += s??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    sqlx::raw_sql("DROP TABLE bench_baseline").execute(&pool).await?;
    pool.close().await;
    Ok(rate)
}

/// CPU time (ns) used so far by every process of this machine named `postgres`
/// (backends, WAL writer, checkpointer...), from `/proc/*/schedstat`; `None` when
/// there is none (Postgres elsewhere). Sessions that end between two readings take
/// their time with them: the bench's sessions are pooled and outlive a round.
pub(crate) fn postgres_cpu_ns() -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_pg = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres");
        if !is_pg {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()));
        if let Some(ns) = ns {
            *total.get_or_insert(0) += ns;
        }
    }
    total
}

/// Statements executed in the bench's database so far, from `pg_stat_statements`
/// (`None` when the server does not load it): all of them, and those other than
/// BEGIN/COMMIT/ROLLBACK.
pub(crate) async fn statements(pool: &PgPool) -> Option<(f64, f64)> {
    let _ = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(pool).await;
    sqlx::query_as::<_, (f64, f64)>(
        "SELECT COALESCE(sum(calls), 0)::float8,
                COALESCE(sum(calls) FILTER (WHERE upper(query) NOT IN ('BEGIN', 'COMMIT', 'ROLLBACK')), 0)::float8
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .ok()
}

/// Postgres' work over a phase of the bench, to divide by the runs it carried.
pub(crate) struct PgWork {
    cpu_ns: Option<u64>,
    statements: Option<(f64, f64)>,
    own: u64,
}

impl PgWork {
    /// Readings at the start of a phase.
    pub(crate) async fn start(pool: &PgPool) -> PgWork {
        let statements = statements(pool).await;
        PgWork { cpu_ns: postgres_cpu_ns(), statements, own: OWN_STATEMENTS.load(Ordering::Relaxed) }
    }

    /// Per run, since `start`: Postgres CPU (ms) and statements (all; without
    /// transaction control), the bench's own polls and its readings left out.
    pub(crate) async fn per_run(&self, pool: &PgPool, runs: usize) -> Value {
        let cpu = match (self.cpu_ns, postgres_cpu_ns()) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / 1e6 / runs as f64),
            _ => None,
        };
        let own = (OWN_STATEMENTS.load(Ordering::Relaxed) - self.own) as f64 + 2.0;
        let st = match (self.statements, statements(pool).await) {
            (Some(a), Some(b)) => Some(((b.0 - a.0 - own) / runs as f64, (b.1 - a.1 - own) / runs as f64)),
            _ => None,
        };
        json!({"postgres_cpu_ms": cpu, "statements": st.map(|s| s.0), "statements_without_begin_commit": st.map(|s| s.1)})
    }
}
