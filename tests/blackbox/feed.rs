//! The event feed (issue 11): `GET /api/v1/events` and the WebSocket deliver every event
//! once, in one order, across out-of-order commits and api restarts.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::harness::*;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &Api, query: &str) -> Socket {
    let url = format!("{}/api/v1/ws?{query}", api.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("websocket").0
}

/// The next event from the socket (answering pings), or `None` on close or timeout.
async fn next_event(ws: &mut Socket, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??.ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).ok(),
            Message::Ping(p) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Every event the HTTP cursor gives from `since` on, following `next_cursor`.
async fn page_all(api: &Api, since: &str, filter: &str) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    let mut cursor = since.to_string();
    loop {
        let r = api.get(&format!("/api/v1/events?since={cursor}&limit=500{filter}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let items = r.body["items"].as_array().unwrap().clone();
        if let Some(next) = r.body["next_cursor"].as_str() {
            cursor = next.to_string();
        }
        if items.is_empty() {
            return (out, cursor);
        }
        out.extend(items);
    }
}

fn ids(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["id"].as_i64().unwrap()).collect()
}

/// Two transactions write events; the one holding the smaller id commits last. A
/// reader paging by id alone would pass it; the feed waits for it and delivers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_with_a_smaller_id_is_not_skipped() {
    let env = Env::new();
    let api = env.api(&[]);
    let (_, start) = page_all(&api, "0", "").await;
    let mut ws = connect(&api, &format!("since={start}")).await;
    let pg = env.pg().await;
    let mut early = pg.begin().await.unwrap();
    let first: i64 =
        sqlx::query_scalar("INSERT INTO events (type, data) VALUES ('device.updated', '{\"n\": 1}') RETURNING id")
            .fetch_one(&mut *early)
            .await
            .unwrap();
    let mut late = pg.begin().await.unwrap();
    let second: i64 =
        sqlx::query_scalar("INSERT INTO events (type, data) VALUES ('device.updated', '{\"n\": 2}') RETURNING id")
            .fetch_one(&mut *late)
            .await
            .unwrap();
    assert!(second > first);
    late.commit().await.unwrap();
    // The second is committed, but the first may still come: neither is served yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seen, _) = page_all(&api, &start, "").await;
    assert!(!ids(&seen).contains(&second), "served {second} while {first} could still commit: {seen:?}");
    assert!(next_event(&mut ws, Duration::from_millis(300)).await.is_none(), "the socket ran ahead");
    early.commit().await.unwrap();
    let (seen, _) = eventually(Duration::from_secs(10), "both events served", || async {
        let (seen, c) = page_all(&api, &start, "").await;
        ids(&seen).contains(&second).then_some((seen, c))
    })
    .await;
    assert_eq!(ids(&seen), vec![first, second], "both, in the order of their transactions");
    let a = next_event(&mut ws, Duration::from_secs(5)).await.expect("first on the socket");
    let b = next_event(&mut ws, Duration::from_secs(5)).await.expect("second on the socket");
    assert_eq!((a["id"].as_i64(), b["id"].as_i64()), (Some(first), Some(second)));
    assert_eq!(a["type"], "device.updated");
}

/// A follower reads the feed while runs flow; its api process is killed and another
/// started; it resumes with `since` and, in the end, has every event exactly once, in
/// the order the HTTP cursor gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_resumes_after_an_api_restart_with_every_event_once_in_order() {
    let env = Env::new();
    let mut api = env.api(&[]);
    let _w = env.worker(FAST);
    api.devices("feed", "lab", 4, json!({})).await;
    let (_, start) = page_all(&api, "0", "").await;
    let mut ws = connect(&api, &format!("since={start}&topics=runs")).await;
    let mut runs = Vec::new();
    for _ in 0..12 {
        runs.push(api.start("sleep", json!({"params": {"ms": 150}, "device": {"pool": "lab"}})).await);
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        got.push(next_event(&mut ws, Duration::from_secs(10)).await.expect("events while runs flow"));
    }
    api.proc.sigkill();
    // Drain what the dead process had already sent.
    while let Some(e) = next_event(&mut ws, Duration::from_millis(500)).await {
        got.push(e);
    }
    let api = env.api(&[]);
    for _ in 0..8 {
        runs.push(api.start("sleep", json!({"params": {"ms": 50}, "device": {"pool": "lab"}})).await);
    }
    let last = got.last().unwrap()["id"].as_i64().unwrap();
    let mut ws = connect(&api, &format!("since={last}&topics=runs")).await;
    for run in &runs {
        api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    }
    let expected = eventually(Duration::from_secs(10), "every run's end served", || async {
        let (all, _) = page_all(&api, &start, "&topics=runs").await;
        (all.iter().filter(|e| e["type"] == "run.finished").count() == runs.len()).then_some(all)
    })
    .await;
    while got.len() < expected.len() {
        match next_event(&mut ws, Duration::from_secs(10)).await {
            Some(e) => got.push(e),
            None => break,
        }
    }
    assert_eq!(ids(&got), ids(&expected), "every event once, in feed order");
    let finished = got.iter().filter(|e| e["type"] == "run.finished").count();
    assert_eq!(finished, runs.len(), "each run's end, once");
    assert!(got.iter().all(|e| e["type"].as_str().unwrap().starts_with("run.")), "topics=runs only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_filters_and_refuses_bad_cursors_and_topics() {
    let env = Env::new();
    let api = env.api(&[]);
    let d = api.device("feed-f-1", "lab", json!({})).await;
    api.device("feed-f-2", "other", json!({})).await;
    // Served once every transaction that began before theirs has ended (the server is
    // shared: other tests' transactions count too).
    eventually(Duration::from_secs(10), "both devices' events served", || async {
        let (all, _) = page_all(&api, "0", "").await;
        (all.iter().filter(|e| e["type"] == "device.created").count() == 2).then_some(())
    })
    .await;
    let (mine, _) = page_all(&api, "0", &format!("&device_id={}", d["id"].as_str().unwrap())).await;
    assert!(!mine.is_empty() && mine.iter().all(|e| e["device_id"] == d["id"]), "{mine:?}");
    let (lab, _) = page_all(&api, "0", "&pool=lab").await;
    assert_eq!(ids(&lab), ids(&mine));
    let (none, _) = page_all(&api, "0", "&topics=schedules").await;
    assert!(none.is_empty());
    let r = api.get("/api/v1/events?topics=runs,bogus").await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (422, Some("validation_failed")), "{:?}", r.body);
    let r = api.get("/api/v1/events?since=999999999").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    // The token may come in the query, for browsers.
    let url = format!("{}/api/v1/ws?since=0&token={ADMIN_TOKEN}", api.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("a token in the query opens the feed");
    assert!(next_event(&mut ws, Duration::from_secs(5)).await.is_some());
    let bad = format!("{}/api/v1/ws?token=wrong", api.base.replace("http://", "ws://"));
    assert!(tokio_tungstenite::connect_async(bad).await.is_err(), "a wrong token opens nothing");
}

