//! The dashboard's figures, each computed by one SQL statement over the history views
//! (`v_run_history`, `v_step_history`, migration 0010), with the definitions of
//! `docs/dashboard.md`:
//!
//! - a window selects the runs that finished in it; queue figures are "now";
//! - success rate = succeeded ÷ (succeeded + failed + errored + timed_out), cancelled
//!   runs left out, `None` when there is nothing to divide;
//! - durations are the final attempt's, `started_at` to `finished_at`, continuous
//!   percentiles over runs that started and were not cancelled;
//! - pool, label and schedule filter every figure; campaign parents count only when
//!   asked for (`kind=campaign`), so a campaign is not counted with its children.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::{
    CoreError, CoreResult,
    events::Event,
    history::HistoryFilter,
    ids::{DeviceId, RunId, ScheduleId},
    model::{BreakerState, DeviceStatus, RunKind},
    pagination,
};

/// Ended runs by status.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RunCounts {
    /// Passed.
    pub succeeded: i64,
    /// A verdict failed.
    pub failed: i64,
    /// An infrastructure error ended it.
    pub errored: i64,
    /// It ran out of time.
    pub timed_out: i64,
    /// Cancelled (left out of the success rate).
    pub cancelled: i64,
}

/// The counts of a query row with a column per ended status.
macro_rules! run_counts {
    ($r:expr) => {
        RunCounts {
            succeeded: $r.succeeded,
            failed: $r.failed,
            errored: $r.errored,
            timed_out: $r.timed_out,
            cancelled: $r.cancelled,
        }
    };
}

impl RunCounts {
    /// succeeded ÷ (succeeded + failed + errored + timed_out); `None` with none of them.
    pub fn success_rate(&self) -> Option<f64> {
        let decided = self.succeeded + self.failed + self.errored + self.timed_out;
        (decided > 0).then(|| self.succeeded as f64 / decided as f64)
    }
}

/// Duration percentiles (ms).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Durations {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
}

/// The queue now.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QueueNow {
    /// Runs waiting for a device (queued, not held by a campaign, not campaign parents).
    pub depth: i64,
    /// How long the oldest of them has waited (seconds); `None` when none waits.
    pub oldest_age_s: Option<f64>,
}

/// `GET /dashboard/summary`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// The window, as given (`24h`).
    pub window: String,
    /// Runs that ended in the window, by status.
    pub runs: RunCounts,
    /// Their success rate (0–1).
    pub success_rate: Option<f64>,
    /// Their durations.
    pub duration_ms: Durations,
    /// The queue now.
    pub queue: QueueNow,
    /// Devices by status now.
    pub devices: BTreeMap<DeviceStatus, i64>,
    /// Devices whose breaker is open or half-open now.
    pub open_breakers: i64,
}

/// The summary of the runs `f` covers.
pub async fn summary(pool: &PgPool, f: &HistoryFilter) -> CoreResult<Summary> {
    let r = sqlx::query!(
        // One pass over the window's runs (read from `runs_finished_idx` alone when
        // no device filter needs the devices table), then the queue and the devices.
        r#"WITH h AS (
               SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                      count(*) FILTER (WHERE status = 'failed') AS failed,
                      count(*) FILTER (WHERE status = 'errored') AS errored,
                      count(*) FILTER (WHERE status = 'timed_out') AS timed_out,
                      count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)
                        FILTER (WHERE duration_ms IS NOT NULL AND status <> 'cancelled') AS p50,
                      percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)
                        FILTER (WHERE duration_ms IS NOT NULL AND status <> 'cancelled') AS p95
               FROM v_run_history
               WHERE finished_at >= now() - make_interval(secs => $1)
                 AND ($2::text IS NULL OR pool = $2) AND ($3::text IS NULL OR $3 = ANY (labels))
                 AND ($4::uuid IS NULL OR schedule_id = $4)
                 AND CASE WHEN $5::run_kind IS NULL THEN kind <> 'campaign' ELSE kind = $5 END),
             d AS MATERIALIZED (
               SELECT status, breaker_state FROM devices
               WHERE ($2::text IS NULL OR pool = $2) AND ($3::text IS NULL OR $3 = ANY (labels)))
           SELECT h.succeeded AS "succeeded!", h.failed AS "failed!", h.errored AS "errored!",
                  h.timed_out AS "timed_out!", h.cancelled AS "cancelled!", h.p50, h.p95,
                  q.depth AS "depth!", q.oldest_s,
                  (SELECT COALESCE(jsonb_object_agg(status, n), '{}') FROM (SELECT status, count(*) AS n FROM d GROUP BY status) x)
                    AS "devices!",
                  (SELECT count(*) FROM d WHERE breaker_state <> 'closed') AS "open_breakers!"
           FROM h, (SELECT count(*) AS depth, extract(epoch FROM now() - min(waiting_since))::float8 AS oldest_s
                    FROM runs
                    WHERE status = 'queued' AND NOT held AND kind <> 'campaign'
                      AND ($2::text IS NULL OR selector ->> 'pool' = $2)
                      AND ($3::text IS NULL OR selector -> 'labels' ? $3)
                      AND ($4::uuid IS NULL OR schedule_id = $4)) q"#,
        f.window.seconds(),
        f.pool,
        f.label,
        f.schedule_id as Option<ScheduleId>,
        f.kind as Option<RunKind>,
    )
    .fetch_one(pool)
    .await?;
    let runs = run_counts!(r);
    let devices = serde_json::from_value(r.devices)
        .map_err(|e| CoreError::Unreadable(format!("device counts from Postgres: {e}")))?;
    Ok(Summary {
        window: f.window.to_string(),
        success_rate: runs.success_rate(),
        runs,
        duration_ms: Durations { p50: r.p50, p95: r.p95 },
        queue: QueueNow { depth: r.depth, oldest_age_s: r.oldest_s.map(|s| s.max(0.0)) },
        devices,
        open_breakers: r.open_breakers,
    })
}

