//! `GET /metrics`: Prometheus text, written from figures core reads in Postgres (the
//! record every process shares, so any API replica reports the whole deployment).
//!
//! A scrape costs no history scan: gauges read the open runs (partial indexes), the
//! devices and the schedules; the counters of finished runs and the fire-lag
//! histogram are kept by this process and moved on at each scrape by the window
//! since the last one (events along the feed's `(tx, id)` index, scheduled runs by
//! their `enqueued_at` index). They count from this process's first scrape, as Prometheus counters do
//! from a process start (`rate()` and `increase()` handle the reset).
//! Written by hand for now: issue 11 moves it to the `metrics` crate's exporter.

use std::{collections::BTreeMap, fmt::Write};

use axum::{
    extract::State,
    http::{HeaderMap, header},
    response::IntoResponse,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use switchboard_core::{
    CoreResult,
    repo::{
        feed::{self, Position},
        stats,
    },
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    middleware::bearer_matches,
};

/// Upper bounds of the fire-lag histogram (seconds).
const LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The counters this process keeps, and how far they have read.
#[derive(Debug, Default)]
pub struct Tally {
    /// Where the windows end; `None` before the first scrape.
    read_to: Option<(Position, DateTime<Utc>)>,
    finished: BTreeMap<(String, String), i64>,
    lag_buckets: Vec<i64>,
    lag_n: i64,
    lag_sum: f64,
}

impl Tally {
    /// Moves the counters on by what settled since the last scrape: finished runs up
    /// to the feed's line, fire lags up to five seconds ago. Both windows are read
    /// before either is counted, so a failed read counts nothing twice.
    async fn advance(&mut self, pool: &PgPool) -> CoreResult<()> {
        let (event_to, time_to) = (feed::head(pool).await?, stats::settled_now(pool).await?);
        let Some((event_from, time_from)) = self.read_to else {
            self.read_to = Some((event_to, time_to));
            self.lag_buckets = vec![0; LAG_BUCKETS.len()];
            return Ok(());
        };
        let finished =
            if event_to > event_from { stats::finished_between(pool, event_from, event_to).await? } else { Vec::new() };
        let lags = if time_to > time_from {
            Some(stats::fire_lag_between(pool, LAG_BUCKETS, time_from, time_to).await?)
        } else {
            None
        };
        for (kind, status, n) in finished {
            *self.finished.entry((kind.to_string(), status)).or_default() += n;
        }
        if let Some((buckets, n, sum)) = lags {
            self.lag_buckets.iter_mut().zip(buckets).for_each(|(b, c)| *b += c);
            self.lag_n += n;
            self.lag_sum += sum;
        }
        self.read_to = Some((event_to.max(event_from), time_to.max(time_from)));
        Ok(())
    }
}

/// The metrics, in Prometheus text format. With `SWITCHBOARD_METRICS_TOKEN` set, the
/// scraper must present it as a bearer token.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations", security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "SWITCHBOARD_METRICS_TOKEN is set and was not presented", body = crate::error::ErrorBody),
        (status = 500, description = "A fault of ours", body = crate::error::ErrorBody),
        (status = 503, description = "Postgres unavailable", body = crate::error::ErrorBody),
    ))]
pub async fn prometheus(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<impl IntoResponse> {
    if state.config.metrics_token.as_ref().is_some_and(|t| !bearer_matches(&headers, t)) {
        return Err(ApiError::unauthorized("/metrics needs the metrics token (Authorization: Bearer <token>)"));
    }
    let pool = &state.engine.pool;
    let mut out = String::new();
    gauges(pool, &mut out).await?;
    let mut tally = state.metrics.lock().await;
    tally.advance(pool).await?;
    counters(&tally, &mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

async fn gauges(pool: &PgPool, out: &mut String) -> CoreResult<()> {
    let _ = writeln!(out, "# HELP switchboard_runs_open Runs queued or running now, by kind and status.");
    let _ = writeln!(out, "# TYPE switchboard_runs_open gauge");
    for r in stats::open_runs_by_status(pool).await? {
        let _ = writeln!(out, "switchboard_runs_open{{kind=\"{}\",status=\"{}\"}} {}", r.kind, r.status, r.n);
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
        let name = s.name.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        for (decision, n) in [("fired", s.fired), ("skipped", s.skipped), ("missed", s.missed)] {
            let _ =
                writeln!(out, "switchboard_schedule_ticks_total{{schedule=\"{name}\",decision=\"{decision}\"}} {n}");
        }
    }
    Ok(())
}

fn counters(t: &Tally, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP switchboard_runs_finished_total Runs finished, by kind and end status (since this process's first scrape).\n# TYPE switchboard_runs_finished_total counter"
    );
    for ((kind, status), n) in &t.finished {
        let _ = writeln!(out, "switchboard_runs_finished_total{{kind=\"{kind}\",status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_schedule_fire_lag_seconds Time from a schedule tick to its run being enqueued (since this process's first scrape).\n# TYPE switchboard_schedule_fire_lag_seconds histogram"
    );
    for (b, c) in LAG_BUCKETS.iter().zip(&t.lag_buckets) {
        let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_bucket{{le=\"+Inf\"}} {}", t.lag_n);
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_sum {}", t.lag_sum);
    let _ = writeln!(out, "switchboard_schedule_fire_lag_seconds_count {}", t.lag_n);
}
