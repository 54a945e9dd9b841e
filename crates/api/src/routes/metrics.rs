//! `GET /metrics`: Prometheus text. Figures come from Postgres, the record every process
//! shares, so any API replica reports the whole deployment.

use axum::{extract::State, http::header, response::IntoResponse};
use sqlx::Row;
use std::fmt::Write;

use crate::{AppState, error::ApiResult};

/// Upper bounds of the fire-lag histogram (seconds).
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

pub async fn prometheus(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let pool = &state.pool;
    let mut out = String::new();
    let e = switchboard_core::CoreError::from;

    let _ = writeln!(out, "# HELP switchboard_runs Runs by kind and status.\n# TYPE switchboard_runs gauge");
    for r in sqlx::query("SELECT kind, status, count(*) AS n FROM runs GROUP BY kind, status ORDER BY 1, 2").fetch_all(pool).await.map_err(e)? {
        let (kind, status, n): (String, String, i64) = (r.get("kind"), r.get("status"), r.get("n"));
        let _ = writeln!(out, "switchboard_runs{{kind=\"{kind}\",status=\"{status}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP switchboard_devices Devices by status.\n# TYPE switchboard_devices gauge");
    for r in sqlx::query("SELECT status, count(*) AS n FROM devices GROUP BY status ORDER BY 1").fetch_all(pool).await.map_err(e)? {
        let (status, n): (String, i64) = (r.get("status"), r.get("n"));
        let _ = writeln!(out, "switchboard_devices{{status=\"{status}\"}} {n}");
    }
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE breaker_state <> 'closed'").fetch_one(pool).await.map_err(e)?;
    let _ = writeln!(out, "# HELP switchboard_breakers_open Devices whose breaker is open or half-open.\n# TYPE switchboard_breakers_open gauge\nswitchboard_breakers_open {open}");

    let _ = writeln!(out, "# HELP switchboard_schedule_ticks_total Scheduler decisions per schedule.\n# TYPE switchboard_schedule_ticks_total counter");
    for r in sqlx::query("SELECT name, fired_count, skipped_count, missed_count FROM schedules ORDER BY name").fetch_all(pool).await.map_err(e)? {
        let name: String = r.get("name");
        let name = name.replace('\\', "\\\\").replace('"', "\\\"");
        for (decision, col) in [("fired", "fired_count"), ("skipped", "skipped_count"), ("missed", "missed_count")] {
            let n: i64 = r.get(col);
            let _ = writeln!(out, "switchboard_schedule_ticks_total{{schedule=\"{name}\",decision=\"{decision}\"}} {n}");
        }
    }

    // Fire lag: from the tick's scheduled time to the run's push to the queue, bucketed
    // in Postgres (no rows leave the database).
    let row = sqlx::query(
        "SELECT count(*) AS n, COALESCE(sum(lag), 0)::float8 AS total,
                array[count(*) FILTER (WHERE lag <= 0.005), count(*) FILTER (WHERE lag <= 0.01),
                      count(*) FILTER (WHERE lag <= 0.025), count(*) FILTER (WHERE lag <= 0.05),
                      count(*) FILTER (WHERE lag <= 0.1), count(*) FILTER (WHERE lag <= 0.25),
                      count(*) FILTER (WHERE lag <= 0.5), count(*) FILTER (WHERE lag <= 1),
                      count(*) FILTER (WHERE lag <= 2.5), count(*) FILTER (WHERE lag <= 5),
                      count(*) FILTER (WHERE lag <= 10), count(*) FILTER (WHERE lag <= 30),
                      count(*) FILTER (WHERE lag <= 60)] AS buckets
         FROM (SELECT extract(epoch FROM (enqueued_at - scheduled_for))::float8 AS lag FROM runs
               WHERE trigger = 'schedule' AND scheduled_for IS NOT NULL AND enqueued_at IS NOT NULL) l",
    )
    .fetch_one(pool)
    .await
    .map_err(e)?;
    let n: i64 = row.get("n");
    let total: f64 = row.get("total");
    let buckets: Vec<i64> = row.get("buckets");
    let _ = writeln!(out, "# HELP switchboard_schedule_fire_lag_seconds Time from a schedule tick to its run being enqueued.\n# TYPE switchboard_schedule_fire_lag_seconds histogram");
    for (b, c) in LAG_BUCKETS.iter().zip(buckets) {
        let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"+Inf\"}} {n}");
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_sum {total}");
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_count {n}");

    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
