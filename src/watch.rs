//! `switchboard watch`: follows the event feed (`/api/v1/ws`) in a terminal, one line
//! per event. When the connection drops it reconnects with exponential backoff (capped,
//! with jitter) and resumes after the last event it printed, so nothing is printed
//! twice or lost.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// Settings of `switchboard watch`.
#[derive(clap::Args, Debug, Clone)]
pub struct WatchConfig {
    /// The API's base URL.
    #[arg(long, env = "SWITCHBOARD_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API token (the viewer role is enough).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Only this run's events.
    #[arg(long)]
    pub run: Option<uuid::Uuid>,
    /// Only this campaign run's events and its children's.
    #[arg(long)]
    pub campaign: Option<uuid::Uuid>,
    /// Only events about this device.
    #[arg(long)]
    pub device: Option<uuid::Uuid>,
    /// Only events about devices of this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Comma-separated topics: runs, devices, schedules, hosts (default all).
    #[arg(long)]
    pub topics: Option<String>,
    /// Start after this event id (0: from the first event); default: from now on.
    #[arg(long)]
    pub since: Option<i64>,
    /// Print each event as a line of JSON.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// The first and the longest wait between reconnections.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Follows the feed until `count` events were printed (or for ever).
pub async fn run(cfg: WatchConfig) -> anyhow::Result<()> {
    let mut since = cfg.since;
    let mut printed = 0u64;
    let mut failures = 0u32;
    loop {
        match follow(&cfg, &mut since, &mut printed).await {
            Ok(Ended::Done) => return Ok(()),
            Ok(Ended::Dropped(why)) => {
                failures = 0;
                eprintln!("switchboard watch: {why}");
            }
            Err(e) => {
                if let Some(tungstenite::Error::Http(resp)) = e.downcast_ref::<tungstenite::Error>()
                    && matches!(resp.status().as_u16(), 401 | 403)
                {
                    bail!("the API refused the token ({})", resp.status());
                }
                eprintln!("switchboard watch: {e:#}");
            }
        }
        let wait = backoff(failures, fastrand::f64());
        failures = failures.saturating_add(1);
        eprintln!("switchboard watch: reconnecting in {} ms", wait.as_millis());
        tokio::time::sleep(wait).await;
    }
}

enum Ended {
    /// `count` events printed.
    Done,
    /// The connection ended (and why): reconnect.
    Dropped(String),
}

async fn follow(cfg: &WatchConfig, since: &mut Option<i64>, printed: &mut u64) -> anyhow::Result<Ended> {
    let mut req = feed_url(cfg, *since)?.into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {}", cfg.token).parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await?;
    // Without `--since`, the server starts from its head and says where that is: from
    // then on a reconnection resumes there, even before the first event.
    if since.is_none() {
        *since = resp.headers().get("x-feed-cursor").and_then(|v| v.to_str().ok()?.parse().ok());
    }
    eprintln!("switchboard watch: following {} (since {})", cfg.url, since.map_or("now".into(), |s| s.to_string()));
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => {
                let event: Value = serde_json::from_str(&text).context("an event that is not JSON")?;
                println!("{}", if cfg.json { text.to_string() } else { line(&event) });
                if let Some(id) = event["id"].as_i64() {
                    *since = Some(id);
                }
                *printed += 1;
                if cfg.count.is_some_and(|c| *printed >= c) {
                    return Ok(Ended::Done);
                }
            }
            Message::Close(frame) => {
                let why = frame.map_or("closed".into(), |f| format!("closed by the server ({}: {})", f.code, f.reason));
                return Ok(Ended::Dropped(why));
            }
            _ => {}
        }
    }
    Ok(Ended::Dropped("the connection ended".into()))
}

