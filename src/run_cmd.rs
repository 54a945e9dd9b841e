//! `switchboard run module|workflow|campaign NAME_OR_ID`: starts a run for CI, follows
//! it to its end and exits with gcloud-style codes (`junit::exit_code`), writing a
//! JUnit report when asked, whatever the outcome (`docs/reports.md`).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use serde_json::{Value, json};
use switchboard_core::{
    junit::{self, exit},
    model::RunStatus,
};

/// What `switchboard run` starts.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A module of the catalog (by id: `ping`).
    Module,
    /// A workflow (by name or id).
    Workflow,
    /// A campaign (by name or id).
    Campaign,
}

/// Settings of `switchboard run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// What to run.
    #[arg(value_enum)]
    pub what: Target,
    /// Its name or id: a UUID is an id, anything else a name.
    pub name_or_id: String,
    /// The device: a selector as JSON (`{"pool": "lab", "labels": ["5g"]}`), or a serial.
    #[arg(long)]
    pub device: Option<String>,
    /// Parameters as a JSON object.
    #[arg(long)]
    pub params: Option<String>,
    /// Follow the run to its end (the default; kept for scripts that say it).
    #[arg(long)]
    pub wait: bool,
    /// Print the run id and exit 0 without following it.
    #[arg(long = "async", conflicts_with = "wait")]
    pub no_wait: bool,
    /// Stop waiting after this long (`90s`, `30m`, `2h`) and exit 15; the run goes on.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Write the run's JUnit XML report here, whatever the outcome.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// The run's priority (0 to 9).
    #[arg(long)]
    pub priority: Option<u8>,
    /// The API's root URL.
    #[arg(long, env = "SWITCHBOARD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API token (the operator role).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// `3s`, `30m`, `2h`, `1d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: a number and s, m, h or d, e.g. 30m");
    let unit = match s.chars().last().ok_or_else(bad)? {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(unit).filter(|secs| *secs > 0).map(Duration::from_secs).ok_or_else(bad)
}

/// A failure with the exit code it earns.
struct Exit(i32, String);

impl From<reqwest::Error> for Exit {
    fn from(e: reqwest::Error) -> Exit {
        Exit(exit::UNREACHABLE, format!("cannot reach the API: {e}"))
    }
}

/// Runs the command; returns the process's exit code.
pub async fn run(cfg: RunConfig) -> i32 {
    match start_and_follow(&cfg).await {
        Ok(code) => code,
        Err(Exit(code, message)) => {
            eprintln!("switchboard run: {message}");
            code
        }
    }
}

async fn start_and_follow(cfg: &RunConfig) -> Result<i32, Exit> {
    let api =
        Api { http: reqwest::Client::new(), base: cfg.url.trim_end_matches('/').to_string(), token: cfg.token.clone() };
    let body = request_body(cfg)?;
    let id = resolve(&api, cfg.what, &cfg.name_or_id).await?;
    let path = match cfg.what {
        Target::Module => format!("/api/v1/modules/{id}/runs"),
        Target::Workflow => format!("/api/v1/workflows/{id}/runs"),
        Target::Campaign => format!("/api/v1/campaigns/{id}/runs"),
    };
    let run = api.send(api.http.post(api.url(&path)).json(&body)).await?;
    let run_id = run["id"].as_str().ok_or_else(|| Exit(exit::UNREACHABLE, format!("no run id in {run}")))?.to_string();
    if cfg.no_wait {
        println!("{run_id}");
        return Ok(exit::PASSED);
    }
    eprintln!("switchboard run: {run_id} queued");
    let ended = follow(&api, &run_id, cfg.timeout).await?;
    let report = match &cfg.junit {
        Some(file) => write_junit(&api, &run_id, file).await,
        None => Ok(()),
    };
    let code = match &ended {
        Some(run) => outcome_code(run),
        None => {
            let waited = cfg.timeout.map(|t| format!("{} s", t.as_secs())).unwrap_or_default();
            eprintln!("switchboard run: stopped waiting after {waited}; the run goes on: {run_id}");
            exit::WAIT_TIMED_OUT
        }
    };
    if let Some(run) = &ended {
        eprintln!("switchboard run: {run_id} {}", run["status"].as_str().unwrap_or("?"));
    }
    match report {
        Err(Exit(c, message)) if code == exit::PASSED => Err(Exit(c, message)),
        Err(Exit(_, message)) => {
            eprintln!("switchboard run: {message}");
            Ok(code)
        }
        Ok(()) => Ok(code),
    }
}

/// The start request's body, from the flags.
fn request_body(cfg: &RunConfig) -> Result<Value, Exit> {
    let usage = |m: String| Exit(2, m);
    let mut body = json!({});
    if let Some(p) = &cfg.params {
        let params: Value = serde_json::from_str(p).map_err(|e| usage(format!("--params is not JSON: {e}")))?;
        if !params.is_object() {
            return Err(usage("--params must be a JSON object".into()));
        }
        body["params"] = params;
    }
    match (&cfg.device, cfg.what) {
        (Some(_), Target::Campaign) => {
            return Err(usage("--device does not apply to a campaign: its items name their devices".into()));
        }
        (None, Target::Module | Target::Workflow) => {
            return Err(usage("--device is needed: a serial, or a selector as JSON".into()));
        }
        (Some(d), _) if d.trim_start().starts_with('{') => {
            body["device"] = serde_json::from_str(d).map_err(|e| usage(format!("--device is not JSON: {e}")))?;
        }
        (Some(serial), _) => body["device"] = json!({"serial": serial}),
        (None, Target::Campaign) => {}
    }
    if let Some(p) = cfg.priority {
        body["priority"] = json!(p);
    }
    Ok(body)
}

