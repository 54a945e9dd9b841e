//! The request bodies of the API, typed, and how each becomes a core command.
//!
//! Each body is a serde struct of `Field`s (so every bad field is named at once, not
//! only the first); `TryFrom` checks the values with core's validators and builds the
//! command. Nothing here reads the database: what only the database can tell (does
//! the workflow exist, does a device match) is the service's to check.

use serde::Deserialize;
use serde_json::{Map, Value};
use switchboard_core::{
    CoreError, CoreResult, catalog,
    catalog::ModuleSpec,
    cron_expr::{CronExpr, parse_tz},
    definition::{CampaignItem, ItemAction, Target, WorkflowStep},
    error::FieldErrors,
    ids::{CampaignId, HostId, WorkflowId},
    launch::{CAMPAIGN_TIMEOUT_S, Idempotency, RunOptions},
    model::{DeviceStatus, Driver, Misfire, Overlap, Role, RunKind},
    repo::{
        campaigns::{CampaignInput, DEFAULT_MAX_PARALLEL, MAX_ITEMS},
        devices::{DevicePatch, NewDevice, check_sim_metadata},
        hosts::NewHost,
        presence::Listed,
        workflows::{MAX_STEPS, WorkflowInput, check_step},
    },
    selector::Selector,
    service::{MAX_BATCH, NewSchedule, SchedulePatch, StartCampaign, StartItem, StartModule, StartWorkflow},
    validation::{self, Problems},
};
use utoipa::ToSchema;

use crate::extract::{Field, Unknown};

/// A required field accepted without a value: impossible (`Field::required` records a
/// problem whenever it returns nothing), answered as a bug rather than a panic.
fn unchecked(what: &str) -> CoreError {
    CoreError::Internal(format!("{what} was accepted without its required fields"))
}

fn text(field: Field<String>, name: &str, max: usize, p: &mut Problems) -> Option<String> {
    field.optional(name, p).and_then(|s| p.take(validation::text(name, &s, max)))
}

fn selector(value: Value, name: &str, p: &mut Problems) -> Option<Selector> {
    p.take(Selector::parse(name, &value))
}

const SELECTOR_HINT: &str = "{\"id\"}, {\"serial\"} or {\"pool\", \"labels\"}";

fn bounded(field: Field<i64>, name: &str, min: i64, max: i64, p: &mut Problems) -> Option<i32> {
    field.optional(name, p).and_then(|n| p.take(validation::int_in(name, n, min, max))).map(|n| n as i32)
}

/// A start request: what it starts (from the path), its body, and its
/// `Idempotency-Key` header.
#[derive(Debug)]
pub struct Start<T, B> {
    /// The module, workflow or campaign (from the path).
    pub of: T,
    /// The request body.
    pub body: B,
    /// The `Idempotency-Key` header, scoped to the caller and bound to this request.
    pub idempotency: Option<Idempotency>,
}

/// The settings every start body shares.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StartOptions {
    #[serde(default)]
    #[schema(value_type = i64, minimum = 0, maximum = 9, default = 5)]
    priority: Field<i64>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1, maximum = 86400)]
    timeout_s: Field<i64>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1, maximum = 20)]
    max_attempts: Field<i64>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1, maximum = 2592000)]
    max_queue_wait_s: Field<i64>,
}

impl StartOptions {
    const FIELDS: [&'static str; 4] = ["priority", "timeout_s", "max_attempts", "max_queue_wait_s"];

    fn read(self, idempotency: Option<Idempotency>, p: &mut Problems) -> RunOptions {
        RunOptions {
            priority: bounded(self.priority, "priority", 0, 9, p).unwrap_or(5) as i16,
            timeout_s: bounded(self.timeout_s, "timeout_s", 1, 86_400, p),
            max_attempts: bounded(self.max_attempts, "max_attempts", 1, 20, p),
            max_queue_wait_s: bounded(self.max_queue_wait_s, "max_queue_wait_s", 1, 30 * 86_400, p),
            idempotency,
            ..RunOptions::default()
        }
    }
}

fn expected(own: &[&'static str]) -> Vec<&'static str> {
    own.iter().copied().chain(StartOptions::FIELDS).collect()
}

/// `POST /modules/{id}/runs`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"params": {"host": "8.8.8.8", "count": 4}, "device": {"pool": "sim"}, "priority": 7}))]
pub struct ModuleRunBody {
    /// The module's parameters, checked against its schema (GET /modules/{id})
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Field<Value>,
    /// Which device: {"id"}, {"serial"} or {"pool", "labels"?}
    #[serde(default)]
    #[schema(value_type = Selector, required = true)]
    device: Field<Value>,
    #[serde(flatten)]
    options: StartOptions,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<Start<&'static ModuleSpec, ModuleRunBody>> for StartModule {
    type Error = CoreError;
    fn try_from(
        Start { of: module, body: b, idempotency: key }: Start<&'static ModuleSpec, ModuleRunBody>,
    ) -> CoreResult<StartModule> {
        let mut p = Problems::new();
        b.unknown.check(&expected(&["params", "device"]), &mut p);
        let params = b.params.optional("params", &mut p);
        let params = p.take(catalog::validate_params(module, params.as_ref(), "params"));
        let device = b.device.required("device", &mut p, SELECTOR_HINT).and_then(|v| selector(v, "device", &mut p));
        let mut options = b.options.read(key, &mut p);
        p.finish()?;
        options.timeout_s = options.timeout_s.or(Some(module.default_timeout_s));
        let (Some(params), Some(device)) = (params, device) else { return Err(unchecked("a module run")) };
        Ok(StartModule { module, params, device, options })
    }
}

/// `POST /workflows/{id}/runs`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"device": {"pool": "sim", "labels": ["carrier:tmobile"]}, "params": {"host": "1.1.1.1"}}))]
pub struct WorkflowRunBody {
    /// Defaults for every step whose module takes them
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Field<Map<String, Value>>,
    /// Which device: {"id"}, {"serial"} or {"pool", "labels"?}
    #[serde(default)]
    #[schema(value_type = Selector, required = true)]
    device: Field<Value>,
    #[serde(flatten)]
    options: StartOptions,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<Start<WorkflowId, WorkflowRunBody>> for StartWorkflow {
    type Error = CoreError;
    fn try_from(
        Start { of: workflow, body: b, idempotency: key }: Start<WorkflowId, WorkflowRunBody>,
    ) -> CoreResult<StartWorkflow> {
        let mut p = Problems::new();
        b.unknown.check(&expected(&["params", "device"]), &mut p);
        let params = b.params.optional("params", &mut p).unwrap_or_default();
        let device = b.device.required("device", &mut p, SELECTOR_HINT).and_then(|v| selector(v, "device", &mut p));
        let options = b.options.read(key, &mut p);
        p.finish()?;
        let Some(device) = device else { return Err(unchecked("a workflow run")) };
        Ok(StartWorkflow { workflow, params, device, options })
    }
}

/// `POST /runs/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"runs": [
    {"module": "ping", "params": {"host": "8.8.8.8"}, "device": {"pool": "sim"}, "idempotency_key": "ci-4711-ping"},
    {"workflow_id": "5f0c1f2e-8d4b-4a57-9d7e-3b1f0e6a9c21", "device": {"serial": "R58M123"}, "priority": 7}]}))]