/// One device's row of `GET /dashboard/devices`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceFigures {
    /// The device.
    pub device_id: DeviceId,
    /// Its serial.
    pub serial: String,
    /// Its name.
    pub name: String,
    /// Its pool.
    pub pool: String,
    /// Its status now.
    pub status: DeviceStatus,
    /// Its breaker now.
    pub breaker_state: BreakerState,
    /// Runs that ended on it in the window, by status.
    pub runs: RunCounts,
    /// Their success rate (0–1).
    pub success_rate: Option<f64>,
    /// Their mean duration (ms), cancelled runs left out.
    pub mean_duration_ms: Option<f64>,
    /// Attempts on it that ended in an infrastructure error in the window: runs ended
    /// `errored` plus attempts requeued for a retry.
    pub infrastructure_errors: i64,
    /// The time of the latest event about it (a run on it, a status or breaker change).
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Per device of the filter's pool and label: its figures over the window.
pub async fn devices(pool: &PgPool, f: &HistoryFilter) -> CoreResult<Vec<DeviceFigures>> {
    let rows = sqlx::query!(
        // The window's runs are counted per device first (from `runs_finished_idx`
        // alone), then joined to the devices: joining ~78,000 runs of a 7-day window
        // to their devices and grouping again took twice as long (58 -> 27 ms).
        r#"WITH h AS (
               SELECT device_id,
                      count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                      count(*) FILTER (WHERE status = 'failed') AS failed,
                      count(*) FILTER (WHERE status = 'errored') AS errored,
                      count(*) FILTER (WHERE status = 'timed_out') AS timed_out,
                      count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                      avg(duration_ms) FILTER (WHERE status <> 'cancelled') AS mean_ms
               FROM v_run_history
               WHERE finished_at >= now() - make_interval(secs => $1) AND device_id IS NOT NULL
                 AND ($4::uuid IS NULL OR schedule_id = $4)
                 AND CASE WHEN $5::run_kind IS NULL THEN kind <> 'campaign' ELSE kind = $5 END
               GROUP BY device_id)
           SELECT d.id AS "id!: DeviceId", d.serial AS "serial!", d.name AS "name!", d.pool AS "pool!",
                  d.status AS "status!: DeviceStatus", d.breaker_state AS "breaker_state!: BreakerState",
                  COALESCE(h.succeeded, 0) AS "succeeded!", COALESCE(h.failed, 0) AS "failed!",
                  COALESCE(h.errored, 0) AS "errored!", COALESCE(h.timed_out, 0) AS "timed_out!",
                  COALESCE(h.cancelled, 0) AS "cancelled!", h.mean_ms,
                  (SELECT count(*) FROM events e
                   WHERE e.device_id = d.id AND e.type = 'run.requeued' AND e.data ->> 'reason' = 'retry'
                     AND e.at >= now() - make_interval(secs => $1)
                     AND ($4::uuid IS NULL OR e.run_id IN (SELECT id FROM runs WHERE schedule_id = $4))) AS "retried!",
                  (SELECT e.at FROM events e WHERE e.device_id = d.id ORDER BY e.id DESC LIMIT 1) AS last_seen_at
           FROM devices d LEFT JOIN h ON h.device_id = d.id
           WHERE ($2::text IS NULL OR d.pool = $2) AND ($3::text IS NULL OR $3 = ANY (d.labels))
           ORDER BY d.serial"#,
        f.window.seconds(),
        f.pool,
        f.label,
        f.schedule_id as Option<ScheduleId>,
        f.kind as Option<RunKind>,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let runs = run_counts!(r);
            DeviceFigures {
                device_id: r.id,
                serial: r.serial,
                name: r.name,
                pool: r.pool,
                status: r.status,
                breaker_state: r.breaker_state,
                success_rate: runs.success_rate(),
                infrastructure_errors: runs.errored + r.retried,
                runs,
                mean_duration_ms: r.mean_ms,
                last_seen_at: r.last_seen_at,
            }
        })
        .collect())
}

