//! Device drivers: how a module is carried out on a kind of device.
//!
//! A driver answers a verdict (the module ran: `passed` or `failed`, with a result) or a
//! `DriverError` (infrastructure: the device could not be reached or driven). Only the
//! latter is retried and counts against the device's breaker.
//!
//! This build ships the `sim` driver. Devices registered with `adb` or `host` are
//! accepted by the registry; until their drivers land, running a device module on them
//! ends in an infrastructure error that says so (`sleep` runs everywhere).

pub mod sim;

use std::{collections::HashMap, sync::Arc};

use futures::future::BoxFuture;
use serde_json::Value;
use switchboard_core::{catalog::ModuleSpec, model::{Device, Driver as DriverKind}};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a module reported when it ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed(Value),
    Failed(Value),
}

/// An infrastructure error: the module could not be carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriverError {
    #[error("device unreachable: {0}")]
    Unreachable(String),
    #[error("driver error: {0}")]
    Driver(String),
    #[error("no {0} driver in this build")]
    Unavailable(String),
    #[error("interrupted")]
    Interrupted,
}

impl DriverError {
    pub fn kind(&self) -> &'static str {
        match self {
            DriverError::Unreachable(_) => "device_unreachable",
            DriverError::Driver(_) => "driver_error",
            DriverError::Unavailable(_) => "driver_unavailable",
            DriverError::Interrupted => "interrupted",
        }
    }
}

/// One module invocation.
pub struct ModuleCall<'a> {
    pub run_id: Uuid,
    pub attempt: i32,
    pub device: &'a Device,
    pub module: &'static ModuleSpec,
    pub params: &'a Value,
    /// Cancelled when the run is cancelled, loses its lease or the worker stops.
    pub cancel: CancellationToken,
}

pub trait Driver: Send + Sync {
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>>;
}

/// The drivers this worker has, by device driver kind.
#[derive(Clone, Default)]
pub struct Drivers {
    by_kind: HashMap<DriverKind, Arc<dyn Driver>>,
}

impl Drivers {
    pub fn builtin() -> Drivers {
        let mut by_kind: HashMap<DriverKind, Arc<dyn Driver>> = HashMap::new();
        by_kind.insert(DriverKind::Sim, Arc::new(sim::SimDriver));
        Drivers { by_kind }
    }

    pub fn get(&self, kind: DriverKind) -> Option<Arc<dyn Driver>> {
        self.by_kind.get(&kind).cloned()
    }
}
