//! Typed identifiers, and process identities.
//!
//! Every table's id is a newtype (`RunId(Uuid)`, ..., `EventId(i64)`), transparent to
//! Postgres and serde, so a run id can never be passed where a device id is meant.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($($(#[$m:meta])* $name:ident),+ $(,)?) => {$(
        $(#[$m])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, uuid::Error> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    )+};
}

uuid_id!(
    /// A run (module, workflow or campaign run).
    RunId,
    /// A registered device.
    DeviceId,
    /// A workflow definition.
    WorkflowId,
    /// A campaign definition.
    CampaignId,
    /// A cron schedule.
    ScheduleId,
    /// A remote host agent.
    HostId,
    /// A capture (log excerpt) stored with a run.
    CaptureId,
    /// An API token.
    TokenId,
);

/// An event's position in the events table (a sequence: ids only grow).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct EventId(pub i64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The machine's hostname, or `unknown`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// `role@hostname:pid:suffix`, unique per process start. apalis refuses a worker name
/// it has seen recently, and reusing names would defeat orphan recovery.
pub fn process_identity(role: &str) -> String {
    let suffix: String = (0..6).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
    format!("{role}@{}:{}:{suffix}", hostname(), std::process::id())
}
