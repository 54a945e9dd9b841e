//! Campaign runs: a parent run that fans out child runs, admits at most `max_parallel`
//! of them at a time (children wait `held`, which makes them unclaimable, until
//! admitted), stops on a cancel, its timeout or (when asked) the first failure, and
//! ends when every child has.
//!
//! `advance` is the one place that moves a campaign forward. It locks the parent row,
//! so concurrent callers (workers finishing children, the API, every reconciler) are
//! serialized, and it is idempotent, so calling it again after a crash repairs
//! whatever a dead process left half done. `campaign::plan` decides; this writes.

use chrono::Utc;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::{
    CoreResult,
    campaign::{self, Plan, Progress, Stop},
    definition::{CampaignSnapshot, CampaignSummary, ChildSpec, RunDefinition, from_stored},
    ids::RunId,
    launch::{self, RunOptions},
    lifecycle::{self, Command, Decision, RunState, run_state},
    model::{Run, RunStatus},
    repo::runs::{self, NewRun},
    run_error::{ErrorKind, RunError},
};

/// What `advance` did: children to push (newly admitted) and running children to
/// signal (asked to stop), and the campaign run's status if it ended.
#[derive(Debug, Default, Clone)]
pub struct Advance {
    /// Children admitted now: push them.
    pub admit: Vec<RunId>,
    /// Running children asked to stop: signal their workers.
    pub signal: Vec<RunId>,
    /// The campaign run's final status, if it ended now.
    pub finished: Option<RunStatus>,
}

/// Creates a campaign run (`parent`, created running) and all its children (held) in
/// the caller's transaction, then admits the first ones. `None` when the idempotency
/// key is taken (nothing is written).
pub async fn start(
    conn: &mut PgConnection,
    parent: &NewRun,
    children: &[ChildSpec],
    options: &RunOptions,
) -> CoreResult<Option<(Run, Advance)>> {
    let Some(run) = runs::insert_tx(conn, parent, RunStatus::Running).await? else { return Ok(None) };
    for spec in children {
        runs::insert_tx(conn, &launch::child_run(spec, run.id, options), RunStatus::Queued).await?;
    }
    let advance = advance_tx(conn, run.id).await?;
    Ok(Some((run, advance)))
}

/// Moves a campaign run forward (see the module docs). Safe to call any time, from
/// any process, as often as wanted.
pub async fn advance(pool: &PgPool, parent: RunId) -> CoreResult<Advance> {
    let mut tx = pool.begin().await?;
    let a = advance_tx(&mut tx, parent).await?;
    tx.commit().await?;
    Ok(a)
}

/// The campaign run's settings, read under its lock.
struct Parent {
    state: RunState,
    /// Its snapshot, or why it cannot be read.
    snapshot: Result<CampaignSnapshot, String>,
    timed_out: bool,
    started_at: Option<chrono::DateTime<Utc>>,
}

async fn lock_parent(conn: &mut PgConnection, parent: RunId) -> CoreResult<Option<Parent>> {
    let row = sqlx::query!(
        r#"SELECT status, kind, attempt, max_attempts, paused, cancel_requested, held,
                  definition AS "definition: Value", started_at,
                  (started_at + make_interval(secs => timeout_s) <= now()) AS "timed_out!"
           FROM runs WHERE id = $1 AND kind = 'campaign' FOR UPDATE"#,
        parent as RunId
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let snapshot = match from_stored::<RunDefinition>(r.definition) {
        Ok(RunDefinition::Campaign(s)) => Ok(s),
        Ok(other) => Err(format!("it is a {} snapshot", other.kind())),
        Err(e) => Err(e),
    };
    Ok(Some(Parent { state: run_state!(r), snapshot, timed_out: r.timed_out, started_at: r.started_at }))
}

async fn progress(conn: &mut PgConnection, id: RunId, p: &Parent, s: &CampaignSnapshot) -> CoreResult<Progress> {
    let counts = runs::children_counts(conn, id).await?;
    let held = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM runs WHERE parent_run_id = $1 AND held AND status = 'queued'"#,
        id as RunId
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Progress {
        counts,
        held,
        max_parallel: i64::from(s.max_parallel),
        stop_on_failure: s.stop_on_failure,
        cancel_requested: p.state.cancel_requested,
        timed_out: p.timed_out,
    })
}

