//! Issue 3: leases, crash recovery, durable retries, breakers, cancellation, graceful
//! stop, outages and bounded Redis memory, proven with real processes and real faults.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Env, FAST, Proxy, eventually, json_logs, ts, types, with};

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_restarts_on_another_worker_exactly_once() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let mut a = env.worker(&with(FAST, &[("SWITCHBOARD_WORKER_CONCURRENCY", "1")]));
    let device = api.device("dur-kill-1", "lab", json!({})).await;
    let run = api.start("sleep", json!({"params": {"ms": 5000}, "device": {"pool": "lab"}})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "run running", || async {
        (api.run(&id).await["status"] == "running").then_some(())
    })
    .await;
    a.sigkill();
    let _b = env.worker(FAST);

    let run = api.wait_terminal(&id, Duration::from_secs(40)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2);
    let events = api.events(&id).await;
    assert_eq!(count(&events, "run.finished"), 1, "{:?}", types(&events));
    assert_eq!(count(&events, "run.started"), 2);
    let requeued = events.iter().find(|e| e["type"] == "run.requeued").expect("a recovery event");
    assert_eq!(requeued["data"]["reason"], "lease_expired");
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await;
    assert_eq!(d.body["lease"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_cannot_finish_a_run_that_was_reassigned() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let a = env.worker(&with(FAST, &[("SWITCHBOARD_WORKER_CONCURRENCY", "1")]));
    api.device("dur-stop-1", "lab", json!({})).await;
    let run = api.start("sleep", json!({"params": {"ms": 3000}, "device": {"pool": "lab"}})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "run running", || async {
        (api.run(&id).await["status"] == "running").then_some(())
    })
    .await;
    a.sigstop();
    let _b = env.worker(FAST);
    // Reassigned: attempt 2 running on the other worker.
    eventually(Duration::from_secs(30), "reassignment", || async {
        let r = api.run(&id).await;
        (r["attempt"] == 2 && r["status"] == "running").then_some(())
    })
    .await;
    // Let the frozen worker's sleep run out, then wake it: its finish must be refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.sigcont();
    let run = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["attempt"], 2);
    let events = eventually(Duration::from_secs(15), "the refused late write", || async {
        let ev = api.events(&id).await;
        (count(&ev, "run.late_write_refused") >= 1).then_some(ev)
    })
    .await;
    assert_eq!(count(&events, "run.finished"), 1, "{:?}", types(&events));
    let refused = events.iter().find(|e| e["type"] == "run.late_write_refused").unwrap();
    assert_eq!(refused["data"]["attempt"], 1);
    // Still exactly one terminal write a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.run(&id).await["status"], "succeeded");
    assert_eq!(count(&api.events(&id).await, "run.finished"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_losing_every_redis_key() {
    let env = Env::new();
    let api = env.api(&[]);
    api.devices("dur-flush", "lab", 4, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        let run = api.start("sleep", json!({"params": {"ms": 5}, "device": {"pool": "lab"}})).await;
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    let deleted = env.delete_redis_keys().await;
    assert!(deleted > 0, "the pushes should have left keys to delete");
    let _scheduler = env.scheduler(FAST);
    let _w1 = env.worker(FAST);
    let _w2 = env.worker(FAST);
    for id in &ids {
        let run = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infrastructure_errors_retry_with_growing_delays_and_verdicts_do_not() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let _w = env.worker(&with(FAST, &[("SWITCHBOARD_BREAKER_THRESHOLD", "100")]));
    api.device("dur-retry-1", "lab", json!({})).await;

    let run = api
        .start("sleep", json!({"params": {"ms": 10, "outcome": "error"}, "device": {"pool": "lab"}, "max_attempts": 3}))
        .await;
    let id = run["id"].as_str().unwrap();
    let run = api.wait_terminal(id, Duration::from_secs(40)).await;
    assert_eq!(run["status"], "errored", "{run}");
    assert_eq!(run["attempt"], 3);
    assert_eq!(run["error"]["kind"], "driver_error");
    let events = api.events(id).await;
    assert_eq!(count(&events, "run.started"), 3);
    assert_eq!(count(&events, "run.requeued"), 2);
    assert_eq!(count(&events, "run.finished"), 1);
    // Each failed attempt is recorded with its number, device and error.
    let requeues: Vec<&Value> = events.iter().filter(|e| e["type"] == "run.requeued").collect();
    assert_eq!(requeues[0]["data"]["attempt"], 1);
    assert_eq!(requeues[1]["data"]["attempt"], 2);
    assert!(requeues[0]["data"]["device_id"].is_string());
    assert_eq!(requeues[0]["data"]["error"]["kind"], "driver_error");
    // Delays grow: each requeue records its not_before; the second backoff is longer
    // than the first (server-side schedule, not wall-clock luck), and no attempt
    // started before its not_before.
    let starts: Vec<DateTime<Utc>> =
        events.iter().filter(|e| e["type"] == "run.started").map(|e| ts(&e["at"])).collect();
    let delay = |e: &Value| ts(&e["data"]["not_before"]) - ts(&e["at"]);
    let (d1, d2) = (delay(requeues[0]), delay(requeues[1]));
    assert!(d1.num_milliseconds() >= 250, "first backoff {d1}");
    assert!(d2 > d1, "backoff should grow: {d1} then {d2}");
    assert!(starts[1] >= ts(&requeues[0]["data"]["not_before"]));
    assert!(starts[2] >= ts(&requeues[1]["data"]["not_before"]));

    let run = api
        .start(
            "sleep",
            json!({"params": {"ms": 10, "outcome": "failed"}, "device": {"pool": "lab"}, "max_attempts": 3}),
        )
        .await;
    let run = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!((run["status"].as_str(), run["attempt"].as_i64()), (Some("failed"), Some(1)));
}

/// An operator's breaker reset while a run holds the device counts: the run's release
/// decides from the reset breaker, not from the one the run started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_reset_while_a_run_holds_the_device_is_not_overwritten_by_its_release() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let _w = env.worker(&with(FAST, &[("SWITCHBOARD_BREAKER_THRESHOLD", "2")]));
    let dev = api.device("dur-brk-held", "bh", json!({"error_rate": 1.0, "latency_ms": 1500})).await;
    let dev_id = dev["id"].as_str().unwrap().to_string();
    let api = &api;
    let errored = |body: Value| async move {
        let r = api.start("device_info", body).await;
        let id = r["id"].as_str().unwrap().to_string();
        (id.clone(), api.wait_terminal(&id, Duration::from_secs(20)).await)
    };
    let one = json!({"device": {"serial": "dur-brk-held"}, "max_attempts": 1});
    let (_, first) = errored(one.clone()).await;
    assert_eq!(first["status"], "errored");
    let d = api.get(&format!("/api/v1/devices/{dev_id}")).await.body;
    assert_eq!(d["breaker"]["consecutive_failures"], 1, "{d}");

    // A second failing run takes the device; the operator resets the breaker while it
    // runs. Its release counts one failure from zero: closed with 1, not open with 2.
    let second = api.start("device_info", one.clone()).await;
    let second_id = second["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "the second run to start", || async {
        (api.run(&second_id).await["status"] == "running").then_some(())
    })
    .await;
    let r = api.post(&format!("/api/v1/devices/{dev_id}/breaker/reset"), json!({})).await;
    assert_eq!(r.status, 200);
    let second = api.wait_terminal(&second_id, Duration::from_secs(20)).await;
    assert_eq!(second["status"], "errored", "{second}");
    let d = api.get(&format!("/api/v1/devices/{dev_id}")).await.body;
    assert_eq!(d["breaker"], json!({"state": "closed", "consecutive_failures": 1, "open_until": null}), "{d}");

    // Without a reset the next failure counts on: two in a row open it.
    let (_, third) = errored(one).await;
    assert_eq!(third["status"], "errored");
    let d = api.get(&format!("/api/v1/devices/{dev_id}")).await.body;
    assert_eq!(d["breaker"]["state"], "open", "{d}");
    assert_eq!(d["breaker"]["consecutive_failures"], 2, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_trips_its_breaker_gets_one_probe_and_can_be_reset() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let _w =
        env.worker(&with(FAST, &[("SWITCHBOARD_BREAKER_THRESHOLD", "3"), ("SWITCHBOARD_BREAKER_COOLDOWN_S", "3")]));
    let bad = api.device("dur-brk-bad", "bp", json!({"error_rate": 1.0})).await;
    let bad_id = bad["id"].as_str().unwrap().to_string();
    api.device("dur-brk-ok1", "bp", json!({})).await;
    api.device("dur-brk-ok2", "bp", json!({})).await;

    // Three infrastructure errors in a row on the bad device open its breaker.
    for _ in 0..3 {
        let r = api.start("device_info", json!({"device": {"serial": "dur-brk-bad"}, "max_attempts": 1})).await;
        let r = api.wait_terminal(r["id"].as_str().unwrap(), Duration::from_secs(20)).await;
        assert_eq!(r["status"], "errored");
        assert_eq!(r["error"]["kind"], "device_unreachable");
    }
    let d = api.get(&format!("/api/v1/devices/{bad_id}")).await.body;
    assert_eq!(d["breaker"]["state"], "open", "{d}");
    assert_eq!(d["breaker"]["consecutive_failures"], 3);
    let opened_until = ts(&d["breaker"]["open_until"]);

    // While open, pool runs land on the healthy devices only.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            api.start("sleep", json!({"params": {"ms": 20}, "device": {"pool": "bp"}})).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for id in &ids {
        let r = api.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(r["status"], "succeeded");
        if ts(&r["started_at"]) < opened_until {
            assert_ne!(r["device_id"].as_str().unwrap(), bad_id, "an open device got a run");
        }
    }

    // After the cooldown exactly one probe runs; it fails and the breaker re-opens longer.
    tokio::time::sleep((opened_until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(200)).await;
    let probe = api.start("device_info", json!({"device": {"serial": "dur-brk-bad"}, "max_attempts": 1})).await;
    // The second run is started once the first has been claimed, so the first is the
    // probe (two deliveries at once race for the device in either order).
    let probe_id = probe["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "the probe claimed", || async {
        (api.run(&probe_id).await["status"] != "queued").then_some(())
    })
    .await;
    let second = api.start("device_info", json!({"device": {"serial": "dur-brk-bad"}, "max_attempts": 1})).await;
    let probe = api.wait_terminal(probe["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(probe["status"], "errored");
    let d = api.get(&format!("/api/v1/devices/{bad_id}")).await.body;
    assert_eq!(d["breaker"]["state"], "open");
    let reopened_until = ts(&d["breaker"]["open_until"]);
    assert!((reopened_until - ts(&probe["finished_at"])).num_milliseconds() > 4000, "cooldown should double");
    // The other run did not probe alongside: it is still queued, or (on a slow machine)
    // it started only once the doubled cooldown was over.
    let other = api.run(second["id"].as_str().unwrap()).await;
    if other["status"] != "queued" {
        assert!(ts(&other["started_at"]) >= reopened_until, "two probes at once: {other}");
    }

    // Reset closes it, and a waiting run goes at once.
    let r = api.post(&format!("/api/v1/devices/{bad_id}/breaker/reset"), json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["breaker"], json!({"state": "closed", "consecutive_failures": 0, "open_until": null}));
    let third = api.start("sleep", json!({"params": {"ms": 10}, "device": {"serial": "dur-brk-bad"}})).await;
    let third = api.wait_terminal(third["id"].as_str().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(third["status"], "succeeded", "sleep touches no device, so it passes: {third}");
    api.wait_terminal(second["id"].as_str().unwrap(), Duration::from_secs(20)).await;

    let pg = env.pg().await;
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT type FROM events WHERE device_id = $1 AND type LIKE 'device.breaker%' ORDER BY id")
            .bind(uuid::Uuid::parse_str(&bad_id).unwrap())
            .fetch_all(&pg)
            .await
            .unwrap();
    assert_eq!(&kinds[..2], ["device.breaker_opened", "device.breaker_opened"], "{kinds:?}");
    assert!(kinds.contains(&"device.breaker_closed".to_string()), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pool_never_delays_another_pool_and_never_double_books() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "8")]);
    api.devices("dur-pa", "pool-a", 3, json!({})).await;
    api.device("dur-pb-0", "pool-b", json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..24 {
        ids.push(
            api.start("sleep", json!({"params": {"ms": 300}, "device": {"pool": "pool-a"}})).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let other = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "pool-b"}})).await;
    let other = api.wait_terminal(other["id"].as_str().unwrap(), Duration::from_secs(10)).await;
    let waited = ts(&other["started_at"]) - ts(&other["queued_at"]);
    assert!(waited.num_milliseconds() < 1000, "pool-b run waited {waited} behind pool-a's backlog");

    let mut by_device: crate::harness::SpansByDevice = HashMap::new();
    for id in &ids {
        let r = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(r["status"], "succeeded");
        by_device
            .entry(r["device_id"].as_str().unwrap().into())
            .or_default()
            .push((ts(&r["started_at"]), ts(&r["finished_at"])));
    }
    for spans in by_device.values_mut() {
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "a device held two runs at once: {spans:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_timeout() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "2")]);
    let device = api.device("dur-cancel-1", "lab", json!({})).await;

    // Running: interrupted at once, device released.
    let long = api.start("sleep", json!({"params": {"ms": 30000}, "device": {"pool": "lab"}})).await;
    let long_id = long["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "running", || async {
        (api.run(&long_id).await["status"] == "running").then_some(())
    })
    .await;
    // Queued behind it.
    let queued = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "lab"}})).await;
    let r = api.post(&format!("/api/v1/runs/{}/cancel", queued["id"].as_str().unwrap()), json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("cancelled")));

    let started = std::time::Instant::now();
    let r = api.post(&format!("/api/v1/runs/{long_id}/cancel"), json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "cancelled", "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(3));
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await.body;
    assert_eq!(d["lease"], Value::Null);
    let again = api.post(&format!("/api/v1/runs/{long_id}/cancel"), json!({})).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.body["error"]["code"], "conflict");
    assert_eq!(count(&api.events(&long_id).await, "run.finished"), 1);

    // A run past its timeout ends timed_out.
    let slow = api.start("sleep", json!({"params": {"ms": 5000}, "device": {"pool": "lab"}, "timeout_s": 1})).await;
    let slow = api.wait_terminal(slow["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(slow["status"], "timed_out");
    assert_eq!(slow["error"]["kind"], "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_zero() {
    let env = Env::new();
    let api = env.api(&[]);
    let mut w = env.worker(&[("SWITCHBOARD_SHUTDOWN_GRACE_S", "10")]);
    api.device("dur-term-1", "lab", json!({})).await;
    let run = api.start("sleep", json!({"params": {"ms": 1500}, "device": {"pool": "lab"}})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "running", || async {
        (api.run(&id).await["status"] == "running").then_some(())
    })
    .await;
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(12)).expect("worker should exit within the grace period");
    assert_eq!(code, Some(0));
    assert_eq!(api.run(&id).await["status"], "succeeded");
    // The other roles stop cleanly too.
    let mut s = env.scheduler(&[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(10)).expect("scheduler exits"), Some(0));
    let mut api = api;
    api.proc.sigterm();
    assert_eq!(api.proc.wait_exit(Duration::from_secs(10)).expect("api exits"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_what_outlives_the_grace_period() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let mut w = env.worker(&with(FAST, &[("SWITCHBOARD_SHUTDOWN_GRACE_S", "1")]));
    api.device("dur-term-2", "lab", json!({})).await;
    let run = api.start("sleep", json!({"params": {"ms": 4000}, "device": {"pool": "lab"}, "max_attempts": 1})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "running", || async {
        (api.run(&id).await["status"] == "running").then_some(())
    })
    .await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(8)).expect("exit"), Some(0));
    let r = api.run(&id).await;
    assert_eq!(r["status"], "queued", "handed back, not lost: {r}");
    let _w2 = env.worker(FAST);
    let r = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(r["status"], "succeeded", "a hand-back does not spend the attempt budget: {r}");
    let events = api.events(&id).await;
    assert_eq!(events.iter().find(|e| e["type"] == "run.requeued").unwrap()["data"]["reason"], "handed_back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_503_while_postgres_is_cut_off_and_recovers() {
    let env = Env::new();
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let via_proxy = env.database_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    let api = env.api(&[
        ("DATABASE_URL", &via_proxy),
        ("SWITCHBOARD_REQUEST_TIMEOUT_S", "4"),
        ("SWITCHBOARD_LOG_FORMAT", "json"),
    ]);
    let _w = env.worker(&[]);
    api.device("dur-pg-1", "lab", json!({})).await;
    let before = api.start("sleep", json!({"params": {"ms": 1500}, "device": {"pool": "lab"}})).await;

    proxy.cut();
    let started = std::time::Instant::now();
    let r = api.get("/api/v1/runs").await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("postgres is unavailable") || message.starts_with("request did not"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let h = api.request("GET", "/health/full", None, None).await;
    assert_eq!(h.status, 503);
    assert_eq!(h.body["status"], "unhealthy");
    assert_eq!(h.body["checks"]["postgres"]["ok"], false);
    // No driver text in an unauthenticated answer (the log has it).
    let e = h.body["checks"]["postgres"]["error"].as_str().unwrap();
    assert!(e == "unreachable" || e.starts_with("no answer within"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(2500), "health took {:?}", started.elapsed());
    let refused = api.post("/api/v1/modules/sleep/runs", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    assert_eq!(refused.status, 503, "not accepted while the database is unreachable");
    // The log has what the answer leaves out, under the request's id.
    let r = api
        .client
        .get(format!("{}/api/v1/devices", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-request-id", "pg-cut-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    eventually(Duration::from_secs(10), "the request's log line", || async {
        json_logs(&env, "api").into_iter().find(|l| l["span"]["request_id"] == "pg-cut-1" && l["level"] == "WARN")
    })
    .await;

    proxy.restore();
    let r = eventually(Duration::from_secs(20), "api back to 200", || async {
        let r = api.get("/api/v1/runs").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1, "the refused run was not created");
    let run = api.wait_terminal(before["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded");
}

/// Sum of MEMORY USAGE over the namespace's keys, and how many there are.
async fn namespace_footprint(env: &Env) -> (usize, u64) {
    let keys = env.redis_keys().await;
    let mut conn = env.redis().await;
    let mut bytes = 0u64;
    for k in &keys {
        let b: Option<u64> = redis::cmd("MEMORY").arg("USAGE").arg(k).query_async(&mut conn).await.unwrap_or(None);
        bytes += b.unwrap_or(0);
    }
    (keys.len(), bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_memory_returns_to_idle_after_five_thousand_runs() {
    let env = Env::new();
    // 5,000 starts as fast as they go: past any sensible rate limit, and not its subject.
    let no_limits = [("SWITCHBOARD_RATE_LIMIT_PER_S", "0"), ("SWITCHBOARD_ADDRESS_RATE_LIMIT_PER_S", "0")];
    let api = std::sync::Arc::new(env.api(&no_limits));
    let _scheduler = env.scheduler(FAST);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "16")]);
    api.devices("dur-mem", "lab", 8, json!({})).await;
    // Idle level: one warm-up run delivered and trimmed.
    let warm = api.start("sleep", json!({"params": {"ms": 0}, "device": {"pool": "lab"}})).await;
    api.wait_terminal(warm["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle_keys, idle_bytes) = namespace_footprint(&env).await;

    let mut tasks = Vec::new();
    for t in 0..16 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..(5000 / 16 + usize::from(t < 5000 % 16)) {
                api.start("sleep", json!({"params": {"ms": 0}, "device": {"pool": "lab"}})).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pg = env.pg().await;
    eventually(Duration::from_secs(240), "5000 runs finished", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
            .fetch_one(&pg)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'succeeded'").fetch_one(&pg).await.unwrap();
    assert_eq!(done, 5001);
    let (peak_keys, peak_bytes) = namespace_footprint(&env).await;
    let (keys, bytes) = eventually(Duration::from_secs(60), "redis back near idle", || async {
        let (k, b) = namespace_footprint(&env).await;
        (k <= idle_keys + 5 && b <= idle_bytes * 2 + 16 * 1024).then_some((k, b))
    })
    .await;
    eprintln!(
        "redis namespace: idle {idle_keys} keys / {idle_bytes} B; when the 5000 runs had finished {peak_keys} keys / {peak_bytes} B; \
         after trimming {keys} keys / {bytes} B"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_pool_survives_losing_its_redis_keys() {
    let env = Env::new();
    let api = env.api(&[]);
    let _scheduler = env.scheduler(FAST);
    let _w = env.worker(FAST);
    api.device("dur-live-flush-1", "lab", json!({})).await;
    let first = api.start("sleep", json!({"params": {"ms": 5}, "device": {"pool": "lab"}})).await;
    api.wait_terminal(first["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    // The worker's registration, queue and everything else vanish under it.
    assert!(env.delete_redis_keys().await > 0);
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            api.start("sleep", json!({"params": {"ms": 5}, "device": {"pool": "lab"}})).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for id in &ids {
        let r = api.wait_terminal(id, Duration::from_secs(40)).await;
        assert_eq!(r["status"], "succeeded", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_device_goes_to_the_highest_priority_then_oldest_waiting_run() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]);
    api.device("dur-prio-1", "solo", json!({})).await;
    let blocker = api.start("sleep", json!({"params": {"ms": 1000}, "device": {"pool": "solo"}})).await;
    let blocker_id = blocker["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "blocker running", || async {
        (api.run(&blocker_id).await["status"] == "running").then_some(())
    })
    .await;
    let low_old = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "solo"}, "priority": 1})).await;
    let high_old = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "solo"}, "priority": 8})).await;
    let high_new = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "solo"}, "priority": 8})).await;
    let mut order = Vec::new();
    for (name, r) in [("low_old", &low_old), ("high_old", &high_old), ("high_new", &high_new)] {
        let r = api.wait_terminal(r["id"].as_str().unwrap(), Duration::from_secs(30)).await;
        order.push((ts(&r["started_at"]), name));
    }
    order.sort();
    let names: Vec<&str> = order.iter().map(|(_, n)| *n).collect();
    assert_eq!(names, ["high_old", "high_new", "low_old"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_loses_nothing_and_every_role_reconnects() {
    let env = Env::new();
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let redis_via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let through = [("REDIS_URL", redis_via_proxy.as_str())];
    let api = env.api(&through);
    let _s = env.scheduler(&with(FAST, &through));
    let _w = env.worker(&with(FAST, &through));
    api.device("dur-redis-1", "lab", json!({})).await;
    let before = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "lab"}})).await;
    api.wait_terminal(before["id"].as_str().unwrap(), Duration::from_secs(20)).await;

    proxy.cut();
    let h = api.request("GET", "/health/full", None, None).await;
    assert_eq!((h.status, h.body["checks"]["redis"]["ok"].as_bool()), (503, Some(false)), "{}", h.body);
    // Accepted while Redis is down: in Postgres, delivered once Redis is back.
    let started = std::time::Instant::now();
    let during = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "lab"}})).await;
    assert!(started.elapsed() < Duration::from_secs(8), "the API answered in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    let run = api.wait_terminal(during["id"].as_str().unwrap(), Duration::from_secs(40)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // And the pool works as before.
    let after = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "lab"}})).await;
    let run = api.wait_terminal(after["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
}
