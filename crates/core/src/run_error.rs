//! Why a run (or a step) did not succeed, as stored in `runs.error` and shown by the
//! API: a kind from a closed list, a message for people, and where it applies.

use serde::{Deserialize, Serialize};

/// The kinds of run error. Each is written once, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The device did not answer (infrastructure).
    DeviceUnreachable,
    /// The driver failed to carry the module out (infrastructure).
    DriverError,
    /// This deployment has no driver for the device: a configuration error, never
    /// counted against the device.
    DriverUnavailable,
    /// The device offers no way to carry the module out (its Android version, its
    /// permissions): never retried, never counted against the device.
    Unsupported,
    /// The module was interrupted for no recorded reason.
    Interrupted,
    /// The run's or a step's time budget ran out.
    Timeout,
    /// Cancelled by a user or by its campaign.
    Cancelled,
    /// The worker stopped renewing its lease (killed, frozen, cut off).
    LeaseExpired,
    /// This worker no longer holds the run.
    LeaseLost,
    /// Handed back to the queue by a stopping worker.
    WorkerStopping,
    /// It waited for a device longer than its queue-wait limit.
    QueueWaitExceeded,
    /// No device that could ever serve it is left (all deleted or retired).
    Unservable,
    /// Its stored snapshot or selector cannot be read.
    Unreadable,
}

/// A run's or step's error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Said for people.
    pub message: String,
    /// The workflow step it happened in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// The worker involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Why, where the kind needs it (`campaign_cancelled`, `stop_on_failure`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RunError {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RunError {
        RunError { kind, message: message.into(), step: None, worker: None, reason: None }
    }

    /// The same error, naming the worker.
    pub fn by_worker(mut self, worker: &str) -> RunError {
        self.worker = Some(worker.to_string());
        self
    }

    /// The same error, in workflow step `step`.
    pub fn at_step(mut self, step: usize) -> RunError {
        self.step = Some(step as i32);
        self
    }

    /// The same error, with a machine-readable reason.
    pub fn because(mut self, reason: &str) -> RunError {
        self.reason = Some(reason.to_string());
        self
    }

    /// Whether the error says something about the device (the breaker counts it).
    pub fn blames_device(&self) -> bool {
        matches!(self.kind, ErrorKind::DeviceUnreachable | ErrorKind::DriverError | ErrorKind::Timeout)
    }
}
