//! The `host` driver: sends a module execution to the device's host agent over HTTP
//! (the agent runs it with the same `adb` driver code) and maps the answer back. A
//! connection error, a timeout or an agent failure is an infrastructure error; the
//! agent's verdict is kept as the verdict. Every request carries the host's secret,
//! and the agent refuses any request without it. `docs/hosts.md` documents the protocol.

use std::time::Duration;

use futures::{FutureExt, future::BoxFuture};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use switchboard_core::{
    ids::RunId,
    model::HostStatus,
    repo::hosts::{self, Endpoint},
};

use super::{Capture, Driver, DriverError, ModuleCall, Verdict};

/// `POST /v1/execute`: run one module on one of the agent's phones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// The run (for the agent's logs, and `POST /v1/cancel`).
    pub run_id: RunId,
    /// Its attempt.
    pub attempt: i32,
    /// The phone's adb serial.
    pub serial: String,
    /// The module id.
    pub module: String,
    /// Its parameters (the agent validates them again).
    pub params: Value,
    /// The time the module has; the agent stops it then.
    pub timeout_ms: u64,
}

/// What the agent answers to `POST /v1/execute` (always 200 once it ran the module).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecuteResponse {
    /// `passed`, `failed` (verdicts) or `error` (infrastructure).
    pub outcome: String,
    /// The module's result, for a verdict.
    #[serde(default)]
    pub result: Option<Value>,
    /// The error, for `error`.
    #[serde(default)]
    pub error: Option<AgentError>,
    /// Files the module produced.
    #[serde(default)]
    pub captures: Vec<Capture>,
}

/// An infrastructure error as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentError {
    /// `unreachable`, `driver`, `unsupported`, `unknown` or `interrupted`.
    pub kind: String,
    /// Said for people.
    pub message: String,
}

impl AgentError {
    /// The wire form of a driver error.
    pub fn from_driver(e: &DriverError) -> AgentError {
        let kind = match e {
            DriverError::Unreachable(_) => "unreachable",
            DriverError::Unsupported(_) => "unsupported",
            DriverError::Unknown(_) => "unknown",
            DriverError::Interrupted => "interrupted",
            DriverError::Driver(_) | DriverError::Unavailable(_) => "driver",
        };
        let message = match e {
            DriverError::Unreachable(m)
            | DriverError::Unsupported(m)
            | DriverError::Unknown(m)
            | DriverError::Driver(m)
            | DriverError::Unavailable(m) => m.clone(),
            DriverError::Interrupted => "interrupted".into(),
        };
        AgentError { kind: kind.into(), message }
    }

    fn into_driver(self, host: &str) -> DriverError {
        let m = format!("host {host}: {}", self.message);
        match self.kind.as_str() {
            "unreachable" => DriverError::Unreachable(m),
            "unsupported" => DriverError::Unsupported(m),
            "unknown" => DriverError::Unknown(m),
            // The agent stopped it (its shutdown): not the phone's doing.
            "interrupted" => DriverError::Interrupted,
            _ => DriverError::Driver(m),
        }
    }
}

/// `POST /v1/cancel`: stop a run's module if it is still running there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The run.
    pub run_id: RunId,
    /// Its attempt (absent: every attempt of the run running there).
    #[serde(default)]
    pub attempt: Option<i32>,
}

/// The host driver: agents are found in the `hosts` table.
#[derive(Clone)]
pub struct HostDriver {
    pool: PgPool,
    client: reqwest::Client,
    /// The largest answer taken from an agent (its captures are capped again when
    /// stored).
    max_answer: usize,
}

impl HostDriver {
    /// A driver reading hosts from `pool`, taking answers of at most `max_answer` bytes.
    pub fn new(pool: PgPool, max_answer: usize) -> HostDriver {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with default TLS-less settings builds");
        HostDriver { pool, client, max_answer }
    }

    async fn endpoint(&self, call: &ModuleCall<'_>) -> Result<Endpoint, DriverError> {
        let Some(host) = call.device.host_id else {
            return Err(DriverError::Driver(format!("device {} has driver host but no host_id", call.device.serial)));
        };
        let endpoint = hosts::endpoint(&self.pool, host)
            .await
            .map_err(|e| DriverError::Unreachable(format!("cannot look up host {host}: {e}")))?;
        if endpoint.status == HostStatus::Offline {
            return Err(DriverError::Unreachable(format!("host {} is offline", endpoint.name)));
        }
        Ok(endpoint)
    }