/// `switchboard watch` follows one run; its connection is cut twice on the way; it
/// reconnects by itself and prints each of the run's events once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_and_prints_each_event_of_a_run_once() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(FAST);
    api.device("watch-1", "lab", json!({})).await;
    let upstream = api.base.trim_start_matches("http://").to_string();
    let proxy = Proxy::start(&upstream).await;
    // A workflow of six slow steps: events keep coming while the connection is cut.
    let steps: Vec<Value> = (0..6).map(|_| json!({"module": "sleep", "params": {"ms": 400}})).collect();
    let wf = api.post("/api/v1/workflows", json!({"name": "watched", "steps": steps})).await;
    assert_eq!(wf.status, 201, "{:?}", wf.body);
    let run = api
        .post(
            &format!("/api/v1/workflows/{}/runs", wf.body["id"].as_str().unwrap()),
            json!({"device": {"pool": "lab"}}),
        )
        .await;
    let id = run.body["id"].as_str().unwrap().to_string();
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["watch", "--since", "0", "--json", "--run", &id, "--url", &format!("http://127.0.0.1:{}", proxy.port)])
        .env("SWITCHBOARD_TOKEN", ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.restore();
    }
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let expected = eventually(Duration::from_secs(10), "the run's end served", || async {
        let (all, _) = page_all(&api, "0", &format!("&run_id={id}")).await;
        all.iter().any(|e| e["type"] == "run.finished").then_some(all)
    })
    .await;
    // Give it time to print the last events, then stop it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let out = watch.wait_with_output().unwrap();
    let printed: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.matches("reconnecting").count() >= 1, "it never had to reconnect: {stderr}");
    assert!(!stderr.contains(ADMIN_TOKEN), "the token was printed");
    assert_eq!(ids(&printed), ids(&expected), "each event once, in order; stderr: {stderr}");
}

/// Reads the socket to its close frame, counting the events before it.
async fn read_to_close(ws: &mut Socket, within: Duration) -> (Vec<i64>, Option<u16>) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
        match msg {
            Message::Text(t) => got.push(serde_json::from_str::<Value>(&t).unwrap()["id"].as_i64().unwrap()),
            Message::Close(frame) => return (got, frame.map(|f| u16::from(f.code))),
            _ => {}
        }
    }
    (got, None)
}

/// A client that stops reading is closed with 4008 once a send waits past the send
/// timeout: the server never buffers for it beyond one batch. What it did receive is
/// the feed's beginning, in order, so it can resume with `since`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4008_and_can_resume() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_WS_SEND_TIMEOUT_S", "1")]);
    // Far more than socket buffers hold: 20,000 events of 2 kB.
    let pg = env.pg().await;
    sqlx::query(
        "INSERT INTO events (type, data) SELECT 'device.updated', jsonb_build_object('pad', repeat('x', 2000))
         FROM generate_series(1, 20000)",
    )
    .execute(&pg)
    .await
    .unwrap();
    let mut ws = connect(&api, "since=0").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (got, code) = read_to_close(&mut ws, Duration::from_secs(30)).await;
    assert_eq!(code, Some(4008), "closed as too slow after {} events", got.len());
    assert!(!got.is_empty() && got.len() < 20_000, "{} events before the close", got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    // It resumes where it stopped, and reading along, gets the rest.
    let mut ws = connect(&api, &format!("since={}", got.last().unwrap())).await;
    let next = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert!(next["id"].as_i64().unwrap() > *got.last().unwrap());
}

/// A peer that does not answer pings is closed (4001) by the next ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_pong_is_closed() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_WS_PING_S", "1")]);
    let mut ws = connect(&api, "").await;
    // Not reading means not answering the pings.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let (_, code) = read_to_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, Some(4001));
    // One that answers stays.
    let mut ws = connect(&api, "").await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        if let Ok(Some(Ok(Message::Close(f)))) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            panic!("closed although it answered every ping: {f:?}");
        }
    }
}

/// Past `SWITCHBOARD_WS_MAX_CLIENTS` an api process refuses more feed clients (503 with
/// `Retry-After`); on SIGTERM it tells the ones it has to go elsewhere (1001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_capped_and_told_when_the_api_stops() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_WS_MAX_CLIENTS", "1")]);
    let mut first = connect(&api, "").await;
    let url = format!("{}/api/v1/ws", api.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("a second client was let in: {other:?}"),
    }
    api.proc.sigterm();
    let (_, code) = read_to_close(&mut first, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1001));
}