pub struct RunBatchBody {
    /// The runs, 1 to 1000: every one is started, or none is
    #[serde(default)]
    #[schema(value_type = Vec<RunBatchItem>, min_items = 1, max_items = 1000)]
    runs: Field<Vec<Value>>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

/// One run of a batch: a module run (`module`) or a workflow run (`workflow_id`),
/// with the fields its own start takes, and its own `idempotency_key`. (The document's
/// view of an item; items are read field by field, so every bad one is named.)
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RunBatchItem {
    /// The module to run (one of `module`, `workflow_id`)
    module: Option<String>,
    /// The workflow to run, at its current version (one of `module`, `workflow_id`)
    workflow_id: Option<WorkflowId>,
    /// Replays this item's first run when the batch is sent again (per token, like the
    /// `Idempotency-Key` header: 1 to 200 characters, kept 24 h)
    idempotency_key: Option<String>,
    /// The module's parameters, or defaults for the workflow's steps
    #[schema(value_type = Object)]
    params: Option<Value>,
    /// Which device: {"id"}, {"serial"} or {"pool", "labels"?}
    device: Selector,
    /// 0 to 9, higher first (default 5)
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<i64>,
    /// Its time budget (seconds), instead of the module's or workflow's
    #[schema(minimum = 1, maximum = 86400)]
    timeout_s: Option<i64>,
    /// Its attempts, instead of the module's or workflow's
    #[schema(minimum = 1, maximum = 20)]
    max_attempts: Option<i64>,
    /// Its queue-wait limit (seconds)
    #[schema(minimum = 1, maximum = 2592000)]
    max_queue_wait_s: Option<i64>,
}

/// A batch as sent by a caller: the body, and whose keys its items carry.
#[derive(Debug)]
pub struct Batch {
    /// The request body.
    pub body: RunBatchBody,
    /// The caller's idempotency scope (its token).
    pub scope: String,
    /// How long an item's key is kept (seconds).
    pub ttl_s: u32,
}

impl TryFrom<Batch> for Vec<StartItem> {
    type Error = CoreError;
    fn try_from(Batch { body, scope, ttl_s }: Batch) -> CoreResult<Vec<StartItem>> {
        let mut p = Problems::new();
        body.unknown.check(&["runs"], &mut p);
        let runs = body.runs.required("runs", &mut p, "a list of 1 to 1000 runs").unwrap_or_default();
        if !p.has("runs") && !(1..=MAX_BATCH).contains(&runs.len()) {
            p.add("runs", format!("must hold 1 to {MAX_BATCH} runs (got {})", runs.len()));
        }
        let runs = if p.has("runs") { Vec::new() } else { runs };
        let mut items = Vec::with_capacity(runs.len());
        for (i, run) in runs.into_iter().enumerate() {
            match batch_item(run, &scope, ttl_s) {
                Ok(item) => items.push(item),
                Err(fields) => p.extend(fields.into_iter().map(|(f, why)| (item_field(i, &f), why)).collect()),
            }
        }
        p.finish()?;
        Ok(items)
    }
}

/// `runs[i].field`, or `runs[i]` for the item itself.
fn item_field(i: usize, field: &str) -> String {
    if field.is_empty() { format!("runs[{i}]") } else { format!("runs[{i}].{field}") }
}

/// One item of a batch, read as its own start's body would be.
fn batch_item(run: Value, scope: &str, ttl_s: u32) -> Result<StartItem, FieldErrors> {
    let one = |f: &str, why: &str| FieldErrors::from([(f.to_string(), why.to_string())]);
    let Value::Object(mut fields) = run else { return Err(one("", "must be an object")) };
    let idempotency = match fields.remove("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if !k.trim().is_empty() && k.len() <= 200 => Some(Idempotency {
            scope: scope.to_string(),
            key: k.trim().to_string(),
            // What the item asks for, its key included, in canonical form.
            fingerprint: switchboard_core::repo::tokens::hash(&format!(
                "runs/batch\n{}",
                Value::Object(fields.clone())
            )),
            ttl_s: i64::from(ttl_s),
        }),
        Some(_) => return Err(one("idempotency_key", "must be 1 to 200 visible ASCII characters")),
    };
    let (module, workflow) = (fields.remove("module"), fields.remove("workflow_id"));
    let fit = |e: serde_json::Error| one("", &format!("does not fit: {e}"));
    match (module, workflow) {
        (Some(Value::String(m)), None) => {
            let module = catalog::find(&m).ok_or_else(|| one("module", &format!("unknown module {m:?}")))?;
            let body = serde_json::from_value::<ModuleRunBody>(Value::Object(fields)).map_err(fit)?;
            StartModule::try_from(Start { of: module, body, idempotency }).map(StartItem::Module).map_err(fields_of)
        }
        (None, Some(Value::String(w))) => {
            let workflow = w.parse::<WorkflowId>().map_err(|_| one("workflow_id", "must be a UUID"))?;
            let body = serde_json::from_value::<WorkflowRunBody>(Value::Object(fields)).map_err(fit)?;
            StartWorkflow::try_from(Start { of: workflow, body, idempotency })
                .map(StartItem::Workflow)
                .map_err(fields_of)
        }
        (Some(_), Some(_)) => Err(one("", "names both a module and a workflow_id: one run is one of them")),
        (Some(_), None) => Err(one("module", "must be a module id (GET /modules)")),
        (None, Some(_)) => Err(one("workflow_id", "must be a UUID")),
        (None, None) => Err(one("", "must name a module or a workflow_id")),
    }
}

