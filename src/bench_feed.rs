//! `switchboard bench --feed-clients N`: N WebSocket clients follow the feed on one api
//! process while `--feed-runs` runs go through. Reported, not asserted: whether every
//! client got every event of those runs exactly once and in feed order, the delivery
//! latency (from the event's write, `at`, to its arrival at a client) and the api's
//! RSS with the clients connected.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::bench::{BenchConfig, percentile, rss_kib, start_run, wait_idle};

/// What one client saw: event ids in arrival order, and each delivery's latency (ms),
/// also by event type.
struct Seen {
    ids: Vec<i64>,
    latency_ms: Vec<f64>,
    by_type: std::collections::HashMap<String, Vec<f64>>,
}

/// The fields of an event the measurement reads.
#[derive(serde::Deserialize)]
struct Stamp<'a> {
    id: i64,
    #[serde(rename = "type")]
    kind: &'a str,
    at: &'a str,
}

async fn follow(url: String, token: String, want: usize, deadline: Instant) -> anyhow::Result<Seen> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let mut seen =
        Seen { ids: Vec::with_capacity(want), latency_ms: Vec::with_capacity(want), by_type: Default::default() };
    while seen.ids.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(msg)) = tokio::time::timeout(left, ws.next()).await else { break };
        if let Message::Text(text) = msg? {
            let now = chrono::Utc::now();
            // Only what is measured is parsed: 200 clients share the bench's cores
            // with the api, and a full parse of every event would be measured too.
            let e: Stamp = serde_json::from_str(&text)?;
            let at: chrono::DateTime<chrono::Utc> = e.at.parse()?;
            let ms = (now - at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            seen.latency_ms.push(ms);
            seen.by_type.entry(e.kind.to_string()).or_default().push(ms);
            seen.ids.push(e.id);
        }
    }
    Ok(seen)
}

fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid) as f64 / 1024.0
}

/// Runs the feed measurement against the deployment at `base`.
pub async fn measure(cfg: &BenchConfig, base: &str, token: &str, pool: &PgPool, api_pid: u32) -> anyhow::Result<Value> {
    eprintln!("feed: {} WebSocket clients, {} runs ...", cfg.feed_clients, cfg.feed_runs);
    wait_idle(pool, Duration::from_secs(60)).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    // Every client starts from the same place: the last event there is now.
    let first: Value =
        http.get(format!("{base}/api/v1/events?since=0&limit=1")).bearer_auth(token).send().await?.json().await?;
    let since = head(&http, base, token, first["next_cursor"].as_str().unwrap_or("0")).await?;
    // Each run writes queued, started and finished.
    let want = cfg.feed_runs * 3;
    let url = format!("{}/api/v1/ws?since={since}&topics=runs", base.replace("http://", "ws://"));
    let deadline = Instant::now() + Duration::from_secs(600);
    let clients: Vec<_> =
        (0..cfg.feed_clients).map(|_| tokio::spawn(follow(url.clone(), token.to_string(), want, deadline))).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_mib(api_pid);
    let per_client = cfg.feed_runs / cfg.clients.max(1);
    let mut starters = Vec::new();
    for i in 0..cfg.clients.max(1) {
        let (http, base) = (http.clone(), base.to_string());
        let n = per_client + usize::from(i < cfg.feed_runs % cfg.clients.max(1));
        // Paced: each of the clients starts one run every `clients / rate` seconds.
        let clients = cfg.clients.max(1);
        let pace = (cfg.feed_rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / cfg.feed_rate));
        starters.push(tokio::spawn(async move {
            let mut tick = pace.map(|p| {
                tokio::time::interval_at(tokio::time::Instant::now() + p.mul_f64(i as f64 / clients as f64), p)
            });
            for _ in 0..n {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                start_run(&http, &base).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut rss_peak = rss_idle;
    for s in starters {
        s.await??;
        rss_peak = rss_peak.max(rss_mib(api_pid));
    }
    wait_idle(pool, Duration::from_secs(600)).await?;
    rss_peak = rss_peak.max(rss_mib(api_pid));
    let mut latencies = Vec::new();
    let mut by_type: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut complete = 0;
    let mut reference: Option<Vec<i64>> = None;
    for c in clients {
        let seen = c.await??;
        let unique: HashSet<_> = seen.ids.iter().collect();
        let ordered = seen.ids.windows(2).all(|w| w[0] != w[1]);
        let same = reference.get_or_insert_with(|| seen.ids.clone()) == &seen.ids;
        if seen.ids.len() == want && unique.len() == want && ordered && same {
            complete += 1;
        }
        latencies.extend(seen.latency_ms);
        for (kind, ms) in seen.by_type {
            by_type.entry(kind).or_default().extend(ms);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let by_type: serde_json::Map<String, Value> = by_type
        .into_iter()
        .map(|(kind, mut ms)| {
            ms.sort_by(f64::total_cmp);
            (kind, json!({"p50": percentile(&ms, 0.50), "p99": percentile(&ms, 0.99)}))
        })
        .collect();
    Ok(json!({
        "clients": cfg.feed_clients,
        "runs": cfg.feed_runs,
        "rate_per_s": (cfg.feed_rate > 0.0).then_some(cfg.feed_rate),
        "events_per_client": want,
        "complete": format!("{complete}/{}", cfg.feed_clients),
        "delivery_ms": {"p50": percentile(&latencies, 0.50), "p99": percentile(&latencies, 0.99), "max": latencies.last()},
        "delivery_ms_by_type": by_type,
        "api_rss_mib": rss_peak,
        "api_rss_idle_mib": rss_idle,
    }))
}

/// The feed's head: pages from `from` to the end.
async fn head(http: &reqwest::Client, base: &str, token: &str, from: &str) -> anyhow::Result<String> {
    let mut cursor = from.to_string();
    loop {
        let page: Value = http
            .get(format!("{base}/api/v1/events?since={cursor}&limit=500"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if let Some(next) = page["next_cursor"].as_str() {
            cursor = next.to_string();
        }
        if page["items"].as_array().is_none_or(|i| i.is_empty()) {
            return Ok(cursor);
        }
    }
}
