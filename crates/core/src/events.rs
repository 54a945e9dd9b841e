//! Events: the append-only record of every state change. Their kinds are written once,
//! here; `repo::events` stores and reads them.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{Postgres, postgres::PgTypeInfo};

use crate::ids::{DeviceId, EventId, HostId, RunId, ScheduleId};

macro_rules! event_kinds {
    ($($(#[$m:meta])* $variant:ident => $text:literal),+ $(,)?) => {
        /// What happened. Stored as text (`run.finished`), so new kinds need no migration.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum EventKind {
            $($(#[$m])* #[serde(rename = $text)] $variant),+
        }

        impl EventKind {
            /// Every kind.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),+];

            /// The kind's name (`run.finished`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $text),+
                }
            }
        }

        impl FromStr for EventKind {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(EventKind::$variant),)+
                    other => Err(format!("unknown event type {other:?}")),
                }
            }
        }
    };
}

event_kinds!(
    /// A run was accepted (`queued`).
    RunQueued => "run.queued",
    /// An attempt started on a device.
    RunStarted => "run.started",
    /// A workflow step started or ended.
    RunStep => "run.step",
    /// A run reached its terminal status.
    RunFinished => "run.finished",
    /// An attempt ended and the run went back to the queue (retry, recovery, hand-back).
    RunRequeued => "run.requeued",
    /// A worker that no longer held the run tried to write its outcome (fencing).
    RunLateWriteRefused => "run.late_write_refused",
    /// A workflow was paused.
    RunPaused => "run.paused",
    /// A workflow was resumed.
    RunResumed => "run.resumed",
    /// A running run was asked to stop.
    RunCancelRequested => "run.cancel_requested",
    /// A device was registered.
    DeviceCreated => "device.created",
    /// A device was changed.
    DeviceUpdated => "device.updated",
    /// A device was deleted.
    DeviceDeleted => "device.deleted",
    /// A device's breaker opened.
    DeviceBreakerOpened => "device.breaker_opened",
    /// A device's breaker closed.
    DeviceBreakerClosed => "device.breaker_closed",
    /// A device went offline or came back (discovery, host liveness): `data.status`,
    /// `data.reason`, `data.source`.
    DeviceStatusChanged => "device.status_changed",
    /// A host agent registered (or registered again).
    HostRegistered => "host.registered",
    /// A host's heartbeats came back.
    HostOnline => "host.online",
    /// A host fell silent past its timeout.
    HostOffline => "host.offline",
    /// A host was deleted.
    HostDeleted => "host.deleted",
    /// A schedule tick started a run.
    ScheduleFired => "schedule.fired",
    /// A tick was skipped (overlap).
    ScheduleSkipped => "schedule.skipped",
    /// Ticks were missed while no scheduler ran.
    ScheduleMissed => "schedule.missed",
    /// A tick was kept for when the active run ends (`buffer_one`).
    ScheduleBuffered => "schedule.buffered",
    /// A tick could not fire.
    ScheduleError => "schedule.error",
);

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Written by hand: the derive would not see the names the macro gives each kind. The
/// names are exactly `EventKind::ALL`'s (reading an event of another kind is an error,
/// never an event served with it).
impl utoipa::PartialSchema for EventKind {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(EventKind::ALL.iter().map(|kind| kind.as_str())))
            .description(Some("What happened. Stored as text (`run.finished`), so new kinds need no migration."))
            .into()
    }
}

impl utoipa::ToSchema for EventKind {}

impl sqlx::Type<Postgres> for EventKind {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl sqlx::Encode<'_, Postgres> for EventKind {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
    }
}

impl sqlx::Decode<'_, Postgres> for EventKind {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(s.parse()?)
    }
}

/// Who an event is about.
#[derive(Debug, Default, Clone, Copy)]
pub struct Subject {
    /// The run.
    pub run_id: Option<RunId>,
    /// The device.
    pub device_id: Option<DeviceId>,
    /// The schedule.
    pub schedule_id: Option<ScheduleId>,
    /// The host.
    pub host_id: Option<HostId>,
}

impl Subject {
    /// About a run (on a device, if any).
    pub fn run(run_id: RunId, device_id: Option<DeviceId>) -> Subject {
        Subject { run_id: Some(run_id), device_id, ..Default::default() }
    }

    /// About a device.
    pub fn device(device_id: DeviceId) -> Subject {
        Subject { device_id: Some(device_id), ..Default::default() }
    }

    /// About a host (and one of its devices, if any).
    pub fn host(host_id: HostId, device_id: Option<DeviceId>) -> Subject {
        Subject { host_id: Some(host_id), device_id, ..Default::default() }
    }

    /// About a schedule (and the run it started, if any).
    pub fn schedule(schedule_id: ScheduleId, run_id: Option<RunId>) -> Subject {
        Subject { schedule_id: Some(schedule_id), run_id, ..Default::default() }
    }
}

/// An append-only record of something that happened.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Its position; ids only grow.
    pub id: EventId,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When.
    pub at: DateTime<Utc>,
    /// The run it is about.
    pub run_id: Option<RunId>,
    /// The device it is about.
    pub device_id: Option<DeviceId>,
    /// The schedule it is about.
    pub schedule_id: Option<ScheduleId>,
    /// The host it is about.
    pub host_id: Option<HostId>,
    /// Details, by kind.
    pub data: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), *kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