/// The target's id: a module's id is its name; a UUID is an id; anything else is
/// looked up by name.
async fn resolve(api: &Api, what: Target, name_or_id: &str) -> Result<String, Exit> {
    if what == Target::Module || name_or_id.parse::<uuid::Uuid>().is_ok() {
        return Ok(name_or_id.to_string());
    }
    let list = if what == Target::Workflow { "/api/v1/workflows" } else { "/api/v1/campaigns" };
    let mut cursor: Option<String> = None;
    loop {
        let mut url = api.url(&format!("{list}?limit=500"));
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page = api.send(api.http.get(url)).await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if let Some(found) = items.iter().find(|i| i["name"] == name_or_id) {
            return Ok(found["id"].as_str().unwrap_or_default().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => {
                let what = if what == Target::Workflow { "workflow" } else { "campaign" };
                return Err(Exit(exit::REFUSED, format!("no {what} is named {name_or_id:?}")));
            }
        }
    }
}

/// Polls the run until it ends (`Some`) or `timeout` runs out (`None`), saying on
/// stderr when its status changes.
async fn follow(api: &Api, id: &str, timeout: Option<Duration>) -> Result<Option<Value>, Exit> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last = String::new();
    loop {
        let run = api.send(api.http.get(api.url(&format!("/api/v1/runs/{id}")))).await?;
        let status = run["status"].as_str().unwrap_or_default().to_string();
        if !matches!(status.as_str(), "queued" | "running") {
            return Ok(Some(run));
        }
        if status != last {
            eprintln!("switchboard run: {id} {status}");
            last = status;
        }
        let pause = Duration::from_millis(500);
        if deadline.is_some_and(|d| tokio::time::Instant::now() + pause > d) {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
    }
}

/// The exit code of an ended run: its own status, or its children's for a campaign
/// (with its own, when it timed out or was cancelled as a whole).
fn outcome_code(run: &Value) -> i32 {
    let parse = |s: &str| s.parse::<RunStatus>().ok();
    let own = run["status"].as_str().and_then(parse);
    let mut statuses: Vec<RunStatus> = Vec::new();
    if let Some(children) = run["children"].as_object() {
        for (status, n) in children {
            if let (Some(s), Some(n)) = (parse(status), n.as_i64())
                && n > 0
            {
                statuses.push(s);
            }
        }
        statuses.extend(own.filter(|s| matches!(s, RunStatus::TimedOut | RunStatus::Cancelled | RunStatus::Errored)));
    } else {
        statuses.extend(own);
    }
    junit::exit_code(&statuses)
}

async fn write_junit(api: &Api, id: &str, file: &PathBuf) -> Result<(), Exit> {
    let resp = api.http.get(api.url(&format!("/api/v1/runs/{id}/junit.xml"))).bearer_auth(&api.token).send().await?;
    if !resp.status().is_success() {
        return Err(Exit(exit::REPORT, format!("the API did not give the report: {}", resp.status())));
    }
    let xml = resp.bytes().await?;
    std::fs::write(file, &xml)
        .with_context(|| format!("writing {}", file.display()))
        .map_err(|e| Exit(exit::REPORT, format!("{e:#}")))?;
    eprintln!("switchboard run: wrote {}", file.display());
    Ok(())
}

/// The API, with the token.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends with the token; a 2xx body as JSON, else the envelope's message and the
    /// code it earns (3 refused, 4 the API failing or unreachable).
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Exit> {
        let resp = req.bearer_auth(&self.token).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]["message"].as_str().unwrap_or("no message").to_string();
        let code = if status.is_client_error() { exit::REFUSED } else { exit::UNREACHABLE };
        Err(Exit(code, format!("the API answered {status}: {message}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_their_units() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "3", "0s", "-1m", "1.5h", "3x", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_campaign_exits_with_its_childrens_worst_outcome() {
        let campaign = |children: Value, status: &str| json!({"status": status, "children": children});
        let all = |s: &str| json!({"succeeded": 0, "failed": 0, "errored": 0, "timed_out": 0, "cancelled": 0, s: 2});
        assert_eq!(outcome_code(&campaign(all("succeeded"), "succeeded")), 0);
        assert_eq!(outcome_code(&campaign(all("errored"), "failed")), 20);
        assert_eq!(outcome_code(&campaign(json!({"succeeded": 3, "failed": 1, "errored": 1}), "failed")), 10);
        assert_eq!(outcome_code(&campaign(all("succeeded"), "timed_out")), 15);
        assert_eq!(outcome_code(&json!({"status": "errored"})), 20);
        assert_eq!(outcome_code(&json!({"status": "cancelled"})), 19);
    }
}
