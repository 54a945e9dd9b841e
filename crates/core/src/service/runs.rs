//! Starting, cancelling, pausing and retrying runs, and moving campaigns on.

use std::{collections::HashMap, time::Duration};

use serde_json::{Map, Value};
use sqlx::PgConnection;

use crate::{
    CoreError, CoreResult,
    catalog::ModuleSpec,
    definition::ChildSpec,
    ids::{CampaignId, RunId, WorkflowId},
    launch::{self, RunOptions},
    model::{Run, RunKind},
    repo::{
        campaign_runs, campaigns, devices,
        runs::{self, CancelOutcome, NewRun},
        workflows,
    },
    selector::Selector,
    service::Engine,
};

/// A run started (or, for a repeated `Idempotency-Key`, the first one).
#[derive(Debug, Clone)]
pub struct Started {
    /// The run.
    pub run: Run,
    /// False when an idempotency key returned an earlier run.
    pub created: bool,
}

/// Start a module run (`params` validated against the module).
#[derive(Debug, Clone)]
pub struct StartModule {
    /// The module.
    pub module: &'static ModuleSpec,
    /// Its parameters, defaults filled in.
    pub params: Value,
    /// The devices it may use.
    pub device: Selector,
    /// Priority, time budget, attempts, queue-wait limit, idempotency key.
    pub options: RunOptions,
}

/// Start a workflow run.
#[derive(Debug, Clone)]
pub struct StartWorkflow {
    /// The workflow (its current version is snapshotted).
    pub workflow: WorkflowId,
    /// Defaults for every step whose module takes them.
    pub params: Map<String, Value>,
    /// The device it runs on.
    pub device: Selector,
    /// Priority, time budget, attempts, queue-wait limit, idempotency key.
    pub options: RunOptions,
}

/// Start a campaign run.
#[derive(Debug, Clone)]
pub struct StartCampaign {
    /// The campaign (its current version, and its workflows', are snapshotted).
    pub campaign: CampaignId,
    /// Priority, time budget, idempotency key.
    pub options: RunOptions,
}

/// A 422 unless some device that may serve runs matches (`field` names the selector).
async fn check_matches(conn: &mut PgConnection, selector: &Selector, field: &str) -> CoreResult<()> {
    if devices::any_matching(conn, selector).await? {
        Ok(())
    } else {
        Err(CoreError::invalid(field, "no registered device matches this selector"))
    }
}

/// The specs of a campaign's children, with the workflows its items name read now.
pub(crate) async fn campaign_children(conn: &mut PgConnection, c: &campaigns::Campaign) -> CoreResult<Vec<ChildSpec>> {
    let mut found = HashMap::new();
    for item in &c.items {
        if let crate::definition::ItemAction::Workflow { workflow_id } = item.action
            && let Some(w) = workflows::find(conn, workflow_id).await?
        {
            found.insert(workflow_id, w);
        }
    }
    launch::child_specs(c, |id| found.get(id).cloned()).map_err(CoreError::invalid_fields)
}

impl Engine {
    /// `POST /modules/{id}/runs`.
    pub async fn start_module(&self, cmd: &StartModule) -> CoreResult<Started> {
        check_matches(&mut *self.pool.acquire().await?, &cmd.device, "device").await?;
        let spec = launch::module_spec(0, cmd.module, cmd.params.clone(), cmd.device.clone());
        self.start(&launch::run_of(&spec, &cmd.options)).await
    }

    /// `POST /workflows/{id}/runs`: the workflow as it is now, `params` applied.
    pub async fn start_workflow(&self, cmd: &StartWorkflow) -> CoreResult<Started> {
        let mut conn = self.pool.acquire().await?;
        let w = workflows::find(&mut conn, cmd.workflow)
            .await?
            .ok_or_else(|| CoreError::not_found(format!("workflow {}", cmd.workflow)))?;
        let spec = launch::workflow_spec(0, &w, &cmd.params, cmd.device.clone(), "params")
            .map_err(CoreError::invalid_fields)?;
        check_matches(&mut conn, &cmd.device, "device").await?;
        drop(conn);
        self.start(&launch::run_of(&spec, &cmd.options)).await
    }

