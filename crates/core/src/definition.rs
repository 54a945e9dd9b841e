//! What runs execute, typed: the snapshot a run is started from (`RunDefinition`), the
//! steps of a workflow, the items of a campaign, the target of a schedule, and the
//! summaries workflows and campaigns end with.
//!
//! These are stored as JSON (`runs.definition`, `workflows.steps`, ...). Reading one
//! that does not fit is an error naming the path that does not (`steps: invalid type`),
//! never a default.

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::{Map, Value};

use crate::{
    catalog,
    ids::{CampaignId, WorkflowId},
    model::{ChildCounts, RunKind},
    selector::Selector,
};

/// Decodes stored JSON, naming the path of the first thing that does not fit.
pub fn from_stored<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
    })
}

/// One step of a workflow, validated against the catalog when the workflow was written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowStep {
    /// The module it runs.
    pub module: String,
    /// Its parameters, defaults filled in.
    pub params: Value,
    /// Its own time budget (seconds); the module's default otherwise.
    #[serde(default)]
    pub timeout_s: Option<i32>,
    /// A failed verdict here does not fail the run.
    #[serde(default)]
    pub continue_on_failure: bool,
}

impl WorkflowStep {
    /// The step's time budget: its own, or its module's default.
    pub fn effective_timeout_s(&self) -> i32 {
        self.timeout_s.unwrap_or_else(|| catalog::find(&self.module).map_or(60, |m| m.default_timeout_s))
    }

    /// Whether the step talks to the device (an unknown module is assumed to).
    pub fn touches_device(&self) -> bool {
        catalog::find(&self.module).is_none_or(|m| m.touches_device)
    }
}

/// The snapshot of a module run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModuleSnapshot {
    /// The module id.
    pub module: String,
    /// Its parameters, defaults filled in.
    pub params: Value,
    /// The run's time budget (seconds).
    pub timeout_s: i32,
}

/// The snapshot of a workflow run: the workflow as it was when the run started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSnapshot {
    /// The workflow.
    pub workflow_id: WorkflowId,
    /// Its name then.
    pub name: String,
    /// Its version then.
    pub version: i32,
    /// Its steps, with the run's params applied.
    pub steps: Vec<WorkflowStep>,
}

/// The snapshot of a campaign run: the campaign's settings and one spec per child.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignSnapshot {
    /// The campaign.
    pub campaign_id: CampaignId,
    /// Its name then.
    pub name: String,
    /// Its version then.
    pub version: i32,
    /// Stop admitting children after the first failure.
    pub stop_on_failure: bool,
    /// Most children running at once.
    pub max_parallel: i32,
    /// One spec per child, in item order.
    pub items: Vec<ChildSpec>,
}

/// What one child of a campaign run executes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChildSpec {
    /// Its item's position in the campaign.
    pub index: i32,
    /// Module or workflow.
    pub kind: RunKind,
    /// Module id or workflow id.
    pub target: String,
    /// The child's own snapshot.
    // A campaign snapshot holds these: `RunDefinition` is collected from `Run` instead.
    #[schema(no_recursion)]
    pub definition: RunDefinition,
    /// The child's params.
    pub params: Value,
    /// The devices it may use.
    pub selector: Selector,
    /// Its time budget (seconds).
    pub timeout_s: i32,
    /// Its attempts.
    pub max_attempts: i32,
}

/// The snapshot a run executes. Stored untagged (the shape names the kind: `module`,
/// `workflow_id` or `campaign_id`), which is also how the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum RunDefinition {
    /// A module run.
    Module(ModuleSnapshot),
    /// A workflow run.
    Workflow(WorkflowSnapshot),
    /// A campaign run.
    Campaign(CampaignSnapshot),
}

impl<'de> Deserialize<'de> for RunDefinition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let has = |key: &str| value.get(key).is_some();
        let parsed = if has("campaign_id") {
            from_stored(value).map(RunDefinition::Campaign)
        } else if has("workflow_id") {
            from_stored(value).map(RunDefinition::Workflow)
        } else if has("module") {
            from_stored(value).map(RunDefinition::Module)
        } else {
            Err("names no module, workflow_id or campaign_id".to_string())
        };
        parsed.map_err(D::Error::custom)
    }
}