/// One module's row of `GET /dashboard/modules`: its steps (a module run is one step)
/// that ended in the window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModuleFigures {
    /// The module.
    pub module: String,
    /// Its steps that reached an outcome (passed, failed, errored, timed out).
    pub runs: i64,
    /// Passed.
    pub passed: i64,
    /// Failed verdicts.
    pub failed: i64,
    /// Infrastructure errors.
    pub errored: i64,
    /// Timed out.
    pub timed_out: i64,
    /// passed ÷ runs (0–1).
    pub pass_rate: Option<f64>,
    /// Its failed verdicts that were flaky (`flaky`).
    pub flaky: i64,
}

/// Per module: its steps over the window, and how many of its failures were flaky.
pub async fn modules(pool: &PgPool, f: &HistoryFilter) -> CoreResult<Vec<ModuleFigures>> {
    let rows = sqlx::query!(
        // The one definition lives in the database (`module_figures`, migration 0013),
        // planned per call with the window and filters it is given.
        r#"SELECT module AS "module!", passed AS "passed!", failed AS "failed!", errored AS "errored!",
                  timed_out AS "timed_out!", flaky AS "flaky!"
           FROM module_figures(now() - make_interval(secs => $1), 'infinity', $2, $3, $4, $5)"#,
        f.window.seconds(),
        f.pool,
        f.label,
        f.schedule_id as Option<ScheduleId>,
        f.kind as Option<RunKind>,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let runs = r.passed + r.failed + r.errored + r.timed_out;
            ModuleFigures {
                flaky: r.flaky,
                pass_rate: (runs > 0).then(|| r.passed as f64 / runs as f64),
                module: r.module,
                runs,
                passed: r.passed,
                failed: r.failed,
                errored: r.errored,
                timed_out: r.timed_out,
            }
        })
        .collect())
}

/// A failed verdict that was flaky, with the passing runs that make it so.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FlakyFailure {
    /// The run whose step failed.
    pub run_id: RunId,
    /// The step's index (0 for a module run).
    pub step: i32,
    /// The module.
    pub module: String,
    /// Its effective parameters (defaults filled in).
    pub params: Value,
    /// The device it failed on.
    pub device_id: Option<DeviceId>,
    /// That device's serial.
    pub device_serial: Option<String>,
    /// When the failing run ended.
    pub failed_at: DateTime<Utc>,
    /// Runs retried from it (its `retry_of` chain) whose same step passed.
    pub passed_on_retry: Vec<RunId>,
    /// Other runs in the window whose step of the same module and params passed on the
    /// same device.
    pub passed_on_same_device: Vec<RunId>,
}

/// Where a page of flaky failures ends: the last failure it listed. The next page
/// starts after it, in the order of the list (newest first, then by run and step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlakyCursor {
    /// When that failure's run ended.
    pub failed_at: DateTime<Utc>,
    /// Its run.
    pub run_id: RunId,
    /// Its step.
    pub step: i32,
}

impl FlakyCursor {
    /// The opaque form clients pass back.
    pub fn encode(&self) -> String {
        pagination::seal(&format!("flaky|{}|{}|{}", self.failed_at.timestamp_micros(), self.run_id.0, self.step))
    }