    /// `POST /campaigns/{id}/runs`: the campaign run and all its children in one
    /// transaction; the first `max_parallel` children start at once.
    pub async fn launch_campaign(&self, cmd: &StartCampaign) -> CoreResult<Started> {
        let mut tx = self.pool.begin().await?;
        let c = campaigns::find(&mut tx, cmd.campaign)
            .await?
            .ok_or_else(|| CoreError::not_found(format!("campaign {}", cmd.campaign)))?;
        let children = campaign_children(&mut tx, &c).await?;
        let parent = launch::campaign_run(launch::campaign_snapshot(&c, children.clone()), &cmd.options);
        self.launch(tx, &parent, &children, &cmd.options).await
    }

    /// Creates a campaign run and its children, then pushes the admitted ones.
    async fn launch(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        parent: &NewRun,
        children: &[ChildSpec],
        options: &RunOptions,
    ) -> CoreResult<Started> {
        let Some((run, advance)) = campaign_runs::start(&mut tx, parent, children, options).await? else {
            tx.rollback().await?;
            return Ok(Started {
                run: runs::replay(&mut *self.pool.acquire().await?, options.idempotency.as_ref()).await?,
                created: false,
            });
        };
        tx.commit().await?;
        self.dispatch_started(run.id, &advance.admit).await;
        Ok(Started { run: runs::get(&self.pool, run.id).await?, created: true })
    }

    /// Moves a campaign run on (after a child ended, was cancelled, or from the
    /// reconciler): pushes the children it admitted and signals those it stopped.
    pub async fn advance_campaign(&self, parent: RunId) -> CoreResult<()> {
        let a = campaign_runs::advance(&self.pool, parent).await?;
        self.dispatch(&a.admit).await;
        self.signal(&a.signal).await;
        Ok(())
    }

