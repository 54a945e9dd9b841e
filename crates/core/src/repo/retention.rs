//! Retention: what ended longer ago than `SWITCHBOARD_RETENTION_DAYS` is deleted by
//! the scheduler, in small batches that never block the queue.
//!
//! A run goes with everything that is its history: its steps and captures (by
//! cascade), its events, and, for a campaign, its children. A run is pruned only as a
//! whole: a campaign child never alone (its campaign would report the item as never
//! created), a campaign only once every child has ended past the cutoff too, and
//! nothing that is queued or running, whatever its age. Each batch is one short
//! statement that takes its runs with `SKIP LOCKED`, so it never waits on a run a
//! worker or the API holds, and two schedulers pruning at once share the work.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::CoreResult;

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Runs, campaign children included.
    pub runs: i64,
    /// Their steps.
    pub steps: i64,
    /// Events: the runs' own, and events about devices, hosts and schedules.
    pub events: i64,
}

impl std::ops::AddAssign for Pruned {
    fn add_assign(&mut self, o: Pruned) {
        self.runs += o.runs;
        self.steps += o.steps;
        self.events += o.events;
    }
}

/// Deletes up to `batch` top-level runs (with their children) that ended before
/// `keep` ago, with their steps, captures and events.
pub async fn prune_runs(pool: &PgPool, keep: Duration, batch: i64) -> CoreResult<Pruned> {
    let r = sqlx::query!(
        r#"WITH doomed AS MATERIALIZED (
               SELECT r.id FROM runs r
               WHERE r.status NOT IN ('queued', 'running') AND r.parent_run_id IS NULL
                 AND r.finished_at < now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM runs c WHERE c.parent_run_id = r.id
                                 AND (c.status IN ('queued', 'running') OR c.finished_at >= now() - make_interval(secs => $1)))
               ORDER BY r.finished_at LIMIT $2
               FOR UPDATE SKIP LOCKED),
             family AS MATERIALIZED (
               SELECT id FROM doomed UNION ALL SELECT c.id FROM runs c WHERE c.parent_run_id IN (SELECT id FROM doomed)),
             ev AS (DELETE FROM events WHERE run_id IN (SELECT id FROM family) RETURNING 1),
             st AS (DELETE FROM run_steps WHERE run_id IN (SELECT id FROM family) RETURNING 1),
             gone AS (DELETE FROM runs WHERE id IN (SELECT id FROM family) RETURNING 1)
           SELECT (SELECT count(*) FROM gone) AS "runs!", (SELECT count(*) FROM st) AS "steps!",
                  (SELECT count(*) FROM ev) AS "events!""#,
        keep.as_secs_f64(),
        batch,
    )
    .fetch_one(pool)
    .await?;
    Ok(Pruned { runs: r.runs, steps: r.steps, events: r.events })
}

/// Deletes up to `batch` events about no run (devices, hosts, schedules) written
/// before `keep` ago.
pub async fn prune_events(pool: &PgPool, keep: Duration, batch: i64) -> CoreResult<i64> {
    Ok(sqlx::query_scalar!(
        r#"WITH old AS (
               SELECT id FROM events WHERE run_id IS NULL AND at < now() - make_interval(secs => $1)
               ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED),
             gone AS (DELETE FROM events WHERE id IN (SELECT id FROM old) RETURNING 1)
           SELECT count(*) AS "n!" FROM gone"#,
        keep.as_secs_f64(),
        batch,
    )
    .fetch_one(pool)
    .await?)
}

/// Deletes the rollup (`step_days`) of the days and weeks that ended before `keep` ago.
pub async fn prune_step_days(pool: &PgPool, keep: Duration) -> CoreResult<u64> {
    Ok(sqlx::query!(
        // One range per span, so that each is read from `step_days_day_idx` (days, day)
        // rather than every row tested.
        "DELETE FROM step_days
         WHERE (days = 1 AND day <= now() - make_interval(secs => $1) - interval '1 day')
            OR (days = 7 AND day <= now() - make_interval(secs => $1) - interval '7 days')",
        keep.as_secs_f64()
    )
    .execute(pool)
    .await?
    .rows_affected())
}