/// The feed's WebSocket URL for these settings, resuming after `since`.
fn feed_url(cfg: &WatchConfig, since: Option<i64>) -> anyhow::Result<String> {
    let base = cfg.url.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        bail!("--url must start with http:// or https:// (got {base:?})");
    };
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(s) = since {
        query.push(("since", s.to_string()));
    }
    for (name, value) in [
        ("run_id", cfg.run.map(|u| u.to_string())),
        ("campaign_id", cfg.campaign.map(|u| u.to_string())),
        ("device_id", cfg.device.map(|u| u.to_string())),
        ("pool", cfg.pool.clone()),
        ("topics", cfg.topics.clone()),
    ] {
        if let Some(v) = value {
            query.push((name, v));
        }
    }
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    Ok(format!("{ws}/api/v1/ws?{}", query.join("&")))
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The wait before reconnection attempt `failures` (0 first): doubling from 250 ms,
/// capped at 15 s, with up to half of it as jitter (`jitter` in 0..1), so a fleet of
/// watchers does not reconnect in step after an api restart.
fn backoff(failures: u32, jitter: f64) -> Duration {
    let full = BACKOFF_BASE.saturating_mul(2u32.saturating_pow(failures.min(16))).min(BACKOFF_MAX);
    full.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
}

/// One event as a line: time, id, type, then what it is about and its main details.
fn line(e: &Value) -> String {
    let mut out = format!(
        "{}  #{:<7} {:<24}",
        e["at"].as_str().unwrap_or("?"),
        e["id"].as_i64().unwrap_or_default(),
        e["type"].as_str().unwrap_or("?")
    );
    for (label, key) in [("run", "run_id"), ("device", "device_id"), ("schedule", "schedule_id"), ("host", "host_id")] {
        if let Some(id) = e[key].as_str() {
            out.push_str(&format!(" {label}={}", &id[..id.len().min(8)]));
        }
    }
    let data = &e["data"];
    for key in ["status", "attempt", "idx", "module", "reason", "duration_ms"] {
        if let Some(v) = data.get(key).filter(|v| !v.is_null()) {
            out.push_str(&format!(" {key}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string)));
        }
    }
    if let Some(m) = data["error"]["message"].as_str() {
        out.push_str(&format!(" error={m:?}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below_it() {
        let ms = |f, j| backoff(f, j).as_millis();
        assert_eq!([ms(0, 0.0), ms(1, 0.0), ms(2, 0.0), ms(5, 0.0)], [250, 500, 1000, 8000]);
        assert_eq!(ms(6, 0.0), 15_000);
        assert_eq!(ms(u32::MAX, 0.0), 15_000);
        assert_eq!(ms(1, 1.0), 250, "at most half taken off");
    }

    #[test]
    fn a_line_says_what_and_about_what() {
        let e = serde_json::json!({"id": 42, "type": "run.finished", "at": "2026-12-02T06:00:00Z",
            "run_id": "0a1b2c3d-0000-0000-0000-000000000000", "device_id": null,
            "data": {"status": "failed", "attempt": 1, "error": {"message": "100% packet loss"}}});
        let l = line(&e);
        assert!(l.starts_with("2026-12-02T06:00:00Z  #42"), "{l}");
        assert!(l.contains("run.finished") && l.contains("run=0a1b2c3d") && !l.contains("device="), "{l}");
        assert!(l.contains("status=failed attempt=1 error=\"100% packet loss\""), "{l}");
    }

    #[test]
    fn the_url_resumes_and_filters() {
        let cfg = WatchConfig {
            url: "https://sb.lab:8443/".into(),
            token: "t".into(),
            run: None,
            campaign: None,
            device: None,
            pool: Some("lab a".into()),
            topics: Some("runs,devices".into()),
            since: None,
            json: false,
            count: None,
        };
        assert_eq!(
            feed_url(&cfg, Some(7)).unwrap(),
            "wss://sb.lab:8443/api/v1/ws?since=7&pool=lab%20a&topics=runs,devices"
        );
        assert_eq!(feed_url(&cfg, None).unwrap(), "wss://sb.lab:8443/api/v1/ws?pool=lab%20a&topics=runs,devices");
        assert!(feed_url(&WatchConfig { url: "sb.lab".into(), ..cfg }, None).is_err());
    }
}