/// The field errors of a start's validation (anything else is a bug: no start reads
/// the database while it is parsed).
fn fields_of(e: CoreError) -> FieldErrors {
    match e {
        CoreError::Validation { fields, .. } => fields,
        other => FieldErrors::from([(String::new(), other.to_string())]),
    }
}

/// `POST /campaigns/{id}/runs`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"priority": 6}))]
pub struct CampaignRunBody {
    #[serde(default)]
    #[schema(value_type = i64, minimum = 0, maximum = 9, default = 5)]
    priority: Field<i64>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1, maximum = 2419200)]
    timeout_s: Field<i64>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<Start<CampaignId, CampaignRunBody>> for StartCampaign {
    type Error = CoreError;
    fn try_from(
        Start { of: campaign, body: b, idempotency: key }: Start<CampaignId, CampaignRunBody>,
    ) -> CoreResult<StartCampaign> {
        let mut p = Problems::new();
        b.unknown.check(&["priority", "timeout_s"], &mut p);
        let options = RunOptions {
            priority: bounded(b.priority, "priority", 0, 9, &mut p).unwrap_or(5) as i16,
            timeout_s: bounded(b.timeout_s, "timeout_s", 1, i64::from(CAMPAIGN_TIMEOUT_S) * 4, &mut p),
            idempotency: key,
            ..RunOptions::default()
        };
        p.finish()?;
        Ok(StartCampaign { campaign, options })
    }
}

