//! Runs nobody is looking after: leases that expired (the worker died, froze or was
//! cut off), queued runs that Redis lost or that a recovered device could now serve,
//! and queued runs that can never start (their devices are gone, or they waited past
//! their queue-wait limit). Every pass is safe in several processes at once.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::{
    CoreResult,
    ids::{DeviceId, RunId},
    lifecycle::{self, Abandon, Command, Decision, run_state},
    model::RunStatus,
    repo::{
        devices,
        runs::transitions::{self, RequeueReason},
    },
    run_error::{ErrorKind, RunError},
};

/// A run ended here, and the campaign run it belongs to (which must move on).
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// The run.
    pub id: RunId,
    /// Its campaign run, if it is a child.
    pub parent: Option<RunId>,
}

/// Recovers runs whose worker stopped renewing the lease: back to `queued` with
/// `attempt + 1`, or ended (`errored` when attempts are spent, `cancelled` when a
/// cancel was requested); their devices are freed. Returns the runs requeued (to push)
/// and those ended (whose campaigns must move on).
pub async fn recover_expired(pool: &PgPool, limit: i64) -> CoreResult<(Vec<RunId>, Vec<Ended>)> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query!(
        "SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held, lease_owner, parent_run_id
         FROM runs WHERE status = 'running' AND kind <> 'campaign' AND lease_expires_at < now()
         ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    let (mut requeued, mut ended) = (Vec::new(), Vec::new());
    for r in rows {
        let state = run_state!(r);
        let owner = r.lease_owner.as_deref().unwrap_or("unknown");
        let lost = RunError::new(ErrorKind::LeaseExpired, "the worker stopped renewing its lease").by_worker(owner);
        match lifecycle::decide(state, Command::Recover) {
            Decision::Requeue { spend_attempt, .. } => {
                transitions::requeue(&mut tx, r.id, spend_attempt, None, &lost, RequeueReason::LeaseExpired).await?;
                requeued.push(r.id);
            }
            Decision::End(status) => {
                let error = if status == RunStatus::Cancelled {
                    RunError::new(ErrorKind::Cancelled, "cancelled; its worker stopped renewing its lease")
                        .by_worker(owner)
                } else {
                    lost
                };
                transitions::end(&mut tx, &[r.id], status, None, Some(&error)).await?;
                ended.push(Ended { id: r.id, parent: r.parent_run_id });
            }
            _ => continue,
        }
        devices::free_after_recovery(&mut tx, r.id).await?;
    }
    devices::free_orphan_leases(&mut tx).await?;
    tx.commit().await?;
    Ok((requeued, ended))
}

/// Queued runs due for (re)delivery, best first: never pushed (a lost push), or pushed
/// more than `stale` ago and still queued while a matching device is free now (Redis
/// lost the job, or the device recovered: breaker cooldown over, back online). Runs
/// that wait for a busy device are left alone: the releasing worker hands the device
/// over.
pub async fn due_for_dispatch(pool: &PgPool, stale: Duration, limit: i64) -> CoreResult<Vec<RunId>> {
    Ok(sqlx::query_scalar!(
        "SELECT r.id FROM runs r
         WHERE r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND NOT r.paused
           AND (r.not_before IS NULL OR r.not_before <= now())
           AND ((r.dispatched_at IS NULL AND r.queued_at < now() - interval '2 seconds')
                OR (r.dispatched_at < now() - make_interval(secs => $1)
                    AND EXISTS (SELECT 1 FROM devices d WHERE device_claimable(d) AND selector_matches(r.selector, d))))
         ORDER BY r.priority DESC, r.queued_at LIMIT $2",
        stale.as_secs_f64(),
        limit,
    )
    .fetch_all(pool)
    .await?)
}

/// Queued runs (best first) that this device could serve now: pushed again when a
/// device joins, comes back online or has its breaker reset.
pub async fn waiting_for_device(pool: &PgPool, device: DeviceId, limit: i64) -> CoreResult<Vec<RunId>> {
    Ok(sqlx::query_scalar!(
        "SELECT r.id FROM runs r, devices d
         WHERE d.id = $1 AND device_claimable(d)
           AND r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND NOT r.paused
           AND (r.not_before IS NULL OR r.not_before <= now())
           AND r.selector IS NOT NULL AND selector_matches(r.selector, d)
         ORDER BY r.priority DESC, r.queued_at LIMIT $2",
        device as DeviceId,
        limit,
    )
    .fetch_all(pool)
    .await?)
}