    /// `POST /runs/{id}/cancel`: a queued run is cancelled at once; a running one is
    /// interrupted by its worker (signalled through Redis, noticed by its heartbeat
    /// otherwise); a campaign run cascades to its children. Answers with the run after,
    /// waiting up to `wait` for a running one to stop; 409 on a terminal run.
    pub async fn cancel(&self, id: RunId, wait: Duration) -> CoreResult<Run> {
        let outcome = runs::cancel(&self.pool, id, "cancelled by request").await?;
        if let CancelOutcome::Terminal(status) = outcome {
            return Err(CoreError::Conflict(format!("run {id} is already {status}; a terminal run never changes")));
        }
        let run = runs::get(&self.pool, id).await?;
        if run.kind != RunKind::Campaign && outcome == CancelOutcome::Requested {
            self.signal(&[id]).await;
        }
        // The cancel is committed: moving the campaign on is the reconciler's to repeat
        // if it fails here, not a reason to answer an error.
        let campaign = if run.kind == RunKind::Campaign { Some(id) } else { run.parent_run_id };
        self.after_ended(campaign.as_slice()).await;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let run = runs::get(&self.pool, id).await?;
            if run.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(run);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /runs/{id}/pause`: a running workflow stops before its next step and
    /// keeps its device.
    pub async fn pause(&self, id: RunId) -> CoreResult<Run> {
        runs::set_paused(&self.pool, id, true).await?;
        runs::get(&self.pool, id).await
    }

    /// `POST /runs/{id}/resume`. A paused run waiting in the queue (its worker stopped)
    /// is dispatched again: nobody claims a paused run.
    pub async fn resume(&self, id: RunId) -> CoreResult<Run> {
        runs::set_paused(&self.pool, id, false).await?;
        let run = runs::get(&self.pool, id).await?;
        if run.status == crate::model::RunStatus::Queued {
            self.dispatch(&[id]).await;
        }
        Ok(run)
    }

    /// `POST /runs/{id}/retry`: a new run of the same snapshot (`trigger: retry`). For a
    /// campaign run, `failed_only` retries only its failed, errored and timed-out
    /// children.
    pub async fn retry(
        &self,
        id: RunId,
        failed_only: bool,
        idempotency: Option<launch::Idempotency>,
    ) -> CoreResult<Started> {
        let original = runs::get(&self.pool, id).await?;
        if failed_only && original.kind != RunKind::Campaign {
            return Err(CoreError::invalid("failed_only", "only applies to campaign runs"));
        }
        let state = crate::lifecycle::RunState {
            status: original.status,
            kind: original.kind,
            attempt: original.attempt,
            max_attempts: original.max_attempts,
            paused: original.paused,
            cancel_requested: false,
            held: false,
        };
        if crate::lifecycle::decide(state, crate::lifecycle::Command::Retry) != crate::lifecycle::Decision::NewRun {
            return Err(CoreError::Conflict(format!(
                "run {id} is still {}; only a finished run can be retried",
                original.status
            )));
        }
        let Some(snapshot) = campaign_runs::snapshot_of(&original) else {
            return self.start(&launch::retry(&original, idempotency)).await;
        };
        let mut snapshot = snapshot.clone();
        if failed_only {
            let failed = runs::failed_children(&self.pool, id).await?;
            snapshot.items.retain(|c| failed.contains(&c.index));
            if snapshot.items.is_empty() {
                return Err(CoreError::Conflict(format!("campaign run {id} has no failed or errored children")));
            }
        }
        let options = RunOptions {
            priority: original.priority,
            timeout_s: Some(original.timeout_s),
            trigger: crate::model::Trigger::Retry,
            retry_of: Some(id),
            idempotency,
            ..RunOptions::default()
        };
        let children = snapshot.items.clone();
        let parent = launch::campaign_run(snapshot, &options);
        let tx = self.pool.begin().await?;
        self.launch(tx, &parent, &children, &options).await
    }

    /// Starts what a schedule targets (a module, workflow or campaign run) in the
    /// caller's transaction; returns the run and the runs to push once committed.
    pub(crate) async fn start_target(
        conn: &mut PgConnection,
        target: &crate::definition::Target,
        options: &RunOptions,
    ) -> CoreResult<(RunId, Vec<RunId>)> {
        use crate::definition::Target;
        let new = match target {
            Target::Module { id, params, device } => {
                let m = crate::catalog::find(id)
                    .ok_or_else(|| CoreError::Unreadable(format!("target names unknown module {id:?}")))?;
                launch::run_of(&launch::module_spec(0, m, params.clone(), device.clone()), options)
            }
            Target::Workflow { id, params, device } => {
                let w = workflows::find(conn, *id)
                    .await?
                    .ok_or_else(|| CoreError::invalid("target.id", format!("no workflow {id}")))?;
                let shared = match params {
                    Some(p) => p.clone(),
                    None => Map::new(),
                };
                let spec = launch::workflow_spec(0, &w, &shared, device.clone(), "target.params")
                    .map_err(CoreError::invalid_fields)?;
                launch::run_of(&spec, options)
            }
            Target::Campaign { id } => {
                let c = campaigns::find(conn, *id)
                    .await?
                    .ok_or_else(|| CoreError::invalid("target.id", format!("no campaign {id}")))?;
                let children = campaign_children(conn, &c).await?;
                let parent = launch::campaign_run(launch::campaign_snapshot(&c, children.clone()), options);
                let (run, advance) = campaign_runs::start(conn, &parent, &children, options)
                    .await?
                    .ok_or_else(|| CoreError::Internal("a scheduled campaign run has no idempotency key".into()))?;
                return Ok((run.id, advance.admit));
            }
        };
        let run = runs::insert_tx(conn, &new, crate::model::RunStatus::Queued)
            .await?
            .ok_or_else(|| CoreError::Internal("a scheduled run has no idempotency key".into()))?;
        Ok((run.id, vec![run.id]))
    }
}