/// `POST /runs/{id}/retry`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"failed_only": true}))]
pub struct RetryBody {
    /// Campaign runs only: retry only the failed, errored and timed-out children
    #[serde(default)]
    #[schema(value_type = bool, default = false)]
    failed_only: Field<bool>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl RetryBody {
    /// Whether only a campaign's failed children are retried.
    pub fn failed_only(self) -> CoreResult<bool> {
        let mut p = Problems::new();
        self.unknown.check(&["failed_only"], &mut p);
        let failed_only = self.failed_only.optional("failed_only", &mut p).unwrap_or(false);
        p.finish()?;
        Ok(failed_only)
    }
}

const DEVICE_FIELDS: &[&str] =
    &["serial", "name", "platform", "model", "pool", "labels", "driver", "host_id", "status", "metadata"];

/// `POST /devices`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"serial": "R58M42ABCDE", "driver": "sim", "pool": "sim", "labels": ["carrier:tmobile", "5g"]}))]
pub struct DeviceBody {
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    serial: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 64, default = "android", pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    platform: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    model: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 128, default = "default", pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    pool: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    labels: Field<Vec<String>>,
    #[serde(default)]
    #[schema(value_type = Driver, required = true)]
    driver: Field<Driver>,
    /// Required for driver host
    #[serde(default)]
    #[schema(value_type = String, format = Uuid)]
    host_id: Field<HostId>,
    #[serde(default)]
    #[schema(value_type = DeviceStatus)]
    status: Field<DeviceStatus>,
    #[serde(default)]
    #[schema(value_type = Object)]
    metadata: Field<Map<String, Value>>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

fn metadata(field: Field<Map<String, Value>>, p: &mut Problems, patch: bool) -> Option<Value> {
    let value = if patch { field.patch("metadata", p) } else { field.optional("metadata", p) }.map(Value::Object);
    if let Some(m) = &value
        && let Err((f, problem)) = check_sim_metadata(m)
    {
        p.add(f, problem);
    }
    value
}

impl TryFrom<DeviceBody> for NewDevice {
    type Error = CoreError;
    fn try_from(b: DeviceBody) -> CoreResult<NewDevice> {
        let mut p = Problems::new();
        b.unknown.check(DEVICE_FIELDS, &mut p);
        let serial = b.serial.required("serial", &mut p, "").and_then(|s| p.take(validation::text("serial", &s, 128)));
        let name = text(b.name, "name", 200, &mut p);
        let platform = text(b.platform, "platform", 64, &mut p).unwrap_or_else(|| "android".into());
        let model = text(b.model, "model", 200, &mut p);
        let pool = text(b.pool, "pool", 128, &mut p).unwrap_or_else(|| "default".into());
        let labels = b.labels.optional("labels", &mut p).and_then(|l| p.take(validation::labels("labels", &l)));
        let drivers: Vec<&str> = Driver::ALL.iter().map(|d| d.as_str()).collect();
        let driver = b.driver.required("driver", &mut p, &format!("one of {}", drivers.join(", ")));
        let host_id = b.host_id.optional("host_id", &mut p);
        let status = b.status.optional("status", &mut p).unwrap_or(DeviceStatus::Online);
        let metadata = metadata(b.metadata, &mut p, false).unwrap_or_else(|| Value::Object(Map::new()));
        if driver == Some(Driver::Host) && host_id.is_none() && !p.has("host_id") {
            p.add("host_id", "is required for driver host");
        }
        p.finish()?;
        let (Some(serial), Some(driver)) = (serial, driver) else { return Err(unchecked("a device")) };
        Ok(NewDevice {
            name: name.unwrap_or_else(|| serial.clone()),
            serial,
            platform,
            model,
            pool,
            labels: labels.unwrap_or_default(),
            driver,
            host_id,
            status,
            metadata,
        })
    }
}

/// `PATCH /devices/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"status": "maintenance", "status_reason": "SIM swap"}))]
pub struct DevicePatchBody {
    #[serde(default)]
    #[schema(value_type = String, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 64, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    platform: Field<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 200)]
    model: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 128, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    pool: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    labels: Field<Vec<String>>,
    #[serde(default)]
    #[schema(value_type = DeviceStatus)]
    status: Field<DeviceStatus>,
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 500)]
    status_reason: Field<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Uuid)]
    host_id: Field<HostId>,
    #[serde(default)]
    #[schema(value_type = Object)]
    metadata: Field<Map<String, Value>>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<DevicePatchBody> for DevicePatch {
    type Error = CoreError;
    fn try_from(b: DevicePatchBody) -> CoreResult<DevicePatch> {
        let mut p = Problems::new();
        let known = ["name", "platform", "model", "pool", "labels", "status", "status_reason", "host_id", "metadata"];
        b.unknown.check(&known, &mut p);
        let patch_text = |f: Field<String>, name: &str, max: usize, p: &mut Problems| {
            f.patch(name, p).and_then(|s| p.take(validation::text(name, &s, max)))
        };
        let patch = DevicePatch {
            name: patch_text(b.name, "name", 200, &mut p),
            platform: patch_text(b.platform, "platform", 64, &mut p),
            model: b.model.clearable("model", &mut p),
            pool: patch_text(b.pool, "pool", 128, &mut p),
            labels: b.labels.patch("labels", &mut p).and_then(|l| p.take(validation::labels("labels", &l))),
            status: b.status.patch("status", &mut p),
            status_reason: b.status_reason.clearable("status_reason", &mut p).and_then(|r| match r {
                Some(r) => p.take(validation::text("status_reason", &r, 500)).map(Some),
                None => Some(None),
            }),
            host_id: b.host_id.clearable("host_id", &mut p),
            metadata: metadata(b.metadata, &mut p, true),
        };
        p.finish()?;
        Ok(patch)
    }
}

/// `POST /tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "nightly-ci", "role": "operator"}))]
pub struct TokenBody {
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    #[serde(default)]
    #[schema(value_type = Role, required = true)]
    role: Field<Role>,
    #[serde(default)]
    #[schema(value_type = chrono::DateTime<chrono::Utc>)]
    expires_at: Field<chrono::DateTime<chrono::Utc>>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

/// A token to create, validated.
#[derive(Debug)]
pub struct NewToken {
    /// Unique name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it stops working (in the future), if ever.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl TryFrom<TokenBody> for NewToken {
    type Error = CoreError;
    fn try_from(b: TokenBody) -> CoreResult<NewToken> {
        let mut p = Problems::new();
        b.unknown.check(&["name", "role", "expires_at"], &mut p);
        let name = b
            .name
            .required("name", &mut p, "a unique token name")
            .and_then(|n| p.take(validation::text("name", &n, 128)));
        let role = b.role.required("role", &mut p, "viewer, operator or admin");
        let expires_at = b.expires_at.optional("expires_at", &mut p);
        if expires_at.is_some_and(|t| t <= chrono::Utc::now()) {
            p.add("expires_at", "must be in the future");
        }
        p.finish()?;
        let (Some(name), Some(role)) = (name, role) else { return Err(unchecked("a token")) };
        Ok(NewToken { name, role, expires_at })
    }
}

/// The most devices one host report may list.
pub const MAX_REPORTED_DEVICES: usize = 512;

/// Devices a host reports: `[{serial, state?, model?, product?, device?, usb?}]`
/// (`state` defaults to `device`, ready).
fn reported(field: Field<Vec<Value>>, p: &mut Problems) -> Option<Vec<Listed>> {
    let raw = field.optional("devices", p)?;
    if raw.len() > MAX_REPORTED_DEVICES {
        p.add("devices", format!("must list at most {MAX_REPORTED_DEVICES} devices (got {})", raw.len()));
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, v) in raw.into_iter().enumerate() {
        let at = format!("devices[{i}]");
        let mut v = v;
        if let Some(o) = v.as_object_mut() {
            o.entry("state").or_insert_with(|| Value::String("device".into()));
        }
        match serde_json::from_value::<Listed>(v) {
            Ok(l) => {
                let long = [
                    Some(&l.serial),
                    Some(&l.state),
                    l.model.as_ref(),
                    l.product.as_ref(),
                    l.device.as_ref(),
                    l.usb.as_ref(),
                ]
                .into_iter()
                .flatten()
                .any(|t| t.chars().count() > 200 || t.contains('\0'));
                if l.serial.trim().is_empty() || long {
                    p.add(at, "serial must be non-empty, and every field at most 200 characters without NUL");
                } else {
                    out.push(l);
                }
            }
            Err(e) => p.add(at, format!("must be {{serial, state?, model?, product?, device?, usb?}} ({e})")),
        }
    }
    Some(out)
}

/// An agent URL: `http://` or `https://`, no spaces.
fn agent_url(field: Field<String>, p: &mut Problems) -> Option<String> {
    let url = field.required("url", p, "the agent's base URL, http://host:port")?;
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= 2048
        && url.len() > "http://".len()
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        p.add("url", "must be an http:// or https:// URL without spaces, at most 2048 characters");
        return None;
    }
    Some(url)
}

