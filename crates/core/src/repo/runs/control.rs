//! The user's side of a run: cancel, pause and resume, decided by the lifecycle.

use sqlx::PgPool;

use crate::{
    CoreError, CoreResult,
    ids::RunId,
    lifecycle::{self, Command, Decision, Refusal},
    model::RunStatus,
    repo::runs::transitions,
    run_error::{ErrorKind, RunError},
};

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued: now `cancelled`.
    Cancelled,
    /// It is running: its holder (or, for a campaign run, its children) is asked to stop.
    Requested,
    /// Already terminal: nothing changed.
    Terminal(RunStatus),
}

/// Cancels a queued run at once, or asks the holder of a running one to stop.
pub async fn cancel(pool: &PgPool, id: RunId, reason: &str) -> CoreResult<CancelOutcome> {
    let mut tx = pool.begin().await?;
    let run = transitions::lock(&mut tx, id).await?.ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    let outcome = match lifecycle::decide(run.state, Command::Cancel) {
        Decision::End(status) => {
            let error = RunError::new(ErrorKind::Cancelled, reason);
            transitions::end(&mut tx, &[id], status, None, Some(&error)).await?;
            CancelOutcome::Cancelled
        }
        Decision::RequestCancel => {
            transitions::request_cancel(&mut tx, &[id], reason).await?;
            CancelOutcome::Requested
        }
        Decision::Refuse(Refusal::Terminal(status)) => CancelOutcome::Terminal(status),
        other => return Err(CoreError::Internal(format!("cancel of run {id} decided {other:?}"))),
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Pauses (`true`) or resumes (`false`) a workflow run between steps. 409 for other
/// runs, or when it already is in that state.
pub async fn set_paused(pool: &PgPool, id: RunId, paused: bool) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let run = transitions::lock(&mut tx, id).await?.ok_or_else(|| CoreError::not_found(format!("run {id}")))?;
    let command = if paused { Command::Pause } else { Command::Resume };
    let verb = if paused { "paused" } else { "resumed" };
    match lifecycle::decide(run.state, command) {
        Decision::SetPaused(value) => transitions::set_paused(&mut tx, &run, value).await?,
        Decision::Refuse(Refusal::NotAWorkflow(kind)) => {
            return Err(CoreError::Conflict(format!("only workflow runs can be {verb} (run {id} is a {kind} run)")));
        }
        Decision::Refuse(Refusal::AlreadyPaused) => {
            return Err(CoreError::Conflict(format!("run {id} is already paused")));
        }
        Decision::Refuse(Refusal::NotPaused) => {
            return Err(CoreError::Conflict(format!("run {id} is already running (not paused)")));
        }
        Decision::Refuse(Refusal::NotRunning(status)) => {
            return Err(CoreError::Conflict(format!("only a running workflow can be {verb} (run {id} is {status})")));
        }
        other => return Err(CoreError::Internal(format!("pause of run {id} decided {other:?}"))),
    }
    tx.commit().await?;
    Ok(())
}

/// The item positions of a campaign run's children that ended failed, errored or
/// timed out (what `retry {failed_only}` runs again).
pub async fn failed_children(pool: &PgPool, parent: RunId) -> CoreResult<Vec<i32>> {
    Ok(sqlx::query_scalar!(
        r#"SELECT parent_index AS "index!" FROM runs
           WHERE parent_run_id = $1 AND status IN ('failed', 'errored', 'timed_out') AND parent_index IS NOT NULL
           ORDER BY parent_index"#,
        parent as RunId
    )
    .fetch_all(pool)
    .await?)
}
