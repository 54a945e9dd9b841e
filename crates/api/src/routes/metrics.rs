//! `GET /metrics`: Prometheus text, written from figures core reads in Postgres (the
//! record every process shares, so any API replica reports the whole deployment).
//! Written by hand for now: issue 11 moves it to the `metrics` crate's exporter.

use std::fmt::Write;

use axum::{extract::State, http::header, response::IntoResponse};
use switchboard_core::repo::stats;

use crate::{AppState, error::ApiResult};

/// Upper bounds of the fire-lag histogram (seconds).
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The metrics, in Prometheus text format.
pub async fn prometheus(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let pool = &state.engine.pool;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP switchboard_runs Runs by kind and status.\n# TYPE switchboard_runs gauge");
    for r in stats::runs_by_status(pool).await? {
        let _ = writeln!(out, "switchboard_runs{{kind=\"{}\",status=\"{}\"}} {}", r.kind, r.status, r.n);
    }
    let (devices, open) = stats::devices_by_status(pool).await?;
    let _ = writeln!(out, "# HELP switchboard_devices Devices by status.\n# TYPE switchboard_devices gauge");
    for (status, n) in devices {
        let _ = writeln!(out, "switchboard_devices{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_breakers_open Devices whose breaker is open or half-open.\n# TYPE switchboard_breakers_open gauge\nswitchboard_breakers_open {open}"
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_schedule_ticks_total Scheduler decisions per schedule.\n# TYPE switchboard_schedule_ticks_total counter"
    );
    for s in stats::schedule_ticks(pool).await? {
        let name = s.name.replace('\\', "\\\\").replace('"', "\\\"");
        for (decision, n) in [("fired", s.fired), ("skipped", s.skipped), ("missed", s.missed)] {
            let _ =
                writeln!(out, "switchboard_schedule_ticks_total{{schedule=\"{name}\",decision=\"{decision}\"}} {n}");
        }
    }
    let (buckets, n, total) = stats::fire_lag(pool, LAG_BUCKETS).await?;
    let _ = writeln!(
        out,
        "# HELP switchboard_schedule_fire_lag_seconds Time from a schedule tick to its run being enqueued.\n# TYPE switchboard_schedule_fire_lag_seconds histogram"
    );
    for (b, c) in LAG_BUCKETS.iter().zip(buckets) {
        let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"+Inf\"}} {n}");
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_sum {total}");
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_count {n}");
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
