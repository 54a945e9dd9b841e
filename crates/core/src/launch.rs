//! What a start command becomes: the run (or the campaign run and its children) to
//! insert, built the same way whether the API, a schedule or a retry starts it.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{
    catalog::ModuleSpec,
    definition::{CampaignSnapshot, ChildSpec, ItemAction, ModuleSnapshot, RunDefinition, WorkflowSnapshot},
    error::FieldErrors,
    ids::{RunId, ScheduleId},
    model::{Run, Trigger},
    repo::{campaigns::Campaign, runs::NewRun, workflows::Workflow},
    selector::Selector,
};

/// A campaign run's time budget when its start does not say (7 days): past it, the
/// campaign cancels what is left and ends `timed_out`.
pub const CAMPAIGN_TIMEOUT_S: i32 = 7 * 86_400;
/// Attempts of a workflow run when its start does not say.
pub const WORKFLOW_MAX_ATTEMPTS: i32 = 3;

/// How a run is started: the settings every kind of start shares.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// 0 to 9, higher first.
    pub priority: i16,
    /// Its time budget (seconds), instead of the module's or workflow's.
    pub timeout_s: Option<i32>,
    /// Its attempts, instead of the module's or workflow's.
    pub max_attempts: Option<i32>,
    /// Its queue-wait limit (seconds), instead of the deployment's.
    pub max_queue_wait_s: Option<i32>,
    /// What started it.
    pub trigger: Trigger,
    /// The schedule that started it.
    pub schedule_id: Option<ScheduleId>,
    /// The tick it was started for.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The run it retries.
    pub retry_of: Option<RunId>,
    /// The client's `Idempotency-Key`, scoped and fingerprinted.
    pub idempotency: Option<Idempotency>,
}

/// A client's `Idempotency-Key` as kept: scoped to the caller, bound to the request it
/// came with, and expiring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// Whose key it is (the token's id; `bootstrap` for the bootstrap admin token).
    pub scope: String,
    /// The key as the client sent it.
    pub key: String,
    /// A hash of the request (its path and canonical body): a key reused with another
    /// request is refused.
    pub fingerprint: String,
    /// How long the key is kept (seconds); after that it may start a new run.
    pub ttl_s: i64,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            priority: 5,
            timeout_s: None,
            max_attempts: None,
            max_queue_wait_s: None,
            trigger: Trigger::Api,
            schedule_id: None,
            scheduled_for: None,
            retry_of: None,
            idempotency: None,
        }
    }
}

impl RunOptions {
    fn apply(&self, mut new: NewRun) -> NewRun {
        new.priority = self.priority;
        new.timeout_s = self.timeout_s.unwrap_or(new.timeout_s);
        new.max_attempts = self.max_attempts.unwrap_or(new.max_attempts);
        new.max_queue_wait_s = self.max_queue_wait_s;
        new.trigger = self.trigger;
        new.schedule_id = self.schedule_id;
        new.scheduled_for = self.scheduled_for;
        new.retry_of = self.retry_of;
        new.idempotency = self.idempotency.clone();
        new
    }
}

/// The spec of a module run (`params` already validated, defaults filled in).
pub fn module_spec(index: i32, module: &ModuleSpec, params: Value, selector: Selector) -> ChildSpec {
    ChildSpec {
        index,
        kind: crate::model::RunKind::Module,
        target: module.id.to_string(),
        definition: RunDefinition::Module(ModuleSnapshot {
            module: module.id.to_string(),
            params: params.clone(),
            timeout_s: module.default_timeout_s,
        }),
        params,
        selector,
        timeout_s: module.default_timeout_s,
        max_attempts: module.max_attempts,
    }
}

/// The spec of a workflow run: the workflow as it is now, with `shared` params
/// applied to its steps (errors name `{path}.…`). Its time budget is the sum of its
/// steps'.
pub fn workflow_spec(
    index: i32,
    w: &Workflow,
    shared: &Map<String, Value>,
    selector: Selector,
    path: &str,
) -> Result<ChildSpec, FieldErrors> {
    let steps = crate::repo::workflows::apply_params(&w.steps, shared, path)?;
    let timeout: i64 = steps.iter().map(|s| i64::from(s.effective_timeout_s())).sum();
    Ok(ChildSpec {
        index,
        kind: crate::model::RunKind::Workflow,
        target: w.id.to_string(),
        definition: RunDefinition::Workflow(WorkflowSnapshot {
            workflow_id: w.id,
            name: w.name.clone(),
            version: w.version,
            steps,
        }),
        params: Value::Object(shared.clone()),
        selector,
        timeout_s: timeout.clamp(1, 86_400) as i32,
        max_attempts: WORKFLOW_MAX_ATTEMPTS,
    })
}