impl RunDefinition {
    /// The kind of run this snapshot is for.
    pub fn kind(&self) -> RunKind {
        match self {
            RunDefinition::Module(_) => RunKind::Module,
            RunDefinition::Workflow(_) => RunKind::Workflow,
            RunDefinition::Campaign(_) => RunKind::Campaign,
        }
    }

    /// Whether executing it talks to the device: a run that does not (`sleep`) says
    /// nothing about the device's health, and never probes a breaker.
    pub fn touches_device(&self) -> bool {
        match self {
            RunDefinition::Module(m) => catalog::find(&m.module).is_none_or(|m| m.touches_device),
            RunDefinition::Workflow(w) => w.steps.iter().any(WorkflowStep::touches_device),
            RunDefinition::Campaign(_) => false,
        }
    }
}

/// One item of a campaign definition: what to run, and on which devices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CampaignItem {
    /// A workflow, or a module with params.
    #[serde(flatten)]
    pub action: ItemAction,
    /// The devices it may use.
    pub device: Selector,
}

/// What a campaign item runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ItemAction {
    /// A workflow, at its version when the campaign run starts.
    Workflow {
        /// The workflow.
        workflow_id: WorkflowId,
    },
    /// A module.
    Module {
        /// The module id.
        module: String,
        /// Its parameters, defaults filled in.
        params: Value,
    },
}

/// What a schedule starts. Stored as `{kind, id, params?, device?}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A module run.
    Module {
        /// The module id.
        id: String,
        /// Its parameters, defaults filled in.
        params: Value,
        /// The devices it may use.
        device: Selector,
    },
    /// A workflow run.
    Workflow {
        /// The workflow.
        id: WorkflowId,
        /// Defaults for every step whose module takes them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        params: Option<Map<String, Value>>,
        /// The device it runs on.
        device: Selector,
    },
    /// A campaign run (its items name their devices).
    Campaign {
        /// The campaign.
        id: CampaignId,
    },
}

impl Target {
    /// The kind of run it starts.
    pub fn kind(&self) -> RunKind {
        match self {
            Target::Module { .. } => RunKind::Module,
            Target::Workflow { .. } => RunKind::Workflow,
            Target::Campaign { .. } => RunKind::Campaign,
        }
    }
}

/// The step of a workflow that failed its check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedStep {
    /// Its position.
    pub index: usize,
    /// Its module.
    pub module: String,
    /// The module's result.
    pub result: Value,
}

/// A workflow run's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkflowSummary {
    /// Steps in the workflow.
    pub steps: usize,
    /// Steps that passed.
    pub passed: usize,
    /// Steps that failed under `continue_on_failure`.
    pub tolerated_failures: Vec<usize>,
    /// The step whose failure failed the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<FailedStep>,
}

/// A campaign run's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignSummary {
    /// Children in all.
    pub total: i64,
    /// Children by final status.
    pub counts: ChildCounts,
    /// From the campaign run's start to its end.
    pub duration_ms: Option<i64>,
    /// Whether `stop_on_failure` cut it short.
    pub stopped_on_failure: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_round_trip_and_unreadable_ones_name_the_path() {
        let module = json!({"module": "sleep", "params": {"ms": 1}, "timeout_s": 60});
        let d: RunDefinition = from_stored(module.clone()).unwrap();
        assert_eq!(d.kind(), RunKind::Module);
        assert!(!d.touches_device());
        assert_eq!(serde_json::to_value(&d).unwrap(), module);

        let wf = json!({"workflow_id": uuid::Uuid::nil(), "name": "w", "version": 1, "steps": "garbage"});
        let e = from_stored::<RunDefinition>(wf).unwrap_err();
        assert!(e.contains("steps") && e.contains("invalid type"), "{e}");
        let e = from_stored::<RunDefinition>(json!({"colour": 1})).unwrap_err();
        assert!(e.contains("no module, workflow_id or campaign_id"), "{e}");
    }

    #[test]
    fn targets_keep_their_stored_shape() {
        let t = json!({"kind": "module", "id": "ping", "params": {}, "device": {"pool": "p"}});
        let parsed: Target = from_stored(t.clone()).unwrap();
        assert_eq!(parsed.kind(), RunKind::Module);
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            json!({"kind": "module", "id": "ping", "params": {}, "device": {"pool": "p", "labels": []}})
        );
        let c: Target = from_stored(json!({"kind": "campaign", "id": uuid::Uuid::nil()})).unwrap();
        assert_eq!(c.kind(), RunKind::Campaign);
    }
}