    /// Reads a cursor this route returned (422 otherwise).
    pub fn decode(s: &str) -> CoreResult<FlakyCursor> {
        let bad = pagination::bad_cursor;
        let raw = pagination::open(s)?;
        let mut parts = raw.strip_prefix("flaky|").ok_or_else(bad)?.split('|');
        let (Some(at), Some(run), Some(step), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        Ok(FlakyCursor {
            failed_at: at.parse().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?,
            run_id: RunId(uuid::Uuid::parse_str(run).map_err(|_| bad())?),
            step: step.parse().map_err(|_| bad())?,
        })
    }
}

/// One page of flaky failures.
#[derive(Debug, Clone)]
pub struct FlakyPage {
    /// Newest first.
    pub items: Vec<FlakyFailure>,
    /// Where the next page starts; `None` on the last one.
    pub next: Option<FlakyCursor>,
}

/// The flaky failed verdicts in the window, newest first: `limit` of them, after
/// `after` (the first page: `None`). A failed step is flaky when a retry of its run
/// (following `retry_of`, retries of retries included) passed the same step, or when
/// the same module with the same effective parameters passed on the same device within
/// the window.
pub async fn flaky(pool: &PgPool, f: &HistoryFilter, limit: i64, after: Option<FlakyCursor>) -> CoreResult<FlakyPage> {
    let rows = sqlx::query!(
        // The definition lives in the database (`flaky_failures`, migration 0014), so
        // Grafana's panel and this route count the same failures. One row more than
        // asked says whether a next page exists.
        r#"SELECT run_id AS "run_id!: RunId", idx AS "idx!", module AS "module!", params AS "params!",
                  device_id AS "device_id?: DeviceId", device_serial, failed_at AS "failed_at!",
                  passed_on_retry AS "on_retry!: Vec<RunId>", passed_on_same_device AS "on_device!: Vec<RunId>"
           FROM flaky_failures(now() - make_interval(secs => $1), 'infinity', $2, $3, $4, $5, $6::int8 + 1, $7, $8, $9)"#,
        f.window.seconds(),
        f.pool,
        f.label,
        f.schedule_id as Option<ScheduleId>,
        f.kind as Option<RunKind>,
        limit,
        after.map(|c| c.failed_at),
        after.map(|c| c.run_id) as Option<RunId>,
        after.map(|c| c.step),
    )
    .fetch_all(pool)
    .await?;
    let items: Vec<FlakyFailure> = rows
        .into_iter()
        .map(|r| FlakyFailure {
            run_id: r.run_id,
            step: r.idx,
            module: r.module,
            params: r.params,
            device_id: r.device_id,
            device_serial: r.device_serial,
            failed_at: r.failed_at,
            passed_on_retry: r.on_retry,
            passed_on_same_device: r.on_device,
        })
        .collect();
    let (items, next) =
        pagination::split(items, limit, |l| FlakyCursor { failed_at: l.failed_at, run_id: l.run_id, step: l.step });
    Ok(FlakyPage { items, next })
}

/// The latest events of every kind in the window, newest first, about the filter's
/// devices (pool, label) or schedule (its ticks and the runs it started).
pub async fn recent(pool: &PgPool, f: &HistoryFilter, limit: i64) -> CoreResult<Vec<Event>> {
    Ok(sqlx::query_as!(
        Event,
        r#"SELECT e.id, e.type AS kind, e.at, e.run_id, e.device_id, e.schedule_id, e.host_id, e.data FROM events e
           WHERE e.at >= now() - make_interval(secs => $1)
             AND ($2::text IS NULL OR e.device_id IN (SELECT id FROM devices WHERE pool = $2))
             AND ($3::text IS NULL OR e.device_id IN (SELECT id FROM devices WHERE $3 = ANY (labels)))
             AND ($4::uuid IS NULL OR e.schedule_id = $4 OR e.run_id IN (SELECT id FROM runs WHERE schedule_id = $4))
           ORDER BY e.id DESC LIMIT $5"#,
        f.window.seconds(),
        f.pool,
        f.label,
        f.schedule_id as Option<ScheduleId>,
        limit,
    )
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaky_cursors_round_trip_and_refuse_anything_else() {
        let c = FlakyCursor {
            failed_at: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            run_id: RunId(uuid::Uuid::new_v4()),
            step: 2,
        };
        assert_eq!(FlakyCursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!", "flaky|1|x|2", "flaky|1", "at|3"] {
            let raw = pagination::seal(bad);
            assert!(FlakyCursor::decode(&raw).is_err(), "{bad}");
        }
        let extra = pagination::seal(&format!("flaky|1|{}|0|9", c.run_id.0));
        assert!(FlakyCursor::decode(&extra).is_err());
        // A runs-list cursor is not a flaky cursor.
        let other = crate::pagination::Cursor { created_at: c.failed_at, id: c.run_id.0 }.encode();
        assert!(FlakyCursor::decode(&other).is_err());
    }
}