    async fn send(&self, call: &ModuleCall<'_>) -> Result<Verdict, DriverError> {
        let ep = self.endpoint(call).await?;
        // Stops the agent's module if this call is dropped (out of time, lease lost)
        // as well as cancelled: the dropped connection stops it too, this says so.
        let mut guard = CancelOnDrop { driver: self, ep: &ep, run_id: call.run_id, attempt: call.attempt, armed: true };
        let result = tokio::select! {
            r = self.exchange(call, &ep) => r,
            _ = call.cancel.cancelled() => Err(DriverError::Interrupted),
        };
        guard.armed = matches!(result, Err(DriverError::Interrupted));
        result
    }

    /// One execute request and its answer.
    async fn exchange(&self, call: &ModuleCall<'_>, ep: &Endpoint) -> Result<Verdict, DriverError> {
        let timeout = call.remaining();
        let body = ExecuteRequest {
            run_id: call.run_id,
            attempt: call.attempt,
            serial: call.device.serial.clone(),
            module: call.module.id.to_string(),
            params: call.params.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let url = format!("{}/v1/execute", ep.url.trim_end_matches('/'));
        let mut sent =
            self.client.post(&url).bearer_auth(&ep.secret).timeout(timeout + Duration::from_secs(5)).json(&body);
        // The agent's spans join the run's trace.
        if let Some(parent) = switchboard_core::telemetry::traceparent() {
            sent = sent.header("traceparent", parent);
        }
        let resp = sent
            .send()
            .await
            .map_err(|e| DriverError::Unreachable(format!("host {} unreachable at {url}: {e}", ep.name)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(refused(&ep.name, status, text.trim()));
        }
        let bytes = read_capped(resp, self.max_answer)
            .await
            .map_err(|e| DriverError::Unreachable(format!("host {}: {e}", ep.name)))?;
        let answer: ExecuteResponse = serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::Driver(format!("host {}: the answer is unreadable: {e}", ep.name)))?;
        for c in answer.captures {
            call.captures.push(c);
        }
        match (answer.outcome.as_str(), answer.result, answer.error) {
            ("passed", Some(r), _) => Ok(Verdict::Passed(r)),
            ("failed", Some(r), _) => Ok(Verdict::Failed(r)),
            ("error", _, Some(e)) => Err(e.into_driver(&ep.name)),
            (other, ..) => Err(DriverError::Driver(format!("host {} answered an unknown outcome {other:?}", ep.name))),
        }
    }

    /// Tells the agent to stop a run's attempt (best effort, in the background).
    fn cancel_remote(&self, ep: &Endpoint, run_id: RunId, attempt: i32) {
        let (client, url, secret) =
            (self.client.clone(), format!("{}/v1/cancel", ep.url.trim_end_matches('/')), ep.secret.clone());
        tokio::spawn(async move {
            let body = CancelRequest { run_id, attempt: Some(attempt) };
            let sent = client.post(&url).bearer_auth(secret).timeout(Duration::from_secs(5)).json(&body).send();
            if let Err(e) = sent.await {
                tracing::debug!(error = %e, "could not tell the agent to cancel");
            }
        });
    }
}

/// Sends `POST /v1/cancel` when the call ends interrupted or is dropped mid-way.
struct CancelOnDrop<'a> {
    driver: &'a HostDriver,
    ep: &'a Endpoint,
    run_id: RunId,
    attempt: i32,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed && tokio::runtime::Handle::try_current().is_ok() {
            self.driver.cancel_remote(self.ep, self.run_id, self.attempt);
        }
    }
}

/// An agent's refusal. Only what says something about the phone counts against it:
/// a refused secret (401) or a stopping or unregistered agent (503) is the agent's
/// state, params it rejects (422) are a version mismatch.
fn refused(host: &str, status: reqwest::StatusCode, text: &str) -> DriverError {
    let m = format!("host {host} answered {status}: {text}");
    match status.as_u16() {
        401 => DriverError::Unavailable(m),
        503 => DriverError::Interrupted,
        400 | 422 => DriverError::Unknown(m),
        _ => DriverError::Driver(m),
    }
}

/// The answer's bytes, at most `max`: an agent cannot make a worker hold more.
async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("the answer was cut: {e}"))? {
        buf.extend_from_slice(&chunk);
        if buf.len() > max {
            return Err(format!("the answer is over {max} bytes"));
        }
    }
    Ok(buf)
}

impl Driver for HostDriver {
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>> {
        async move { self.send(&call).await }.boxed()
    }
}
