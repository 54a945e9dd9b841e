//! Device drivers: how a module is carried out on a kind of device.
//!
//! A driver answers a verdict (the module ran: `passed` or `failed`, with a result) or a
//! `DriverError` (infrastructure: the device could not be reached or driven). Only the
//! latter is retried and counts against the device's breaker.
//!
//! Three drivers: `sim` (simulated phones), `adb` (phones on this machine's adb) and
//! `host` (phones behind a remote `switchboard host-agent`, which runs the same `adb`
//! code). `sleep` runs everywhere without a driver.

pub mod adb;
pub mod host;
pub mod sim;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use switchboard_core::{
    catalog::ModuleSpec,
    ids::RunId,
    model::{Device, Driver as DriverKind},
    run_error::{ErrorKind, RunError},
};
use tokio_util::sync::CancellationToken;

/// What a module reported when it ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The check passed; the module's result.
    Passed(Value),
    /// The check failed (a verdict, never retried); the module's result.
    Failed(Value),
}

/// An infrastructure error: the module could not be carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriverError {
    /// The device did not answer.
    #[error("device unreachable: {0}")]
    Unreachable(String),
    /// The driver failed.
    #[error("driver error: {0}")]
    Driver(String),
    /// This worker has no driver for the device (a configuration error).
    #[error("no {0} driver in this build")]
    Unavailable(String),
    /// The module is not in this worker's catalog (a version mismatch).
    #[error("module {0:?} is not in this worker's catalog")]
    Unknown(String),
    /// The device offers no way to do this (its Android version, its permissions):
    /// not retried, not counted against the device.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The module was interrupted (cancel, lost lease, shutdown).
    #[error("interrupted")]
    Interrupted,
}

impl DriverError {
    /// The run error it is recorded as.
    pub fn to_run_error(&self) -> RunError {
        let kind = match self {
            DriverError::Unreachable(_) => ErrorKind::DeviceUnreachable,
            DriverError::Driver(_) | DriverError::Unknown(_) => ErrorKind::DriverError,
            DriverError::Unavailable(_) => ErrorKind::DriverUnavailable,
            DriverError::Unsupported(_) => ErrorKind::Unsupported,
            DriverError::Interrupted => ErrorKind::Interrupted,
        };
        RunError::new(kind, self.to_string())
    }

    /// Whether another attempt may succeed (on this device after a backoff, or on
    /// another one).
    pub fn retryable(&self) -> bool {
        !matches!(self, DriverError::Unknown(_) | DriverError::Unsupported(_))
    }
}

/// A file a module produced (a logcat excerpt), stored with the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Capture {
    /// Its file name (`logcat-main.txt`).
    pub name: String,
    /// Its media type.
    pub content_type: String,
    /// Its text (captures are text: logs, dumps).
    pub text: String,
    /// Whether it was cut at the capture cap.
    pub truncated: bool,
}

/// Where a module call leaves its captures; the executor stores them with the step.
#[derive(Debug, Clone, Default)]
pub struct Captures(Arc<Mutex<Vec<Capture>>>);

impl Captures {
    /// Keeps a capture.
    pub fn push(&self, c: Capture) {
        if let Ok(mut v) = self.0.lock() {
            v.push(c);
        }
    }

    /// Takes every capture kept so far.
    pub fn take(&self) -> Vec<Capture> {
        self.0.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }
}

/// One module invocation.
pub struct ModuleCall<'a> {
    /// The run.
    pub run_id: RunId,
    /// Its attempt.
    pub attempt: i32,
    /// The leased device.
    pub device: &'a Device,
    /// The module.
    pub module: &'static ModuleSpec,
    /// Its parameters, validated, defaults filled in.
    pub params: &'a Value,
    /// Cancelled when the run is cancelled, loses its lease or the worker stops.
    pub cancel: CancellationToken,
    /// When the module's time is up (the call is dropped then): waits inside a
    /// module (a boot, a delivery report) end a little before, with a verdict.
    pub deadline: tokio::time::Instant,
    /// Where the module leaves its captures.
    pub captures: Captures,
}

impl ModuleCall<'_> {
    /// The time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(tokio::time::Instant::now())
    }
}

/// How a kind of device carries modules out.
pub trait Driver: Send + Sync {
    /// Runs one module call to a verdict or an infrastructure error.
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>>;
}

/// The drivers this worker has, by device driver kind.
#[derive(Clone, Default)]
pub struct Drivers {
    by_kind: HashMap<DriverKind, Arc<dyn Driver>>,
}

impl Drivers {
    /// The drivers of this build: `sim` always, `adb` through the given adb, and
    /// `host` over HTTP to agents found in `pool`'s `hosts` table.
    pub fn new(adb: adb::AdbDriver, hosts: Option<host::HostDriver>) -> Drivers {
        let mut by_kind: HashMap<DriverKind, Arc<dyn Driver>> = HashMap::new();
        by_kind.insert(DriverKind::Sim, Arc::new(sim::SimDriver));
        by_kind.insert(DriverKind::Adb, Arc::new(adb));
        if let Some(h) = hosts {
            by_kind.insert(DriverKind::Host, Arc::new(h));
        }
        Drivers { by_kind }
    }

    /// The driver for a kind of device, if this worker has it.
    pub fn get(&self, kind: DriverKind) -> Option<Arc<dyn Driver>> {
        self.by_kind.get(&kind).cloned()
    }
}

/// `sleep`: waits `ms`, then reports the scripted outcome. Touches no device. Its
/// params were validated when the run was created; params that no longer read are a
/// driver error, never a zero-length sleep.
pub async fn sleep(params: &Value, cancel: CancellationToken) -> Result<Verdict, DriverError> {
    let Some(ms) = params.get("ms").and_then(Value::as_u64) else {
        return Err(DriverError::Driver(format!("sleep: params.ms is not a whole number of milliseconds: {params}")));
    };
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = cancel.cancelled() => return Err(DriverError::Interrupted),
    }
    match params.get("outcome").and_then(Value::as_str) {
        Some("failed") => {
            Ok(Verdict::Failed(json!({"slept_ms": ms, "outcome": "failed", "reason": "scripted failure"})))
        }
        Some("error") => Err(DriverError::Driver("sleep: scripted infrastructure error".into())),
        Some("passed") | None => Ok(Verdict::Passed(json!({"slept_ms": ms, "outcome": "passed"}))),
        Some(other) => Err(DriverError::Driver(format!("sleep: unknown outcome {other:?}"))),
    }
}
