//! Domain types shared by every role, with their wire (JSON) and database (text) forms.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::selector::Selector;

/// Declares a string enum with `as_str`, `FromStr`, serde in snake_case and a list of
/// its values (for error messages).
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("must be one of {}, got {:?}", Self::ALL.join(", "), other)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

string_enum!(
    /// Lifecycle of a run. Terminal states never change.
    RunStatus {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Cancelled => "cancelled",
    }
);

impl RunStatus {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

string_enum!(RunKind { Module => "module", Workflow => "workflow", Campaign => "campaign" });
string_enum!(Trigger { Api => "api", Schedule => "schedule", Retry => "retry" });
string_enum!(DeviceStatus { Online => "online", Offline => "offline", Maintenance => "maintenance", Retired => "retired" });
string_enum!(Driver { Sim => "sim", Adb => "adb", Host => "host" });
string_enum!(BreakerState { Closed => "closed", Open => "open", HalfOpen => "half_open" });
string_enum!(
    /// Outcome of one step of a run.
    StepStatus {
        Pending => "pending",
        Running => "running",
        Passed => "passed",
        Failed => "failed",
        Errored => "errored",
        TimedOut => "timed_out",
        Cancelled => "cancelled",
        Skipped => "skipped",
    }
);

/// A device's circuit breaker as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Breaker {
    pub state: BreakerState,
    pub consecutive_failures: i32,
    pub open_until: Option<DateTime<Utc>>,
}

/// Who holds a device, while a run does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub run_id: Uuid,
    pub owner: String,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub id: Uuid,
    pub serial: String,
    pub name: String,
    pub platform: String,
    pub model: Option<String>,
    pub pool: String,
    pub labels: Vec<String>,
    pub driver: Driver,
    pub host_id: Option<Uuid>,
    pub status: DeviceStatus,
    pub breaker: Breaker,
    pub lease: Option<Lease>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One recorded step of a run (a module run has one step, a workflow one per step).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStep {
    pub index: i32,
    pub module: String,
    pub params: Value,
    pub status: StepStatus,
    pub attempt: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<Value>,
    pub error: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: Uuid,
    pub kind: RunKind,
    pub target: String,
    pub definition: Value,
    pub params: Value,
    pub selector: Option<Selector>,
    pub device_id: Option<Uuid>,
    pub status: RunStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub priority: i16,
    pub timeout_s: i32,
    pub trigger: Trigger,
    pub schedule_id: Option<Uuid>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub parent_run_id: Option<Uuid>,
    pub retry_of: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub paused: bool,
    pub not_before: Option<DateTime<Utc>>,
    pub queued_at: DateTime<Utc>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Wall time of the latest attempt, once it finished.
    pub duration_ms: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<Value>,
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<RunStep>>,
    /// For a campaign run: how many children are in each status, and `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An append-only record of something that happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub at: DateTime<Utc>,
    pub run_id: Option<Uuid>,
    pub device_id: Option<Uuid>,
    pub schedule_id: Option<Uuid>,
    pub data: Value,
}

/// Event type names, written once.
pub mod event_types {
    pub const RUN_QUEUED: &str = "run.queued";
    pub const RUN_STARTED: &str = "run.started";
    pub const RUN_STEP: &str = "run.step";
    pub const RUN_FINISHED: &str = "run.finished";
    pub const RUN_WAITING: &str = "run.waiting";
    pub const RUN_REQUEUED: &str = "run.requeued";
    pub const RUN_LATE_WRITE_REFUSED: &str = "run.late_write_refused";
    pub const RUN_PAUSED: &str = "run.paused";
    pub const RUN_RESUMED: &str = "run.resumed";
    pub const RUN_CANCEL_REQUESTED: &str = "run.cancel_requested";
    pub const DEVICE_CREATED: &str = "device.created";
    pub const DEVICE_UPDATED: &str = "device.updated";
    pub const DEVICE_DELETED: &str = "device.deleted";
}
