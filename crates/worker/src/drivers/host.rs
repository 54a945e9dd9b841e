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
            // The agent stopped it (shutdown, its own deadline): the attempt is lost
            // for an infrastructure reason.
            _ => DriverError::Driver(m),
        }
    }
}

/// `POST /v1/cancel`: stop a run's module if it is still running there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The run.
    pub run_id: RunId,
}

/// The host driver: agents are found in the `hosts` table.
#[derive(Clone)]
pub struct HostDriver {
    pool: PgPool,
    client: reqwest::Client,
}

impl HostDriver {
    /// A driver reading hosts from `pool`.
    pub fn new(pool: PgPool) -> HostDriver {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with default TLS-less settings builds");
        HostDriver { pool, client }
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
        let sent =
            self.client.post(&url).bearer_auth(&ep.secret).timeout(timeout + Duration::from_secs(5)).json(&body).send();
        let resp = tokio::select! {
            r = sent => r,
            _ = call.cancel.cancelled() => {
                self.cancel_remote(&ep, call.run_id);
                return Err(DriverError::Interrupted);
            }
        };
        let resp = resp.map_err(|e| DriverError::Unreachable(format!("host {} unreachable at {url}: {e}", ep.name)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(DriverError::Driver(format!("host {} answered {status}: {}", ep.name, text.trim())));
        }
        let answer: ExecuteResponse = tokio::select! {
            a = resp.json() => a.map_err(|e| DriverError::Unreachable(format!("host {}: the answer was cut or unreadable: {e}", ep.name)))?,
            _ = call.cancel.cancelled() => {
                self.cancel_remote(&ep, call.run_id);
                return Err(DriverError::Interrupted);
            }
        };
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

    /// Tells the agent to stop a run's module (best effort, in the background: the
    /// dropped request also stops it).
    fn cancel_remote(&self, ep: &Endpoint, run_id: RunId) {
        let (client, url, secret) =
            (self.client.clone(), format!("{}/v1/cancel", ep.url.trim_end_matches('/')), ep.secret.clone());
        tokio::spawn(async move {
            let sent = client
                .post(&url)
                .bearer_auth(secret)
                .timeout(Duration::from_secs(5))
                .json(&CancelRequest { run_id })
                .send();
            if let Err(e) = sent.await {
                tracing::debug!(error = %e, "could not tell the agent to cancel");
            }
        });
    }
}

impl Driver for HostDriver {
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>> {
        async move { self.send(&call).await }.boxed()
    }
}
