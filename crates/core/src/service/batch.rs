//! Starting many runs for the price of one: the API's group commit, where the starts
//! that arrive together share one INSERT, one commit and one push to the queue, and
//! `POST /runs/batch`, where a client sends up to [`MAX_BATCH`] runs in one request.
//!
//! Neither weakens SPEC §3.1: a start is answered only after the statement that wrote
//! its run has committed, and a run is pushed only after that.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::{
    CoreError, CoreResult,
    error::FieldErrors,
    group::{Group, GroupSettings},
    ids::{RunId, WorkflowId},
    launch,
    model::Run,
    repo::{
        devices,
        runs::{self, NewRun},
        workflows,
    },
    selector::Selector,
    service::{Engine, StartModule, StartWorkflow, Started},
};

/// The most runs one `POST /runs/batch` (and one group commit) may hold.
pub const MAX_BATCH: usize = 1000;

/// Group commits in flight at once: while they write, the next starts gather.
const IN_FLIGHT: usize = 4;

/// One run of a batch.
#[derive(Debug, Clone)]
pub enum StartItem {
    /// A module run.
    Module(StartModule),
    /// A workflow run.
    Workflow(StartWorkflow),
}

/// Gathers concurrent starts into shared INSERTs (see the module's doc).
pub(crate) struct GroupCommit {
    group: Group<NewRun, Option<Run>>,
}

impl GroupCommit {
    /// Starts the gathering task. A start waits at most `window` for others to join
    /// it, and not at all when none is being written: an idle API adds no delay, a busy
    /// one writes what gathered while the previous INSERT ran. Should a shared INSERT
    /// fail, each of its starts is written alone: one start's fault (a schedule deleted
    /// meanwhile) never fails the others.
    pub(crate) fn spawn(engine: Engine, window: Duration) -> Arc<GroupCommit> {
        let settings = GroupSettings { what: "starts", lanes: IN_FLIGHT, max: MAX_BATCH, window };
        let group = Group::spawn(settings, move |news: Arc<Vec<NewRun>>| {
            let engine = engine.clone();
            async move { insert_and_push(&engine, &news).await }
        });
        Arc::new(GroupCommit { group })
    }

    /// Inserts `new` with whatever starts arrive with it, and pushes it; `None` when
    /// its idempotency key was taken.
    pub(crate) async fn insert(&self, new: NewRun) -> CoreResult<Option<Run>> {
        self.group.submit(new).await
    }
}

/// One INSERT (autocommit, so it has committed when it answers), then one push.
async fn insert_and_push(engine: &Engine, news: &[NewRun]) -> CoreResult<Vec<Option<Run>>> {
    let made = runs::insert_many(&mut *engine.pool.acquire().await?, news).await?;
    let created: Vec<RunId> = made.iter().flatten().map(|r| r.id).collect();
    engine.dispatch(&created).await;
    Ok(made)
}

/// `runs[i].field`: a batch item's field errors, named within the batch.
fn within(index: usize, fields: FieldErrors) -> FieldErrors {
    fields.into_iter().map(|(f, p)| (format!("runs[{index}].{f}"), p)).collect()
}

impl Engine {
    /// Inserts a run (Postgres first: guarantee 1), then dispatches it; through the
    /// group commit where this process has one.
    pub async fn start(&self, new: &NewRun) -> CoreResult<Started> {
        let made = match &self.group {
            Some(group) => group.insert(new.clone()).await?,
            None => {
                let made = runs::insert_many(&mut *self.pool.acquire().await?, std::slice::from_ref(new)).await?;
                let made = made.into_iter().next().flatten();
                if let Some(run) = &made {
                    self.dispatch(&[run.id]).await;
                }
                made
            }
        };
        match made {
            Some(run) => Ok(Started { run, created: true }),
            None => {
                let run = runs::replay(&mut *self.pool.acquire().await?, new.idempotency.as_ref()).await?;
                Ok(Started { run, created: false })
            }
        }
    }

    /// `POST /runs/batch`: every run or none. Each item is checked as its own start
    /// would be (errors name `runs[i].…`); then one transaction inserts them all, and
    /// an item whose idempotency key started a run before gets that run back (a key
    /// reused with another item refuses the whole batch). One push dispatches them.
    pub async fn start_batch(&self, items: &[StartItem]) -> CoreResult<Vec<Started>> {
        let news = self.batch_runs(items).await?;
        let mut tx = self.pool.begin().await?;
        let made = runs::insert_many(&mut tx, &news).await?;
        let mut started = Vec::with_capacity(made.len());
        for (i, (m, new)) in made.into_iter().zip(&news).enumerate() {
            started.push(match m {
                Some(run) => Started { run, created: true },
                None => match runs::replay(&mut tx, new.idempotency.as_ref()).await {
                    Ok(run) => Started { run, created: false },
                    Err(CoreError::IdempotencyKeyReused(why)) => {
                        return Err(CoreError::IdempotencyKeyReused(format!("runs[{i}]: {why}")));
                    }
                    Err(e) => return Err(e),
                },
            });
        }
        tx.commit().await?;
        let created: Vec<RunId> = started.iter().filter(|s| s.created).map(|s| s.run.id).collect();
        self.dispatch(&created).await;
        Ok(started)
    }

    /// The runs a batch's items start, with everything only the database can tell
    /// checked: each workflow exists and applies its params, each selector matches a
    /// device (each distinct one asked once).
    async fn batch_runs(&self, items: &[StartItem]) -> CoreResult<Vec<NewRun>> {
        let mut conn = self.pool.acquire().await?;
        let mut found: HashMap<WorkflowId, Option<workflows::Workflow>> = HashMap::new();
        let mut matched: HashMap<String, bool> = HashMap::new();
        let (mut news, mut errors) = (Vec::with_capacity(items.len()), FieldErrors::new());
        for (i, item) in items.iter().enumerate() {
            let (device, built) = match item {
                StartItem::Module(cmd) => {
                    let spec = launch::module_spec(0, cmd.module, cmd.params.clone(), cmd.device.clone());
                    (&cmd.device, Ok(launch::run_of(&spec, &cmd.options)))
                }
                StartItem::Workflow(cmd) => {
                    let workflow = match found.get(&cmd.workflow) {
                        Some(w) => w.clone(),
                        None => {
                            let w = workflows::find(&mut conn, cmd.workflow).await?;
                            found.insert(cmd.workflow, w.clone());
                            w
                        }
                    };
                    let built = match &workflow {
                        None => Err(FieldErrors::from([(
                            "workflow_id".to_string(),
                            format!("workflow {} not found", cmd.workflow),
                        )])),
                        Some(w) => launch::workflow_spec(0, w, &cmd.params, cmd.device.clone(), "params")
                            .map(|spec| launch::run_of(&spec, &cmd.options)),
                    };
                    (&cmd.device, built)
                }
            };
            let key = Selector::to_json(device).to_string();
            if !matched.contains_key(&key) {
                matched.insert(key.clone(), devices::any_matching(&mut conn, device).await?);
            }
            if !matched[&key] {
                errors.insert(format!("runs[{i}].device"), "no registered device matches this selector".into());
            }
            match built {
                Ok(new) => news.push(new),
                Err(fields) => errors.extend(within(i, fields)),
            }
        }
        if errors.is_empty() { Ok(news) } else { Err(CoreError::invalid_fields(errors)) }
    }
}