/// Ends queued runs that waited for a device longer than their queue-wait limit (their
/// own `max_queue_wait_s`, else `default_wait`), counted from when they last entered
/// the queue (`waiting_since`) or, for a retry backing off, from its `not_before`. A
/// paused run waits for a person, not a device, and a held child for its campaign:
/// neither counts.
pub async fn abandon_overdue(pool: &PgPool, default_wait: Duration, limit: i64) -> CoreResult<Vec<Ended>> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query!(
        r#"SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held, parent_run_id,
                  COALESCE(max_queue_wait_s::float8, $1) AS "waited_s!"
           FROM runs
           WHERE status = 'queued' AND kind <> 'campaign' AND NOT held AND NOT paused
             AND GREATEST(waiting_since, not_before) + make_interval(secs => COALESCE(max_queue_wait_s::float8, $1)) < now()
           ORDER BY queued_at LIMIT $2 FOR UPDATE SKIP LOCKED"#,
        default_wait.as_secs_f64(),
        limit,
    )
    .fetch_all(&mut *tx)
    .await?;
    let doomed = rows.into_iter().map(|r| {
        let problem = format!("no matching device became free within its queue-wait limit of {} s", r.waited_s);
        (
            Ended { id: r.id, parent: r.parent_run_id },
            run_state!(r),
            RunError::new(ErrorKind::QueueWaitExceeded, problem),
        )
    });
    let ended = abandon(&mut tx, Abandon::QueueWait, doomed.collect()).await?;
    tx.commit().await?;
    Ok(ended)
}

/// In the caller's transaction, after `device` was deleted or retired: ends the queued
/// runs it could serve that no remaining device could ever serve (every match deleted
/// or retired), naming their selector. Offline and maintenance devices may come back,
/// so runs keep waiting for those (up to their queue-wait limit). Runs another
/// transaction holds are skipped (`SKIP LOCKED`, so a delete never waits on a run while
/// holding its device: no lock cycle with a finishing worker); one being claimed is not
/// stuck, and one left queued ends at its queue-wait limit.
pub async fn abandon_unservable(conn: &mut PgConnection, device: DeviceId) -> CoreResult<Vec<Ended>> {
    let rows = sqlx::query!(
        r#"SELECT r.id, r.status, r.kind, r.attempt, r.max_attempts, r.paused, r.cancel_requested, r.held,
                  r.parent_run_id, r.selector AS "selector!: Value"
           FROM runs r, devices d
           WHERE d.id = $1 AND r.status = 'queued' AND NOT r.held AND r.selector IS NOT NULL
             AND selector_matches(r.selector, d)
             AND NOT EXISTS (SELECT 1 FROM devices o WHERE o.id <> d.id AND o.status <> 'retired'
                             AND selector_matches(r.selector, o))
           ORDER BY r.id FOR UPDATE OF r SKIP LOCKED"#,
        device as DeviceId
    )
    .fetch_all(&mut *conn)
    .await?;
    let doomed = rows.into_iter().map(|r| {
        let problem = format!(
            "no device that could serve it is left: every device matching {} was deleted or retired",
            r.selector
        );
        (Ended { id: r.id, parent: r.parent_run_id }, run_state!(r), RunError::new(ErrorKind::Unservable, problem))
    });
    abandon(conn, Abandon::Unservable, doomed.collect()).await
}

/// Ends each locked queued run the lifecycle lets `why` end, with its own error.
async fn abandon(
    conn: &mut PgConnection,
    why: Abandon,
    runs: Vec<(Ended, crate::lifecycle::RunState, RunError)>,
) -> CoreResult<Vec<Ended>> {
    let mut ended = Vec::new();
    for (run, state, error) in runs {
        if lifecycle::decide(state, Command::Abandon(why)) == Decision::End(RunStatus::Errored) {
            transitions::end(conn, &[run.id], RunStatus::Errored, None, Some(&error)).await?;
            ended.push(run);
        }
    }
    Ok(ended)
}

/// The campaign runs (each once) whose children are among `ended`.
pub fn parents_of(ended: &[Ended]) -> Vec<RunId> {
    let mut parents: Vec<RunId> = ended.iter().filter_map(|e| e.parent).collect();
    parents.sort();
    parents.dedup();
    parents
}
