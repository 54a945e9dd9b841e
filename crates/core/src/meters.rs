//! Metrics, through the `metrics` crate: every role records what it does itself
//! (counters and histograms, summed across replicas by Prometheus), and renders them
//! with `metrics-exporter-prometheus` on its own `/metrics`. The figures only Postgres
//! knows (queue depth, devices, breakers) are gauges refreshed by one query on an
//! interval (`refresh`), never computed per scrape from the history.
//!
//! Counters move when the writer that makes the change runs its statement, in the
//! transaction that commits it; a transaction that then fails to commit (rare) has
//! been counted once more than the record shows.
//!
//! The names are written once, here, and listed in `NAMES` for the test and the docs.

use std::{sync::OnceLock, time::Duration};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use sqlx::PgPool;

use crate::{
    CoreResult,
    ids::{DeviceId, ScheduleId},
    model::{RunKind, RunStatus},
    repo::stats::{self, Gauge},
};

/// Runs that started an attempt, by kind.
pub const RUNS_STARTED: &str = "switchboard_runs_started_total";
/// Runs that reached a terminal status, by kind and status.
pub const RUNS_FINISHED: &str = "switchboard_runs_finished_total";
/// From an attempt's start to the run's end (seconds), by kind and status.
pub const RUN_DURATION: &str = "switchboard_run_duration_seconds";
/// From a run's creation to its first attempt's start (seconds), by kind.
pub const START_LATENCY: &str = "switchboard_run_start_latency_seconds";
/// Attempts that ended and put their run back in the queue, by reason.
pub const RUNS_REQUEUED: &str = "switchboard_runs_requeued_total";
/// Retries: attempts requeued for another try after an infrastructure error.
pub const RETRIES: &str = "switchboard_run_retries_total";
/// Runs the reconciler recovered, by action (`requeued`, `ended`, `redelivered`).
pub const RECOVERIES: &str = "switchboard_run_recoveries_total";
/// Leases found expired by the reconciler.
pub const LEASES_EXPIRED: &str = "switchboard_leases_expired_total";
/// Outcomes refused because their worker no longer held the run (fencing).
pub const FENCING_REFUSALS: &str = "switchboard_fencing_refusals_total";
/// Breaker transitions, by device and the state entered.
pub const BREAKER_TRANSITIONS: &str = "switchboard_breaker_transitions_total";
/// Scheduler decisions, by schedule and decision (`fired`, `skipped`, `missed`, …).
pub const SCHEDULE_TICKS: &str = "switchboard_schedule_ticks_total";
/// From a tick's time to its run being enqueued (seconds).
pub const FIRE_LAG: &str = "switchboard_schedule_fire_lag_seconds";
/// HTTP requests served, by method, route template and status.
pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";
/// HTTP request durations (seconds), by method and route template.
pub const HTTP_DURATION: &str = "switchboard_http_request_duration_seconds";
/// WebSocket feed clients connected to this process.
pub const WS_CLIENTS: &str = "switchboard_ws_clients";
/// Runs waiting to start, by pool (`*`: not bound to a pool).
pub const QUEUE_DEPTH: &str = "switchboard_queue_depth";
/// How long the oldest waiting run has waited (seconds), by pool.
pub const QUEUE_OLDEST_AGE: &str = "switchboard_queue_oldest_age_seconds";
/// Runs queued or running now, by kind and status.
pub const RUNS_OPEN: &str = "switchboard_runs_open";
/// Devices by status.
pub const DEVICES: &str = "switchboard_devices";
/// History deleted by retention, by what (`runs`, `steps`, `events`).
pub const HISTORY_PRUNED: &str = "switchboard_history_pruned_total";
/// Each device's breaker: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "switchboard_device_breaker_state";

/// Every metric name, for the docs and the test that checks them.
pub const NAMES: &[&str] = &[
    RUNS_STARTED,
    RUNS_FINISHED,
    RUN_DURATION,
    START_LATENCY,
    RUNS_REQUEUED,
    RETRIES,
    RECOVERIES,
    LEASES_EXPIRED,
    FENCING_REFUSALS,
    BREAKER_TRANSITIONS,
    SCHEDULE_TICKS,
    FIRE_LAG,
    HTTP_REQUESTS,
    HTTP_DURATION,
    WS_CLIENTS,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    RUNS_OPEN,
    DEVICES,
    BREAKER_STATE,
    HISTORY_PRUNED,
];