/// `POST /hosts/register`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "bench-3", "url": "http://10.0.4.13:7070", "pool": "bench", "capabilities": ["adb"]}))]
pub struct RegisterBody {
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    /// The agent's base URL, http://host:port
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    url: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    capabilities: Field<Vec<String>>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 128, default = "default", pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    pool: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<Object>, max_items = 512)]
    devices: Field<Vec<Value>>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 64, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    agent_version: Field<String>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

/// A registration: the host, and the devices it sees (`None`: it did not say).
#[derive(Debug)]
pub struct Registration {
    /// The host.
    pub host: NewHost,
    /// Its devices.
    pub devices: Option<Vec<Listed>>,
}

impl RegisterBody {
    /// Validates the body; `timeout_s` is the server's host timeout.
    pub fn into_registration(self, timeout_s: u32) -> CoreResult<Registration> {
        let mut p = Problems::new();
        self.unknown.check(&["name", "url", "capabilities", "pool", "devices", "agent_version"], &mut p);
        let name = self
            .name
            .required("name", &mut p, "a unique host name")
            .and_then(|n| p.take(validation::text("name", &n, 128)));
        let url = agent_url(self.url, &mut p);
        let capabilities = self
            .capabilities
            .optional("capabilities", &mut p)
            .and_then(|c| p.take(validation::labels("capabilities", &c)))
            .unwrap_or_default();
        let pool = text(self.pool, "pool", 128, &mut p).unwrap_or_else(|| "default".into());
        let agent_version = text(self.agent_version, "agent_version", 64, &mut p);
        let devices = reported(self.devices, &mut p);
        p.finish()?;
        let (Some(name), Some(url)) = (name, url) else { return Err(unchecked("a host")) };
        let heartbeat_timeout_s = timeout_s.clamp(1, i32::MAX as u32) as i32;
        Ok(Registration {
            host: NewHost { name, url, capabilities, pool, heartbeat_timeout_s, agent_version },
            devices,
        })
    }
}

/// `POST /hosts/{id}/heartbeat`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"agent_version": "0.1.0", "devices": []}))]
pub struct HeartbeatBody {
    #[serde(default)]
    #[schema(value_type = Vec<Object>, max_items = 512)]
    devices: Field<Vec<Value>>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 64, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    agent_version: Field<String>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

/// A heartbeat: the agent's version, and the devices it sees (`None`: no report).
#[derive(Debug)]
pub struct Heartbeat {
    /// The agent's version.
    pub agent_version: Option<String>,
    /// Its devices.
    pub devices: Option<Vec<Listed>>,
}

impl TryFrom<HeartbeatBody> for Heartbeat {
    type Error = CoreError;
    fn try_from(b: HeartbeatBody) -> CoreResult<Heartbeat> {
        let mut p = Problems::new();
        b.unknown.check(&["devices", "agent_version"], &mut p);
        let agent_version = text(b.agent_version, "agent_version", 64, &mut p);
        let devices = reported(b.devices, &mut p);
        p.finish()?;
        Ok(Heartbeat { agent_version, devices })
    }
}

/// One step of a workflow body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"module": "airplane_mode", "params": {"enabled": true}}))]
pub struct StepBody {
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    module: Field<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Field<Value>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1)]
    timeout_s: Field<i64>,
    #[serde(default)]
    #[schema(value_type = bool, default = false)]
    continue_on_failure: Field<bool>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

fn steps(field: Field<Vec<Value>>, p: &mut Problems) -> Option<Vec<WorkflowStep>> {
    let hint = "a non-empty array of {module, params?, timeout_s?, continue_on_failure?}";
    let raw = field.required("steps", p, hint)?;
    if raw.is_empty() || raw.len() > MAX_STEPS {
        p.add("steps", format!("must hold 1 to {MAX_STEPS} steps (got {})", raw.len()));
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, value) in raw.into_iter().enumerate() {
        let path = format!("steps[{i}]");
        let Ok(b) = serde_json::from_value::<StepBody>(value) else {
            p.add(path, "must be an object {module, params?, timeout_s?, continue_on_failure?}");
            continue;
        };
        let mut own = Problems::new();
        b.unknown.check(&["module", "params", "timeout_s", "continue_on_failure"], &mut own);
        let module = b.module.required("module", &mut own, "");
        let params = b.params.optional("params", &mut own);
        let timeout_s = b.timeout_s.optional("timeout_s", &mut own);
        let continue_on_failure = b.continue_on_failure.optional("continue_on_failure", &mut own).unwrap_or(false);
        p.extend(own.0.into_iter().map(|(f, m)| (format!("{path}.{f}"), m)).collect());
        if let Some(module) = module {
            out.extend(p.take(check_step(&path, &module, params.as_ref(), timeout_s, continue_on_failure)));
        }
    }
    Some(out)
}

