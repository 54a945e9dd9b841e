//! Domain types shared by every role, with their wire (JSON) and database forms.
//!
//! Statuses and kinds are Postgres enum types (migration 0004) mapped to the enums
//! here: they are bound as parameters and decoded from rows, never compared as text.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    definition::RunDefinition,
    ids::{DeviceId, HostId, RunId, ScheduleId},
    run_error::RunError,
    selector::Selector,
};

/// Declares an enum stored as the Postgres enum type `$pg`, with serde in snake_case,
/// `as_str`, `FromStr` (whose error lists the values) and `Display`.
macro_rules! db_enum {
    ($(#[$m:meta])* $name:ident as $pg:tt { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
        )]
        #[serde(rename_all = "snake_case")]
        #[sqlx(type_name = $pg, rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as written on the wire and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(one_of(Self::ALL.iter().map(|v| v.as_str()), other)),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// "must be one of a, b, c (got "x")".
pub(crate) fn one_of<'a>(values: impl Iterator<Item = &'a str>, got: &str) -> String {
    format!("must be one of {} (got {got:?})", values.collect::<Vec<_>>().join(", "))
}

db_enum!(
    /// Lifecycle of a run (`lifecycle` decides every change). Terminal states never change.
    RunStatus as "run_status" {
        /// Waiting for a worker and a device (or for its retry time).
        Queued => "queued",
        /// Leased by a worker (a campaign run: while its children run).
        Running => "running",
        /// The module passed (every step, for a workflow).
        Succeeded => "succeeded",
        /// A verdict: the module ran and its check failed. Never retried.
        Failed => "failed",
        /// An infrastructure error with no attempt left, or a run that can never start.
        Errored => "errored",
        /// The run's (or a step's) time budget ran out.
        TimedOut => "timed_out",
        /// Cancelled by a user, or by its campaign.
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    /// Whether the status is final.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

db_enum!(
    /// What a run executes.
    RunKind as "run_kind" {
        /// One module on one device.
        Module => "module",
        /// Ordered steps on one device.
        Workflow => "workflow",
        /// A batch of child runs over many devices.
        Campaign => "campaign",
    }
);

db_enum!(
    /// What started a run.
    Trigger as "run_trigger" {
        /// A client of the API.
        Api => "api",
        /// A cron schedule (a tick, or its trigger endpoint).
        Schedule => "schedule",
        /// `POST /runs/{id}/retry`.
        Retry => "retry",
    }
);

db_enum!(
    /// Whether a device may be given runs.
    DeviceStatus as "device_status" {
        /// In service.
        Online => "online",
        /// Unreachable for now; runs wait for it.
        Offline => "offline",
        /// Taken out by hand for now; runs wait for it.
        Maintenance => "maintenance",
        /// Gone for good: runs that only it could serve end at once.
        Retired => "retired",
    }
);

impl DeviceStatus {
    /// Whether a device in this status may serve runs, now or later.
    pub fn may_serve(self) -> bool {
        self != DeviceStatus::Retired
    }
}

db_enum!(
    /// Who set a device's status last: discovery and host liveness only move the
    /// devices whose status they set (or that are online).
    StatusSource as "device_status_source" {
        /// An operator (the API), or nobody yet.
        Operator => "operator",
        /// A worker's adb discovery.
        Discovery => "discovery",
        /// Host liveness, or the host agent's own device report.
        Host => "host",
    }
);

db_enum!(
    /// Whether a host agent's heartbeats arrive.
    HostStatus as "host_status" {
        /// Heartbeats arrive.
        Online => "online",
        /// Silent past its timeout (or never heard from).
        Offline => "offline",
    }
);

db_enum!(
    /// How a device is driven.
    Driver as "device_driver" {
        /// A simulated device (`metadata.sim`).
        Sim => "sim",
        /// An Android phone over ADB.
        Adb => "adb",
        /// A device behind a remote host agent.
        Host => "host",
    }
);

db_enum!(
    /// A device's circuit breaker (see `breaker`).
    BreakerState as "breaker_state" {
        /// Runs may use the device.
        Closed => "closed",
        /// No runs until `open_until`; then one probe.
        Open => "open",
        /// The probe is running.
        HalfOpen => "half_open",
    }
);

db_enum!(
    /// Outcome of one step of a run.
    StepStatus as "step_status" {
        /// Not started.
        Pending => "pending",
        /// Executing now.
        Running => "running",
        /// The module passed.
        Passed => "passed",
        /// The module's check failed (a verdict).
        Failed => "failed",
        /// An infrastructure error.
        Errored => "errored",
        /// Its time budget ran out.
        TimedOut => "timed_out",
        /// Interrupted by a cancel (or a stopping worker).
        Cancelled => "cancelled",
        /// Never ran: an earlier step ended the run.
        Skipped => "skipped",
    }
);

db_enum!(
    /// What a schedule does about ticks missed while no scheduler ran.
    Misfire as "schedule_misfire" {
        /// Nothing: missed ticks are recorded, not run.
        Skip => "skip",
        /// One catch-up run for the latest missed tick.
        FireOnce => "fire_once",
    }
);

db_enum!(
    /// What a tick does while the schedule's previous run is still active.
    Overlap as "schedule_overlap" {
        /// Start another run anyway.
        Allow => "allow",
        /// Skip the tick (recorded as an event).
        Skip => "skip",
        /// Keep one tick, started when the active run ends.
        BufferOne => "buffer_one",
    }
);

db_enum!(
    /// What an API token may do, each role including the ones before it (SPEC §4).
    Role as "token_role" {
        /// Read everything.
        Viewer => "viewer",
        /// Read, and start, cancel, retry, pause and resume runs.
        Operator => "operator",
        /// Everything: devices, hosts, definitions, schedules, tokens.
        Admin => "admin",
    }
);

db_enum!(
    /// The role of a Switchboard process.
    ProcessRole as "process_role" {
        /// Serves the HTTP API.
        Api => "api",
        /// Executes runs.
        Worker => "worker",
        /// Fires schedules and reconciles.
        Scheduler => "scheduler",
    }
);

/// A device's circuit breaker as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Breaker {
    /// Closed, open or half-open.
    pub state: BreakerState,
    /// Consecutive infrastructure errors.
    pub consecutive_failures: i32,
    /// While open: when a probe may run.
    pub open_until: Option<DateTime<Utc>>,
}

/// Who holds a device or a run, while a run does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Lease {
    /// The run holding it.
    pub run_id: RunId,
    /// The worker process holding it.
    pub owner: String,
    /// When the lease runs out unless renewed.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A registered device.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Unique serial (the adb serial, for a phone).
    pub serial: String,
    /// Display name.
    pub name: String,
    /// `android`, ...
    pub platform: String,
    /// Model, if known.
    pub model: Option<String>,
    /// The pool it belongs to.
    pub pool: String,
    /// Labels, sorted, for selectors.
    pub labels: Vec<String>,
    /// How it is driven.
    pub driver: Driver,
    /// The host agent it is attached to (`host` driver).
    pub host_id: Option<HostId>,
    /// Whether it may be given runs.
    pub status: DeviceStatus,
    /// Why it has that status, when something other than an operator said so (`not
    /// listed by adb devices`, `host lab-3 is offline`), or the operator's own note.
    pub status_reason: Option<String>,
    /// Who set the status last.
    pub status_source: StatusSource,
    /// Its circuit breaker.
    pub breaker: Breaker,
    /// The run holding it, if any.
    pub lease: Option<Lease>,
    /// Free-form settings (`metadata.sim` for simulated devices).
    pub metadata: Value,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// A remote host agent: a machine with phones plugged in, running `switchboard host-agent`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Host {
    /// Its id.
    pub id: HostId,
    /// Unique name.
    pub name: String,
    /// Where the agent listens (`http://lab-3:7070`); workers send executions there.
    pub url: String,
    /// What it offers (`adb`, ...).
    pub capabilities: Vec<String>,
    /// The pool its reported devices join when they are new.
    pub pool: String,
    /// Whether its heartbeats arrive.
    pub status: HostStatus,
    /// Why it is offline.
    pub status_reason: Option<String>,
    /// Silent this long, it goes offline with its devices.
    pub heartbeat_timeout_s: i32,
    /// Its last heartbeat (or registration).
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// The agent's version, as it said.
    pub agent_version: Option<String>,
    /// When it first registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// One recorded step of a run (a module run has one step, a workflow one per step).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunStep {
    /// Position in the workflow (0 for a module run).
    pub index: i32,
    /// The module it ran.
    pub module: String,
    /// The parameters it ran with.
    pub params: Value,
    /// How it ended (or that it is running).
    pub status: StepStatus,
    /// How many times it has run (a retry resumes at the failed step).
    pub attempt: i32,
    /// When its latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When its latest attempt ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The module's result (verdicts).
    pub result: Option<Value>,
    /// The infrastructure error, timeout or cancellation.
    pub error: Option<RunError>,
}

