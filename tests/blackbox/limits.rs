//! Limits (issue 10): rate limits per token and per address, body and header read
//! timeouts, and every refusal in the envelope.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

fn assert_envelope(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], code, "{:?}", r.body);
    assert!(r.body["error"]["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{:?}", r.body);
    assert!(r.body["error"]["message"].as_str().is_some_and(|s| !s.is_empty()), "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_has_its_own_budget_and_429_says_when_to_retry() {
    let env = Env::new();
    let api = env.api(&[
        ("SWITCHBOARD_RATE_LIMIT_PER_S", "1"),
        ("SWITCHBOARD_RATE_LIMIT_BURST", "3"),
        ("SWITCHBOARD_ADDRESS_RATE_LIMIT_PER_S", "0"),
    ]);
    let made = api.post("/api/v1/tokens", json!({"name": "ci", "role": "operator"})).await;
    let ci = made.body["token"].as_str().unwrap().to_string();
    for i in 0..2 {
        assert_eq!(api.get("/api/v1/modules").await.status, 200, "request {i} of the burst");
    }
    let r = api.get("/api/v1/modules").await;
    assert_envelope(&r, 429, "rate_limited");
    assert_eq!(r.body["error"]["details"]["limit"], "token");
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    // Another token is not held back by the first one's burst.
    assert_eq!(api.request("GET", "/api/v1/modules", None, Some(&ci)).await.status, 200);
    // After Retry-After the first one goes on.
    tokio::time::sleep(Duration::from_secs(after)).await;
    assert_eq!(api.get("/api/v1/modules").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_has_a_budget_whatever_its_tokens() {
    let env = Env::new();
    let api = env.api(&[
        ("SWITCHBOARD_RATE_LIMIT_PER_S", "0"),
        ("SWITCHBOARD_ADDRESS_RATE_LIMIT_PER_S", "1"),
        ("SWITCHBOARD_ADDRESS_RATE_LIMIT_BURST", "3"),
    ]);
    // A guesser of tokens spends the address's budget too.
    assert_eq!(api.request("GET", "/api/v1/modules", None, Some("sb_guess")).await.status, 401);
    assert_eq!(api.request("GET", "/health", None, None).await.status, 200);
    assert_eq!(api.get("/api/v1/modules").await.status, 200);
    let r = api.get("/api/v1/modules").await;
    assert_envelope(&r, 429, "rate_limited");
    assert_eq!(r.body["error"]["details"]["limit"], "address");
    assert!(r.headers.contains_key("retry-after"));
}

/// The default is generous: a CI burst of 500 requests at once passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_is_not_throttled_by_default() {
    let env = Env::new();
    let api = env.api(&[]);
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (client, url) = (api.client.clone(), format!("{}/api/v1/modules", api.base));
        burst.spawn(async move { client.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status().as_u16() });
    }
    let statuses = burst.join_all().await;
    let throttled: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(throttled.is_empty(), "{} of 500 refused: {:?}", throttled.len(), throttled.first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_http_layer_are_envelopes() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_MAX_BODY_BYTES", "1024")]);
    // 405, with Allow.
    let r = api.request("DELETE", "/api/v1/modules", None, Some(ADMIN_TOKEN)).await;
    assert_envelope(&r, 405, "method_not_allowed");
    assert!(r.headers.contains_key("allow"), "{:?}", r.headers);
    // Unknown routes, inside and outside /api/v1.
    assert_envelope(&api.get("/api/v1/no-such-thing").await, 404, "not_found");
    assert_envelope(&api.request("GET", "/nope", None, None).await, 404, "not_found");
    // 415.
    let r = api
        .client
        .post(format!("{}/api/v1/devices", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("serial=x")
        .send()
        .await
        .unwrap();
    let r = Resp { status: r.status().as_u16(), headers: r.headers().clone(), body: r.json().await.unwrap() };
    assert_envelope(&r, 415, "unsupported_media_type");
    // 413, announced by Content-Length and sent chunked alike.
    let big = json!({"serial": "x".repeat(4096), "driver": "sim"});
    assert_envelope(&api.post("/api/v1/devices", big.clone()).await, 413, "payload_too_large");
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = big.to_string();
    let chunked = format!(
        "POST /api/v1/devices HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    s.write_all(chunked.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert_eq!(api.get("/api/v1/devices").await.body["items"], json!([]), "nothing was created");
}

/// Reads what the server sends until it closes the connection (or `within` passes).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_in_is_cut_off_with_408() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_BODY_READ_TIMEOUT_S", "1")]);
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/devices HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"serial\": \"slow"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // A byte now and then, never the whole body.
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(b"w").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), trickle).await;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(closed, "the connection is closed after the 408");
    assert!(started.elapsed() < Duration::from_secs(8), "cut off after {:?}", started.elapsed());
    assert_eq!(api.get("/api/v1/devices").await.body["items"], json!([]), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickled_in_are_cut_off() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_HEADER_READ_TIMEOUT_S", "1")]);
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(closed, "a request whose headers never end is dropped");
    assert!(started.elapsed() < Duration::from_secs(6), "dropped after {:?}", started.elapsed());
    // The server is fine.
    assert_eq!(api.request("GET", "/health", None, None).await.status, 200);
}