/// `POST /workflows`, `PUT /workflows/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "attach-and-ping", "steps": [{"module": "airplane_mode", "params": {"enabled": false}}, {"module": "ping", "params": {"host": "8.8.8.8"}}]}))]
pub struct WorkflowBody {
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    #[serde(default)]
    #[schema(value_type = String)]
    description: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<StepBody>, required = true, min_items = 1)]
    steps: Field<Vec<Value>>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<WorkflowBody> for WorkflowInput {
    type Error = CoreError;
    fn try_from(b: WorkflowBody) -> CoreResult<WorkflowInput> {
        let mut p = Problems::new();
        b.unknown.check(&["name", "description", "steps"], &mut p);
        let name = b.name.required("name", &mut p, "").and_then(|s| p.take(validation::text("name", &s, 200)));
        let description = b.description.optional("description", &mut p).unwrap_or_default();
        let steps = steps(b.steps, &mut p);
        p.finish()?;
        let (Some(name), Some(steps)) = (name, steps) else { return Err(unchecked("a workflow")) };
        Ok(WorkflowInput { name, description, steps })
    }
}

/// One item of a campaign body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"module": "ping", "params": {"host": "8.8.8.8"}, "device": {"pool": "sim"}}))]
pub struct ItemBody {
    /// A workflow to run, or else module and params
    #[serde(default)]
    #[schema(value_type = String, format = Uuid)]
    workflow_id: Field<WorkflowId>,
    #[serde(default)]
    #[schema(value_type = String)]
    module: Field<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Field<Value>,
    /// Which device: {"id"}, {"serial"} or {"pool", "labels"?}
    #[serde(default)]
    #[schema(value_type = Selector, required = true)]
    device: Field<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

fn item(path: &str, b: ItemBody, p: &mut Problems) -> Option<CampaignItem> {
    let mut own = Problems::new();
    b.unknown.check(&["workflow_id", "module", "params", "device"], &mut own);
    let device = b.device.required("device", &mut own, "").and_then(|v| selector(v, "device", &mut own));
    let action = match (b.workflow_id.given(), b.module.given()) {
        (true, true) => {
            own.add("", "give either workflow_id or module, not both");
            None
        }
        (false, false) => {
            own.add("", "needs a workflow_id or a module");
            None
        }
        (true, false) => {
            if b.params.given() {
                own.add("params", "only module items take params");
            }
            b.workflow_id.required("workflow_id", &mut own, "").map(|workflow_id| ItemAction::Workflow { workflow_id })
        }
        (false, true) => b.module.required("module", &mut own, "").and_then(|m| match catalog::find(&m) {
            None => {
                own.add("module", format!("unknown module {m}"));
                None
            }
            Some(spec) => {
                let params = b.params.optional("params", &mut own);
                own.take(catalog::validate_params(spec, params.as_ref(), "params"))
                    .map(|params| ItemAction::Module { module: spec.id.to_string(), params })
            }
        }),
    };
    let named = |f: String| if f.is_empty() { path.to_string() } else { format!("{path}.{f}") };
    p.extend(own.0.into_iter().map(|(f, m)| (named(f), m)).collect::<FieldErrors>());
    Some(CampaignItem { action: action?, device: device? })
}

/// `POST /campaigns`, `PUT /campaigns/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "nightly-ping", "items": [{"module": "ping", "params": {"host": "8.8.8.8"}, "device": {"pool": "sim"}}], "max_parallel": 4}))]
pub struct CampaignBody {
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    #[serde(default)]
    #[schema(value_type = String)]
    description: Field<String>,
    #[serde(default)]
    #[schema(value_type = Vec<ItemBody>, required = true, min_items = 1)]
    items: Field<Vec<Value>>,
    #[serde(default)]
    #[schema(value_type = bool, default = false)]
    stop_on_failure: Field<bool>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 1, maximum = 1000)]
    max_parallel: Field<i64>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

impl TryFrom<CampaignBody> for CampaignInput {
    type Error = CoreError;
    fn try_from(b: CampaignBody) -> CoreResult<CampaignInput> {
        let mut p = Problems::new();
        b.unknown.check(&["name", "description", "items", "stop_on_failure", "max_parallel"], &mut p);
        let name = b.name.required("name", &mut p, "").and_then(|s| p.take(validation::text("name", &s, 200)));
        let description = b.description.optional("description", &mut p).unwrap_or_default();
        let stop_on_failure = b.stop_on_failure.optional("stop_on_failure", &mut p).unwrap_or(false);
        let max_parallel = bounded(b.max_parallel, "max_parallel", 1, 1000, &mut p).unwrap_or(DEFAULT_MAX_PARALLEL);
        let items = b
            .items
            .required("items", &mut p, "a non-empty array of {workflow_id | module + params, device}")
            .and_then(|raw| {
                if raw.is_empty() || raw.len() > MAX_ITEMS {
                    p.add("items", format!("must hold 1 to {MAX_ITEMS} items (got {})", raw.len()));
                    return None;
                }
                let mut items = Vec::with_capacity(raw.len());
                for (i, value) in raw.into_iter().enumerate() {
                    let path = format!("items[{i}]");
                    match serde_json::from_value::<ItemBody>(value) {
                        Ok(b) => items.extend(item(&path, b, &mut p)),
                        Err(_) => p.add(path, "must be an object"),
                    }
                }
                Some(items)
            });
        p.finish()?;
        let (Some(name), Some(items)) = (name, items) else { return Err(unchecked("a campaign")) };
        Ok(CampaignInput { name, description, items, stop_on_failure, max_parallel })
    }
}