/// The run a spec starts, with `options` applied (its module snapshot records the
/// run's own time budget).
pub fn run_of(spec: &ChildSpec, options: &RunOptions) -> NewRun {
    let mut definition = spec.definition.clone();
    let timeout_s = options.timeout_s.unwrap_or(spec.timeout_s);
    if let RunDefinition::Module(m) = &mut definition {
        m.timeout_s = timeout_s;
    }
    let mut new = NewRun::new(definition, spec.target.clone(), spec.params.clone(), Some(spec.selector.clone()));
    new.timeout_s = spec.timeout_s;
    new.max_attempts = spec.max_attempts;
    options.apply(new)
}

/// The specs of a campaign's children: one per item, in item order, workflows at
/// their current version (`workflow` finds them).
pub fn child_specs(
    c: &Campaign,
    workflow: impl Fn(&crate::ids::WorkflowId) -> Option<Workflow>,
) -> Result<Vec<ChildSpec>, FieldErrors> {
    let mut specs = Vec::with_capacity(c.items.len());
    let mut errors = FieldErrors::new();
    for (i, item) in c.items.iter().enumerate() {
        let index = i as i32;
        match &item.action {
            ItemAction::Workflow { workflow_id } => match workflow(workflow_id) {
                Some(w) => match workflow_spec(index, &w, &Map::new(), item.device.clone(), &format!("items[{i}]")) {
                    Ok(spec) => specs.push(spec),
                    Err(e) => errors.extend(e),
                },
                None => {
                    errors.insert(format!("items[{i}].workflow_id"), "the workflow no longer exists".into());
                }
            },
            ItemAction::Module { module, params } => match crate::catalog::find(module) {
                Some(m) => specs.push(module_spec(index, m, params.clone(), item.device.clone())),
                None => {
                    errors.insert(format!("items[{i}].module"), format!("unknown module {module:?}"));
                }
            },
        }
    }
    if errors.is_empty() { Ok(specs) } else { Err(errors) }
}

/// A campaign run (created `running`, without a device) for a snapshot.
pub fn campaign_run(snapshot: CampaignSnapshot, options: &RunOptions) -> NewRun {
    let target = snapshot.campaign_id.to_string();
    let mut new = NewRun::new(RunDefinition::Campaign(snapshot), target, Value::Object(Map::new()), None);
    new.timeout_s = CAMPAIGN_TIMEOUT_S;
    new.max_attempts = 1;
    let mut new = options.apply(new);
    new.max_attempts = 1;
    new
}

/// The snapshot a campaign run of `c` starts from.
pub fn campaign_snapshot(c: &Campaign, items: Vec<ChildSpec>) -> CampaignSnapshot {
    CampaignSnapshot {
        campaign_id: c.id,
        name: c.name.clone(),
        version: c.version,
        stop_on_failure: c.stop_on_failure,
        max_parallel: c.max_parallel,
        items,
    }
}

/// A child of campaign run `parent`: held until the campaign admits it. The tick a
/// scheduled campaign fired for belongs to the campaign run, not its children.
pub fn child_run(spec: &ChildSpec, parent: RunId, options: &RunOptions) -> NewRun {
    let own = RunOptions {
        priority: options.priority,
        trigger: options.trigger,
        schedule_id: options.schedule_id,
        ..RunOptions::default()
    };
    let mut new = run_of(spec, &own);
    new.parent_run_id = Some(parent);
    new.parent_index = Some(spec.index);
    new.held = true;
    new
}

/// A new run of a finished module or workflow run's snapshot (`trigger: retry`).
pub fn retry(original: &Run, idempotency: Option<Idempotency>) -> NewRun {
    let mut new = NewRun::new(
        original.definition.clone(),
        original.target.clone(),
        original.params.clone(),
        original.selector.clone(),
    );
    new.priority = original.priority;
    new.timeout_s = original.timeout_s;
    new.max_attempts = original.max_attempts;
    new.max_queue_wait_s = original.max_queue_wait_s;
    new.trigger = Trigger::Retry;
    new.retry_of = Some(original.id);
    new.idempotency = idempotency;
    new
}