/// Buckets (seconds) for run durations: a sleep of milliseconds to a soak of an hour.
const RUN_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
/// Buckets (seconds) for latencies: enqueue to start, fire lag, HTTP.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs this process's recorder (once; later calls return the same handle).
/// `gauge_ttl`: a Postgres gauge not refreshed for this long (a deleted device's
/// breaker) leaves the output.
pub fn install(gauge_ttl: Duration) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE, Some(gauge_ttl))
                .set_buckets_for_metric(Matcher::Full(RUN_DURATION.into()), RUN_BUCKETS)
                .and_then(|b| b.set_buckets(LATENCY_BUCKETS));
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => handle,
                // Another recorder is installed (only in tests that embed two roles):
                // render a private one rather than fail the role.
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder was already installed; this one renders empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// The Prometheus text of this process's metrics.
pub fn render() -> String {
    HANDLE
        .get()
        .map(|h| {
            h.run_upkeep();
            h.render()
        })
        .unwrap_or_default()
}

/// Sets the gauges only Postgres knows, from one query (see `stats::gauges`).
pub async fn refresh(pool: &PgPool) -> CoreResult<()> {
    for g in stats::gauges(pool).await? {
        let Gauge { metric, a, b, value } = g;
        match metric.as_str() {
            "queue_depth" => gauge!(QUEUE_DEPTH, "pool" => a).set(value),
            "queue_oldest_age" => gauge!(QUEUE_OLDEST_AGE, "pool" => a).set(value),
            "runs_open" => gauge!(RUNS_OPEN, "kind" => a, "status" => b).set(value),
            "devices" => gauge!(DEVICES, "status" => a).set(value),
            "breaker_state" => gauge!(BREAKER_STATE, "device_id" => a, "device" => b).set(value),
            other => tracing::warn!(metric = other, "unknown gauge from stats::gauges"),
        }
    }
    Ok(())
}

/// An attempt started; `waited` is the enqueue→start latency of a first attempt.
pub fn run_started(kind: RunKind, waited: Option<Duration>) {
    counter!(RUNS_STARTED, "kind" => kind.to_string()).increment(1);
    if let Some(w) = waited {
        histogram!(START_LATENCY, "kind" => kind.to_string()).record(w.as_secs_f64());
    }
}

/// A run reached `status`; `ran` is its final attempt's time, if it started.
pub fn run_finished(kind: RunKind, status: RunStatus, ran: Option<Duration>) {
    counter!(RUNS_FINISHED, "kind" => kind.to_string(), "status" => status.to_string()).increment(1);
    if let Some(d) = ran {
        histogram!(RUN_DURATION, "kind" => kind.to_string(), "status" => status.to_string()).record(d.as_secs_f64());
    }
}

/// An attempt ended and its run went back to the queue for `reason`.
pub fn run_requeued(reason: &'static str) {
    counter!(RUNS_REQUEUED, "reason" => reason).increment(1);
    if reason == "retry" {
        counter!(RETRIES).increment(1);
    }
}

/// The reconciler recovered `n` runs by `action`.
pub fn recovered(action: &'static str, n: usize) {
    if n > 0 {
        counter!(RECOVERIES, "action" => action).increment(n as u64);
    }
}

/// The reconciler found `n` leases expired.
pub fn leases_expired(n: usize) {
    if n > 0 {
        counter!(LEASES_EXPIRED).increment(n as u64);
    }
}

/// A late outcome was refused (fencing).
pub fn fencing_refused() {
    counter!(FENCING_REFUSALS).increment(1);
}

/// A device's breaker entered `state` (`open`, `half_open`, `closed`).
pub fn breaker_transition(device: DeviceId, state: &'static str) {
    counter!(BREAKER_TRANSITIONS, "device_id" => device.to_string(), "state" => state).increment(1);
}

/// The scheduler decided `decision` (`fired`, `skipped`, `missed`, `buffered`,
/// `error`) for `n` ticks of a schedule.
pub fn schedule_tick(id: ScheduleId, name: &str, decision: &'static str, n: u64) {
    if n > 0 {
        let labels = [("schedule_id", id.to_string()), ("schedule", name.to_string()), ("decision", decision.into())];
        counter!(SCHEDULE_TICKS, &labels).increment(n);
    }
}

/// A tick fired `lag` after its time.
pub fn fire_lag(lag: Duration) {
    histogram!(FIRE_LAG).record(lag.as_secs_f64());
}

/// An HTTP request was answered.
pub fn http_request(method: &str, route: &str, status: u16, took: Duration) {
    let (method, route) = (method.to_string(), route.to_string());
    counter!(HTTP_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    histogram!(HTTP_DURATION, "method" => method, "route" => route).record(took.as_secs_f64());
}

/// Retention deleted `p`.
pub fn history_pruned(p: crate::repo::retention::Pruned) {
    for (what, n) in [("runs", p.runs), ("steps", p.steps), ("events", p.events)] {
        if n > 0 {
            counter!(HISTORY_PRUNED, "what" => what).increment(n as u64);
        }
    }
}

/// This process serves `n` WebSocket clients.
pub fn ws_clients(n: usize) {
    gauge!(WS_CLIENTS).set(n as f64);
}