/// How many children of a campaign run are in each status, and in all.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ChildCounts {
    /// Waiting (admitted or held).
    pub queued: i64,
    /// Running.
    pub running: i64,
    /// Succeeded.
    pub succeeded: i64,
    /// Failed (a verdict).
    pub failed: i64,
    /// Errored.
    pub errored: i64,
    /// Timed out.
    pub timed_out: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Every child.
    pub total: i64,
}

impl ChildCounts {
    /// Adds `n` children in `status`.
    pub fn add(&mut self, status: RunStatus, n: i64) {
        let slot = match status {
            RunStatus::Queued => &mut self.queued,
            RunStatus::Running => &mut self.running,
            RunStatus::Succeeded => &mut self.succeeded,
            RunStatus::Failed => &mut self.failed,
            RunStatus::Errored => &mut self.errored,
            RunStatus::TimedOut => &mut self.timed_out,
            RunStatus::Cancelled => &mut self.cancelled,
        };
        *slot += n;
        self.total += n;
    }

    /// Children that ended failed, errored or timed out.
    pub fn failures(&self) -> i64 {
        self.failed + self.errored + self.timed_out
    }

    /// Children not yet ended.
    pub fn open(&self) -> i64 {
        self.queued + self.running
    }
}

/// One run, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Run {
    /// Its id.
    pub id: RunId,
    /// Module, workflow or campaign.
    pub kind: RunKind,
    /// The module id, or the workflow / campaign id.
    pub target: String,
    /// The snapshot it executes (editing a definition never changes a started run).
    pub definition: RunDefinition,
    /// The parameters it was started with.
    pub params: Value,
    /// Which devices it may use (none for a campaign run).
    pub selector: Option<Selector>,
    /// The device of its latest attempt.
    pub device_id: Option<DeviceId>,
    /// The host agent its device was on when its latest attempt started (`host`
    /// driver), or null.
    pub host_id: Option<HostId>,
    /// Where it is in its lifecycle.
    pub status: RunStatus,
    /// The current (or last) attempt, from 1.
    pub attempt: i32,
    /// Attempts before infrastructure errors make it `errored`.
    pub max_attempts: i32,
    /// 0 to 9, higher first.
    pub priority: i16,
    /// Its time budget (seconds).
    pub timeout_s: i32,
    /// How long it may wait for a device (seconds); `null`: the deployment's limit.
    pub max_queue_wait_s: Option<i32>,
    /// What started it.
    pub trigger: Trigger,
    /// The schedule that started it.
    pub schedule_id: Option<ScheduleId>,
    /// The tick it was started for.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Its campaign run, for a child.
    pub parent_run_id: Option<RunId>,
    /// The run it retries.
    pub retry_of: Option<RunId>,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// A workflow paused between steps.
    pub paused: bool,
    /// Not delivered before this time (a retry backing off).
    pub not_before: Option<DateTime<Utc>>,
    /// When it was accepted (or admitted by its campaign).
    pub queued_at: DateTime<Utc>,
    /// When it was first pushed to the queue.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When its latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it (or its latest attempt) ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Wall time of the latest attempt, once it finished.
    pub duration_ms: Option<i64>,
    /// The module's result, or the workflow's or campaign's summary.
    pub result: Option<Value>,
    /// Why it did not succeed (infrastructure error, timeout, cancellation).
    pub error: Option<RunError>,
    /// The worker holding it, while running.
    pub lease: Option<Lease>,
    /// Its recorded steps (on `GET /runs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<RunStep>>,
    /// For a campaign run: how many children are in each status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<ChildCounts>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// The OpenTelemetry trace it runs in (32 hex digits): the trace of the request
    /// or schedule tick that created it, which the worker's spans join. Null when the
    /// creator was not traced.
    pub trace_id: Option<String>,
    /// The W3C `traceparent` kept with the run, for the worker; not served.
    #[serde(skip)]
    pub traceparent: Option<String>,
}
