//! Issue 2: a module run travels from the API through Redis to a worker and into
//! Postgres; errors are envelopes; devices are never shared.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Api, Env, eventually, types};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_succeeds_with_device_timings_result_and_ordered_events() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&[]);
    let device = api.device("bb-ok-1", "lab", json!({"latency_ms": 20})).await;
    let run = api.start("ping", json!({"params": {"host": "1.1.1.1", "count": 3}, "device": {"pool": "lab"}})).await;
    assert_eq!(run["status"], "queued");
    assert_eq!(run["params"], json!({"host": "1.1.1.1", "count": 3, "interval_ms": 1000, "max_loss_pct": 0}));
    let id = run["id"].as_str().unwrap();

    let run = api.wait_terminal(id, T).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["device_id"], device["id"]);
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["result"]["sent"], 3);
    assert_eq!(run["result"]["received"], 3);
    assert!(run["result"]["rtt_ms"]["avg"].as_f64().unwrap() > 0.0);
    let started: DateTime<Utc> = run["started_at"].as_str().unwrap().parse().unwrap();
    let finished: DateTime<Utc> = run["finished_at"].as_str().unwrap().parse().unwrap();
    assert!(finished >= started && run["duration_ms"].as_i64().unwrap() >= 20);
    assert_eq!(run["steps"][0]["status"], "passed");
    assert_eq!(run["lease"], Value::Null);

    let events = api.events(id).await;
    assert_eq!(types(&events), ["run.queued", "run.started", "run.finished"]);
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids must grow: {ids:?}");
    assert_eq!(events[2]["data"]["status"], "succeeded");

    // The device is free again and its history shows the run.
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await;
    assert_eq!(d.body["lease"], Value::Null);
    assert_eq!(d.body["breaker"]["state"], "closed");
    let history = api.get(&format!("/api/v1/devices/{}/runs", device["id"].as_str().unwrap())).await;
    assert_eq!(history.body["items"][0]["id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verdict_is_final_and_not_retried() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&[]);
    api.device("bb-fail-1", "lab", json!({})).await;
    let run = api
        .start(
            "sleep",
            json!({"params": {"ms": 50, "outcome": "failed"}, "device": {"serial": "bb-fail-1"}, "max_attempts": 3}),
        )
        .await;
    let run = api.wait_terminal(run["id"].as_str().unwrap(), T).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["result"]["outcome"], "failed");
    let events = api.events(run["id"].as_str().unwrap()).await;
    assert_eq!(types(&events), ["run.queued", "run.started", "run.finished"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_envelope_and_changes_nothing() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("bb-val-1", "lab", json!({})).await;

    let r = api
        .post("/api/v1/modules/ping/runs", json!({"params": {"count": "four", "colour": 1}, "device": {"pool": "lab"}}))
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "validation_failed");
    let fields = &r.body["error"]["details"]["fields"];
    assert_eq!(fields["params.count"], "must be an integer (got a string)");
    assert!(fields["params.colour"].as_str().unwrap().starts_with("unknown parameter"));

    let r = api
        .post("/api/v1/modules/sleep/runs", json!({"params": {"outcome": "passed"}, "device": {"pool": "lab"}}))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["details"]["fields"]["params.ms"], "is required");

    let r = api
        .post(
            "/api/v1/modules/sleep/runs",
            json!({"params": {"ms": 1}, "device": {"id": "not-a-uuid"}, "priority": 12}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body["error"]["details"]["fields"]["device.id"].is_string());
    assert!(r.body["error"]["details"]["fields"]["priority"].is_string());

    let r = api.post("/api/v1/modules/sleep/runs", json!({"params": {"ms": 1}, "device": {"pool": "nowhere"}})).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["details"]["fields"]["device"], "no registered device matches this selector");

    // Malformed JSON, wrong content type, unknown module.
    let raw = api
        .client
        .post(format!("{}/api/v1/modules/sleep/runs", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"params\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("malformed JSON"));
    let raw = api
        .client
        .post(format!("{}/api/v1/devices", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("serial=x")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 415);
    let r = api.post("/api/v1/modules/teleport/runs", json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "not_found");

    // Nothing was created.
    let runs = api.get("/api/v1/runs").await;
    assert_eq!(runs.body["items"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_unauthorized_and_method_errors_are_envelopes() {
    let env = Env::new();
    let api = env.api(&[]);

    let missing = uuid::Uuid::new_v4();
    let r = api.get(&format!("/api/v1/runs/{missing}")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "not_found");
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(r.body["error"]["request_id"], rid);

    let r = api.get("/api/v1/no/such/route").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "not_found");
    let r = api.request("GET", "/nowhere", None, None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "not_found");

    // A client's request id is echoed.
    let raw = api
        .client
        .get(format!("{}/api/v1/runs/{missing}", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["x-request-id"], "trace-me-42");
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "trace-me-42");

    let r = api.request("GET", "/api/v1/runs", None, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"]["code"], "unauthorized");
    let r = api.request("GET", "/api/v1/runs", None, Some("wrong")).await;
    assert_eq!(r.status, 401);

    let r = api.request("DELETE", "/api/v1/modules", None, Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.body["error"]["code"], "method_not_allowed");

    let r = api.get("/api/v1/runs?status=bogus").await;
    assert_eq!(r.status, 422);
    assert!(r.body["error"]["details"]["fields"]["status"].as_str().unwrap().contains("must be one of"));

    // Health needs no token.
    let r = api.request("GET", "/health", None, None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("ok")));
    let r = api.request("GET", "/health/full", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["checks"]["postgres"]["ok"], true);
    assert_eq!(r.body["checks"]["redis"]["ok"], true);
    assert_eq!(r.body["status"], "degraded", "no worker or scheduler runs in this test");
    let r = api.get("/api/v1/system/info").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["queues"]["runs"]["queued"], 0);
    assert_eq!(r.body["namespace"].as_str(), Some(env.namespace.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_registry_crud() {
    let env = Env::new();
    let api = env.api(&[]);
    let d = api.device("bb-crud-1", "lab", json!({"latency_ms": 5})).await;
    let id = d["id"].as_str().unwrap();
    assert_eq!(d["breaker"], json!({"state": "closed", "consecutive_failures": 0, "open_until": null}));
    assert_eq!(d["lease"], Value::Null);

    let dup = api.post("/api/v1/devices", json!({"serial": "bb-crud-1", "driver": "sim"})).await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.body["error"]["code"], "conflict");
    let bad = api
        .post("/api/v1/devices", json!({"serial": "x", "driver": "usb", "metadata": {"sim": {"error_rate": 2}}}))
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body["error"]["details"]["fields"]["driver"].is_string());
    assert!(bad.body["error"]["details"]["fields"]["metadata.sim.error_rate"].is_string());

    let p =
        api.patch(&format!("/api/v1/devices/{id}"), json!({"labels": ["volte", "5g"], "status": "maintenance"})).await;
    assert_eq!(p.status, 200);
    assert_eq!(p.body["labels"], json!(["5g", "volte"]));
    assert_eq!(p.body["status"], "maintenance");

    api.device("bb-crud-2", "other", json!({})).await;
    let l = api.get("/api/v1/devices?pool=lab").await;
    assert_eq!(l.body["items"].as_array().unwrap().len(), 1);
    let l = api.get("/api/v1/devices?label=5g&status=maintenance").await;
    assert_eq!(l.body["items"][0]["id"], id);
    let page = api.get("/api/v1/devices?limit=1").await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 1);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let page2 = api.get(&format!("/api/v1/devices?limit=1&cursor={cursor}")).await;
    assert_eq!(page2.body["items"].as_array().unwrap().len(), 1);
    assert_ne!(page2.body["items"][0]["id"], page.body["items"][0]["id"]);
    assert_eq!(page2.body["next_cursor"], Value::Null);

    assert_eq!(api.delete(&format!("/api/v1/devices/{id}")).await.status, 204);
    assert_eq!(api.get(&format!("/api/v1/devices/{id}")).await.status, 404);
    assert_eq!(api.delete(&format!("/api/v1/devices/{id}")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_every_builtin_module_with_schemas() {
    let env = Env::new();
    let api = env.api(&[]);
    let r = api.get("/api/v1/modules").await;
    let ids: Vec<&str> = r.body["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for m in [
        "ping",
        "airplane_mode",
        "mobile_data",
        "wifi",
        "send_sms",
        "voice_call",
        "reboot",
        "device_info",
        "capture_logs",
        "sleep",
    ] {
        assert!(ids.contains(&m), "{m} missing from {ids:?}");
    }
    let sleep = api.get("/api/v1/modules/sleep").await;
    assert_eq!(sleep.body["params_schema"]["required"], json!(["ms"]));
    assert_eq!(api.get("/api/v1/modules/nope").await.status, 404);
}

/// 40 runs on 4 devices, worker concurrency 8: every run succeeds and no device ever
/// holds two runs at once (per-device started/finished intervals never overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_runs_on_four_devices_never_share_a_device() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w1 = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "8")]);
    api.devices("bb-share", "farm", 4, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        let run = api.start("sleep", json!({"params": {"ms": 60}, "device": {"pool": "farm"}})).await;
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    let mut by_device: crate::harness::SpansByDevice = HashMap::new();
    for id in &ids {
        let run = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let s: DateTime<Utc> = run["started_at"].as_str().unwrap().parse().unwrap();
        let f: DateTime<Utc> = run["finished_at"].as_str().unwrap().parse().unwrap();
        by_device.entry(run["device_id"].as_str().unwrap().to_string()).or_default().push((s, f));
    }
    assert_eq!(by_device.len(), 4, "all four devices should have worked");
    for (device, mut spans) in by_device {
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "device {device} held two runs at once: {:?} and {:?}", w[0], w[1]);
        }
    }
}

/// A run that finds no free device waits queued (holding no worker slot) and starts
/// as soon as the device frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_run_starts_when_its_device_frees() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]);
    api.device("bb-wait-1", "solo", json!({})).await;
    let first = api.start("sleep", json!({"params": {"ms": 800}, "device": {"pool": "solo"}})).await;
    let first_id = first["id"].as_str().unwrap().to_string();
    eventually(T, "first run running", || async { (api.run(&first_id).await["status"] == "running").then_some(()) })
        .await;
    let second = api.start("sleep", json!({"params": {"ms": 10}, "device": {"pool": "solo"}, "priority": 9})).await;
    let second_id = second["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.run(second_id).await["status"], "queued");
    let a = api.wait_terminal(&first_id, T).await;
    let b = api.wait_terminal(second_id, T).await;
    assert_eq!((a["status"].as_str(), b["status"].as_str()), (Some("succeeded"), Some("succeeded")));
    let a_end: DateTime<Utc> = a["finished_at"].as_str().unwrap().parse().unwrap();
    let b_start: DateTime<Utc> = b["started_at"].as_str().unwrap().parse().unwrap();
    assert!(b_start >= a_end);
    // Handed the device directly: no reconcile interval in between.
    assert!((b_start - a_end).num_milliseconds() < 1000, "waited {} ms", (b_start - a_end).num_milliseconds());
}

/// The served document and the served routes agree: every operation the document lists
/// is routed (never "no such route" or 405), and it lists exactly the route table and
/// the routes outside it, each table operation with its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_public_generated_and_matches_the_router() {
    let env = Env::new();
    let api = env.api(&[]);
    let r = api.request("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["openapi"], "3.1.0");
    let mut listed = std::collections::BTreeSet::new();
    for (path, item) in r.body["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            listed.insert((method.clone(), path.clone()));
            let concrete = path
                .replace("{id}", &uuid::Uuid::new_v4().to_string())
                .replace("{capture_id}", &uuid::Uuid::new_v4().to_string());
            let body = (method != "get" && method != "delete").then(|| json!({}));
            let answer = api.request(&method.to_uppercase(), &concrete, body, Some(ADMIN_TOKEN)).await;
            assert_ne!(answer.status, 405, "{method} {path}: {:?}", answer.body);
            assert_ne!(answer.body["error"]["message"], "no such route", "{method} {path} is documented, not routed");
            assert!(answer.status < 500 || path.ends_with("/health/full"), "{method} {path}: {:?}", answer.body);
            assert!(op["operationId"].is_string() && op["responses"].is_object(), "{method} {path}");
        }
    }
    let mut served: std::collections::BTreeSet<(String, String)> =
        switchboard_api::openapi::OUTSIDE.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    for (method, path, role) in switchboard_api::table::ROUTES {
        let full = format!("/api/v1{path}");
        assert_eq!(r.body["paths"][&full][method]["x-required-role"], json!(role), "{method} {full}");
        served.insert((method.to_string(), full));
    }
    assert_eq!(listed, served, "the document and the router differ");
}

/// Sends `POST path` with an `Idempotency-Key`, as `token`.
async fn send_keyed(api: &Api, token: &str, key: &str, path: &str, body: &str) -> (u16, Value) {
    let r = api
        .client
        .post(format!("{}{path}", api.base))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_replay_per_token_refuse_another_body_and_expire() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_IDEMPOTENCY_TTL_S", "2")]);
    api.device("bb-idem-1", "lab", json!({})).await;
    let path = "/api/v1/modules/sleep/runs";
    let body = r#"{"params": {"ms": 1}, "device": {"pool": "lab"}}"#;
    let (status, first) = send_keyed(&api, ADMIN_TOKEN, "nightly-2026-11-22", path, body).await;
    assert_eq!(status, 202, "{first}");

    // The same request again, its keys in another order and spaced otherwise: the run
    // it started, 200.
    let reordered = r#"{"device":{"pool":"lab"},"params":{"ms":1}}"#;
    let (status, again) = send_keyed(&api, ADMIN_TOKEN, "nightly-2026-11-22", path, reordered).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "{again}");

    // The same key with another body: refused, and nothing started.
    let other = r#"{"params": {"ms": 2}, "device": {"pool": "lab"}}"#;
    let (status, refused) = send_keyed(&api, ADMIN_TOKEN, "nightly-2026-11-22", path, other).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["details"]["reason"], "idempotency_key_reused", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("another request"), "{refused}");

    // Keys are scoped to the token that sent them: another caller's same key is its own.
    let made = api.post("/api/v1/tokens", json!({"name": "ci", "role": "operator"})).await;
    let ci = made.body["token"].as_str().unwrap().to_string();
    let (status, theirs) = send_keyed(&api, &ci, "nightly-2026-11-22", path, body).await;
    assert_eq!(status, 202, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
    assert_eq!(theirs["idempotency_key"], "nightly-2026-11-22");

    // After the TTL the key starts a new run (the old run keeps its key in history).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, later) = send_keyed(&api, ADMIN_TOKEN, "nightly-2026-11-22", path, other).await;
    assert_eq!(status, 202, "{later}");
    assert_ne!(later["id"], first["id"]);
    assert_eq!(api.run(first["id"].as_str().unwrap()).await["idempotency_key"], "nightly-2026-11-22");
    assert_eq!(api.get("/api/v1/runs").await.body["items"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_a_413_envelope() {
    let env = Env::new();
    let api = env.api(&[("SWITCHBOARD_MAX_BODY_BYTES", "1024")]);
    let big = json!({"serial": "x".repeat(4096), "driver": "sim"});
    let r = api.post("/api/v1/devices", big).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "payload_too_large");
    assert_eq!(api.get("/api/v1/devices").await.body["items"], json!([]));
}

/// The README's first command: `switchboard dev` prints a curl that starts a run, and
/// that run succeeds within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_a_curl_that_starts_a_run_that_succeeds() {
    use std::io::BufRead;
    let env = Env::new();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("dev")
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", crate::harness::redis_url())
        .env("SWITCHBOARD_NAMESPACE", &env.namespace)
        .env("SWITCHBOARD_API_ADDR", "127.0.0.1:0")
        .env_remove("SWITCHBOARD_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dev");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut curl = None;
    let mut base = None;
    while curl.is_none() || base.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("dev printed its banner");
        if let Some(u) = line.trim().strip_prefix("API:") {
            base = Some(u.trim().to_string());
        }
        if line.trim_start().starts_with("curl -s -X POST") {
            curl = Some(line.trim().to_string());
        }
    }
    let (curl, base) = (curl.unwrap(), base.unwrap());
    assert!(!base.ends_with(":0"), "the banner shows the bound port: {base}");
    let token = curl.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap().to_string();
    // Run the printed command exactly as a user would paste it (retrying until the API listens).
    let mut out = Value::Null;
    for _ in 0..50 {
        let o = std::process::Command::new("sh").arg("-c").arg(&curl).output().expect("sh");
        if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
            out = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(out["status"], "queued", "{out}");
    let id = out["id"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let mut run = Value::Null;
    for _ in 0..100 {
        run = client
            .get(format!("{base}/api/v1/runs/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["device_id"].is_string() && run["result"]["rtt_ms"].is_object());
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "dev exits cleanly on SIGTERM: {status:?}");
}