/// `advance` in the caller's transaction.
pub async fn advance_tx(conn: &mut PgConnection, id: RunId) -> CoreResult<Advance> {
    let mut out = Advance::default();
    let Some(parent) = lock_parent(conn, id).await? else { return Ok(out) };
    if parent.state.status != RunStatus::Running {
        return Ok(out);
    }
    let snapshot = match &parent.snapshot {
        Ok(s) => s,
        Err(e) => return abandon_unreadable(conn, id, e).await,
    };
    let before = progress(conn, id, &parent, snapshot).await?;
    match campaign::plan(&before) {
        Plan::Stop { why, interrupt } => out.signal = stop_children(conn, id, why, interrupt).await?,
        Plan::Admit(n) if n > 0 => out.admit = admit(conn, id, n).await?,
        Plan::Admit(_) => {}
    }
    let after = progress(conn, id, &parent, snapshot).await?;
    if let Some(status) = campaign::ending(&after) {
        let summary = CampaignSummary {
            total: after.counts.total,
            counts: after.counts,
            duration_ms: parent.started_at.map(|s| (Utc::now() - s).num_milliseconds()),
            stopped_on_failure: campaign::plan(&after) == Plan::Stop { why: Stop::FirstFailure, interrupt: false },
        };
        let summary = serde_json::to_value(&summary).map_err(|e| crate::CoreError::Internal(e.to_string()))?;
        runs::end(conn, &[id], status, Some(&summary), None).await?;
        out.finished = Some(status);
    }
    Ok(out)
}

/// A campaign run whose snapshot cannot be read ends `errored` at once, naming it;
/// its children are stopped.
async fn abandon_unreadable(conn: &mut PgConnection, id: RunId, problem: &str) -> CoreResult<Advance> {
    tracing::error!(run_id = %id, problem, "ending a campaign run whose stored snapshot is unreadable");
    let signal = stop_children(conn, id, Stop::Cancelled, true).await?;
    let error = RunError::new(ErrorKind::Unreadable, format!("the run's stored definition is unreadable: {problem}"));
    runs::end(conn, &[id], RunStatus::Errored, None, Some(&error)).await?;
    Ok(Advance { admit: Vec::new(), signal, finished: Some(RunStatus::Errored) })
}

/// Cancels the children not yet started (held or admitted) and, with `interrupt`,
/// asks the running ones to stop: each as `lifecycle::decide` says for a cancel.
/// Returns the running children asked to stop.
async fn stop_children(conn: &mut PgConnection, parent: RunId, why: Stop, interrupt: bool) -> CoreResult<Vec<RunId>> {
    let rows = sqlx::query!(
        "SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held FROM runs
         WHERE parent_run_id = $1 AND status IN ('queued', 'running') ORDER BY id FOR UPDATE",
        parent as RunId
    )
    .fetch_all(&mut *conn)
    .await?;
    let (mut end, mut stop) = (Vec::new(), Vec::new());
    for r in rows {
        let state = run_state!(r);
        match lifecycle::decide(state, Command::Cancel) {
            Decision::End(RunStatus::Cancelled) => end.push(r.id),
            Decision::RequestCancel if interrupt && !r.cancel_requested => stop.push(r.id),
            _ => {}
        }
    }
    let error = RunError::new(ErrorKind::Cancelled, why.message()).because(why.reason());
    runs::end(conn, &end, RunStatus::Cancelled, None, Some(&error)).await?;
    runs::request_cancel(conn, &stop, why.reason()).await
}

/// Admits up to `n` held children in item order.
async fn admit(conn: &mut PgConnection, parent: RunId, n: i64) -> CoreResult<Vec<RunId>> {
    Ok(sqlx::query_scalar!(
        // A materialized CTE: `WHERE id IN (SELECT .. LIMIT n FOR UPDATE)` may be
        // re-evaluated by the planner and update more than n rows.
        "WITH picked AS MATERIALIZED (
            SELECT id FROM runs WHERE parent_run_id = $1 AND held AND status = 'queued'
            ORDER BY parent_index LIMIT $2 FOR UPDATE)
         UPDATE runs SET held = false, queued_at = clock_timestamp(), waiting_since = clock_timestamp(), updated_at = now()
         FROM picked WHERE runs.id = picked.id
         RETURNING runs.id",
        parent as RunId,
        n,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Campaign runs still running, oldest first (the reconciler advances each).
pub async fn running(pool: &PgPool, limit: i64) -> CoreResult<Vec<RunId>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM runs WHERE kind = 'campaign' AND status = 'running' ORDER BY created_at LIMIT $1",
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// The campaign snapshot of a campaign run (for a retry).
pub fn snapshot_of(run: &Run) -> Option<&CampaignSnapshot> {
    match &run.definition {
        RunDefinition::Campaign(s) => Some(s),
        _ => None,
    }
}