/// A schedule's target, as written.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"kind": "module", "id": "ping", "params": {"host": "8.8.8.8"}, "device": {"pool": "sim"}}))]
pub struct TargetBody {
    #[serde(default)]
    #[schema(value_type = RunKind, required = true)]
    kind: Field<RunKind>,
    /// A module id, or a workflow or campaign UUID
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    id: Field<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    params: Field<Value>,
    /// Which device (module and workflow targets): {"id"}, {"serial"} or {"pool", "labels"?}
    #[serde(default)]
    #[schema(value_type = Object)]
    device: Field<Value>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

fn target(value: Value, p: &mut Problems) -> Option<Target> {
    let Ok(b) = serde_json::from_value::<TargetBody>(value) else {
        p.add("target", "must be an object {kind, id, params?, device?}");
        return None;
    };
    let mut own = Problems::new();
    b.unknown.check(&["kind", "id", "params", "device"], &mut own);
    let kind = b.kind.required("kind", &mut own, "module, workflow or campaign");
    let id = b.id.required("id", &mut own, "a module id, or a workflow or campaign UUID");
    let device_given = b.device.given();
    let device = b.device.optional("device", &mut own).and_then(|v| selector(v, "device", &mut own));
    let params_given = b.params.given();
    let params = b.params.optional("params", &mut own);
    let target = match (kind, id) {
        (Some(RunKind::Module), Some(id)) => match catalog::find(&id) {
            None => {
                own.add("id", format!("unknown module {id:?}"));
                None
            }
            Some(m) => own.take(catalog::validate_params(m, params.as_ref(), "params")).and_then(|params| {
                device.clone().map(|device| Target::Module { id: m.id.to_string(), params, device })
            }),
        },
        (Some(RunKind::Workflow), Some(id)) => {
            let wid = id.parse::<WorkflowId>().map_err(|_| own.add("id", "must be the UUID of a workflow")).ok();
            let params = match params {
                None => None,
                Some(Value::Object(m)) => Some(m),
                Some(_) => {
                    own.add("params", "must be an object");
                    None
                }
            };
            wid.zip(device.clone()).map(|(id, device)| Target::Workflow { id, params, device })
        }
        (Some(RunKind::Campaign), Some(id)) => {
            if device_given {
                own.add("device", "a campaign's items name their own devices");
            }
            if params_given {
                own.add("params", "a campaign takes no params");
            }
            id.parse::<CampaignId>()
                .map_err(|_| own.add("id", "must be the UUID of a campaign"))
                .ok()
                .map(|id| Target::Campaign { id })
        }
        _ => None,
    };
    if matches!(kind, Some(RunKind::Module | RunKind::Workflow)) && device.is_none() && !own.has("device") {
        own.add("device", "is required for module and workflow targets");
    }
    p.extend(own.0.into_iter().map(|(f, m)| (format!("target.{f}"), m)).collect());
    target
}

/// `POST /schedules` and `PATCH /schedules/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "nightly-ping", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "target": {"kind": "module", "id": "ping", "params": {"host": "8.8.8.8"}, "device": {"pool": "sim"}}}))]
pub struct ScheduleBody {
    /// Required on create
    #[serde(default)]
    #[schema(value_type = String, max_length = 200, pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    name: Field<String>,
    /// Required on create
    #[serde(default)]
    #[schema(value_type = TargetBody)]
    target: Field<Value>,
    /// Five or six fields (seconds first); required on create
    #[serde(default)]
    #[schema(value_type = String)]
    cron: Field<String>,
    #[serde(default)]
    #[schema(value_type = String, max_length = 64, default = "UTC", pattern = r"^[^\u0000]*\S[^\u0000]*$")]
    timezone: Field<String>,
    #[serde(default)]
    #[schema(value_type = bool, default = true)]
    enabled: Field<bool>,
    #[serde(default)]
    #[schema(value_type = Misfire)]
    misfire: Field<Misfire>,
    #[serde(default)]
    #[schema(value_type = Overlap)]
    overlap: Field<Overlap>,
    #[schema(ignore)]
    #[serde(flatten)]
    unknown: Unknown,
}

const SCHEDULE_FIELDS: &[&str] = &["name", "target", "cron", "timezone", "enabled", "misfire", "overlap"];

fn cron(value: String, p: &mut Problems) -> Option<CronExpr> {
    CronExpr::parse(&value).map_err(|e| p.add("cron", e)).ok()
}

fn timezone(value: String, p: &mut Problems) -> Option<String> {
    let value = p.take(validation::text("timezone", &value, 64))?;
    parse_tz(&value).map_err(|e| p.add("timezone", e)).ok().map(|_| value)
}

impl TryFrom<ScheduleBody> for NewSchedule {
    type Error = CoreError;
    fn try_from(b: ScheduleBody) -> CoreResult<NewSchedule> {
        let mut p = Problems::new();
        b.unknown.check(SCHEDULE_FIELDS, &mut p);
        let name = b.name.required("name", &mut p, "").and_then(|s| p.take(validation::text("name", &s, 200)));
        let cron = b.cron.required("cron", &mut p, "").and_then(|c| cron(c, &mut p));
        let timezone =
            b.timezone.optional("timezone", &mut p).map_or(Some("UTC".to_string()), |tz| timezone(tz, &mut p));
        let target = b
            .target
            .required("target", &mut p, "{kind: module|workflow|campaign, id, params?, device?}")
            .and_then(|t| target(t, &mut p));
        let enabled = b.enabled.optional("enabled", &mut p).unwrap_or(true);
        let misfire = b.misfire.optional("misfire", &mut p).unwrap_or(Misfire::Skip);
        let overlap = b.overlap.optional("overlap", &mut p).unwrap_or(Overlap::Allow);
        p.finish()?;
        let (Some(name), Some(cron), Some(timezone), Some(target)) = (name, cron, timezone, target) else {
            return Err(unchecked("a schedule"));
        };
        Ok(NewSchedule { name, target, cron, timezone, enabled, misfire, overlap })
    }
}

impl TryFrom<ScheduleBody> for SchedulePatch {
    type Error = CoreError;
    fn try_from(b: ScheduleBody) -> CoreResult<SchedulePatch> {
        let mut p = Problems::new();
        b.unknown.check(SCHEDULE_FIELDS, &mut p);
        let patch = SchedulePatch {
            name: b.name.patch("name", &mut p).and_then(|s| p.take(validation::text("name", &s, 200))),
            target: b.target.patch("target", &mut p).and_then(|t| target(t, &mut p)),
            cron: b.cron.patch("cron", &mut p).and_then(|c| cron(c, &mut p)),
            timezone: b.timezone.patch("timezone", &mut p).and_then(|tz| timezone(tz, &mut p)),
            enabled: b.enabled.patch("enabled", &mut p),
            misfire: b.misfire.patch("misfire", &mut p),
            overlap: b.overlap.patch("overlap", &mut p),
        };
        p.finish()?;
        Ok(patch)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(e: CoreError) -> FieldErrors {
        match e {
            CoreError::Validation { fields, .. } => fields,
            other => panic!("not a validation error: {other:?}"),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn every_bad_device_field_is_named_at_once() {
        let e = NewDevice::try_from(parse::<DeviceBody>(json!({"serial": "x", "driver": null}))).unwrap_err();
        assert!(fields(e)["driver"].starts_with("is required"));
        let body = json!({"serial": "x", "driver": "usb", "metadata": {"sim": {"error_rate": 2}}, "colour": 1});
        let f = fields(NewDevice::try_from(parse::<DeviceBody>(body)).unwrap_err());
        assert!(f["driver"].contains("unknown variant"), "{f:?}");
        assert!(f.contains_key("metadata.sim.error_rate"));
        assert!(f["colour"].starts_with("unknown field (expected one of serial"));
        let f = fields(NewDevice::try_from(parse::<DeviceBody>(json!({"serial": 7, "driver": "sim"}))).unwrap_err());
        assert_eq!(f["serial"], "must be a string (got integer `7`)");
        let ok =
            NewDevice::try_from(parse::<DeviceBody>(json!({"serial": "s1", "driver": "sim", "labels": ["b", "a"]})))
                .unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.labels.as_slice(), ok.pool.as_str()),
            ("s1", &["a".to_string(), "b".to_string()][..], "default")
        );
    }

    #[test]
    fn campaign_items_name_their_index() {
        let body = json!({"name": "c", "items": [
            {"module": "ping", "device": {}},
            {"module": "teleport", "device": {"pool": "p"}},
            {"workflow_id": "nope", "device": {"pool": "p"}},
            {"device": {"pool": "p"}},
            {"module": "sleep", "params": {"ms": 5000.0}, "device": {"pool": "p"}},
        ]});
        let f = fields(CampaignInput::try_from(parse::<CampaignBody>(body)).unwrap_err());
        assert!(f.contains_key("items[0].device"), "{f:?}");
        assert!(f.contains_key("items[1].module"));
        assert!(f.contains_key("items[2].workflow_id"));
        assert_eq!(f["items[3]"], "needs a workflow_id or a module");
        assert_eq!(f["items[4].params.ms"], "must be an integer (got a number)");
        let ok = json!({"name": "c", "items": [{"module": "ping", "params": {"count": 1}, "device": {"pool": "lab"}}]});
        let c = CampaignInput::try_from(parse::<CampaignBody>(ok)).unwrap();
        assert_eq!((c.max_parallel, c.stop_on_failure), (DEFAULT_MAX_PARALLEL, false));
    }

    #[test]
    fn schedule_targets_are_checked_by_kind() {
        let body = json!({"name": "s", "cron": "61 * * * *", "timezone": "Mars/Olympus",
            "target": {"kind": "campaign", "id": "nope", "device": {"pool": "p"}}});
        let f = fields(NewSchedule::try_from(parse::<ScheduleBody>(body)).unwrap_err());
        assert!(f["cron"].contains("minute 61 is out of range"), "{f:?}");
        assert!(f["timezone"].contains("unknown time zone"));
        assert_eq!(f["target.device"], "a campaign's items name their own devices");
        assert!(f.contains_key("target.id"));
        let body =
            json!({"name": "s", "cron": "@daily", "target": {"kind": "module", "id": "sleep", "params": {"ms": 1}}});
        let f = fields(NewSchedule::try_from(parse::<ScheduleBody>(body)).unwrap_err());
        assert_eq!(f["target.device"], "is required for module and workflow targets");
        let f = fields(SchedulePatch::try_from(parse::<ScheduleBody>(json!({"enabled": null}))).unwrap_err());
        assert_eq!(f["enabled"], "cannot be null");
    }

    #[test]
    fn start_options_are_bounded() {
        let spec = catalog::find("sleep").unwrap();
        let body = json!({"params": {"ms": 1}, "device": {"pool": "p"}, "priority": 12, "max_queue_wait_s": 0});
        let start = Start { of: spec, body: parse::<ModuleRunBody>(body), idempotency: None };
        let f = fields(StartModule::try_from(start).unwrap_err());
        assert!(f["priority"].contains("between 0 and 9"));
        assert!(f["max_queue_wait_s"].contains("between 1 and"));
    }
}
