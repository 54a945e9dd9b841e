//! Issue 8: the correctness holes a typed core closes, each proven against the real
//! binary with a real fault (a Postgres partition or cut, a stopped worker, stored data
//! gone bad, input that used to slip through).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{Api, Env, FAST, Proxy, eventually, json_logs, ts, types, with};

const T: Duration = Duration::from_secs(30);

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

/// A run's status and error as Postgres holds them (for runs whose stored data was
/// damaged on purpose).
async fn stored(pg: &sqlx::PgPool, id: &str) -> (String, Value) {
    let row: (String, Option<Value>) = sqlx::query_as("SELECT status::text, error FROM runs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(id).unwrap())
        .fetch_one(pg)
        .await
        .unwrap();
    (row.0, row.1.unwrap_or(Value::Null))
}

async fn workflow(api: &Api, name: &str, steps: Value) -> String {
    let r = api.post("/api/v1/workflows", json!({"name": name, "steps": steps})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Two holders of one device: a worker whose Postgres hangs (a silent partition, so its
/// lease renewal never returns) must stop driving the device before its lease could
/// expire, and the next attempt may only start after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_stops_before_its_lease_expires() {
    let env = Env::new();
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let via_proxy = env.database_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    let lease = [("SWITCHBOARD_LEASE_TTL_S", "3"), ("SWITCHBOARD_RECONCILE_INTERVAL_S", "1")];
    let api = env.api(&[]);
    let _s = env.scheduler(&lease);
    let _a = env.worker(&with(
        &lease,
        &[
            ("DATABASE_URL", via_proxy.as_str()),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
            ("SWITCHBOARD_WORKER_CONCURRENCY", "1"),
        ],
    ));
    api.device("cor-fence-1", "lab", json!({"latency_ms": 20000})).await;
    let run = api.start("device_info", json!({"device": {"pool": "lab"}, "max_attempts": 2})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(T, "run running", || async { (api.run(&id).await["status"] == "running").then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    proxy.blackhole();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The lease as Postgres holds it: no renewal gets through any more.
    let pg = env.pg().await;
    let expires: DateTime<Utc> = sqlx::query_scalar("SELECT lease_expires_at FROM runs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(&pg)
        .await
        .unwrap();
    let _b = env.worker(&lease);

    let fenced = eventually(Duration::from_secs(15), "the partitioned worker to fence itself", || async {
        json_logs(&env, "worker").into_iter().find(|l| {
            l["run_id"] == id.as_str() && l["message"].as_str().is_some_and(|m| m.contains("fencing deadline"))
        })
    })
    .await;
    assert!(
        ts(&fenced["timestamp"]) < expires,
        "the module ran past the lease: fenced at {} but the lease expired at {expires}",
        fenced["timestamp"]
    );
    let second = eventually(T, "attempt 2 to start", || async {
        api.events(&id).await.into_iter().find(|e| e["type"] == "run.started" && e["data"]["attempt"] == 2)
    })
    .await;
    assert!(
        ts(&second["at"]) > expires,
        "attempt 2 started at {} while attempt 1 held the lease until {expires}",
        second["at"]
    );
    proxy.restore();
}

/// A verdict is not lost to a database error: the worker keeps the outcome and writes
/// it once Postgres answers again, while it still holds the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_survives_a_postgres_cut_at_finish_time() {
    let env = Env::new();
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let via_proxy = env.database_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    let lease = [
        ("SWITCHBOARD_LEASE_TTL_S", "8"),
        ("SWITCHBOARD_RECONCILE_INTERVAL_S", "1"),
        ("SWITCHBOARD_REDISPATCH_AFTER_S", "1"),
    ];
    let api = env.api(&[]);
    let _s = env.scheduler(&lease);
    let _w = env.worker(&with(&lease, &[("DATABASE_URL", via_proxy.as_str())]));
    api.device("cor-finish-1", "lab", json!({})).await;
    let run = api.start("sleep", json!({"params": {"ms": 2500}, "device": {"pool": "lab"}})).await;
    let id = run["id"].as_str().unwrap().to_string();
    let started = eventually(T, "run running", || async {
        let r = api.run(&id).await;
        (r["status"] == "running").then(|| ts(&r["started_at"]))
    })
    .await;
    // Cut from 2 s into the run (the module ends at 2.5 s) until 4.5 s.
    let until = |ms: i64| (started + chrono::Duration::milliseconds(ms) - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(until(2000)).await;
    proxy.cut();
    tokio::time::sleep(until(4500)).await;
    proxy.restore();

    let run = api.wait_terminal(&id, T).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "the first attempt's verdict must be kept: {run}");
    let events = api.events(&id).await;
    assert_eq!(count(&events, "run.finished"), 1, "{:?}", types(&events));
    assert_eq!(count(&events, "run.requeued"), 0, "{:?}", types(&events));
}

/// A run whose selector can no longer match any device that could ever serve it ends
/// at once, naming its selector; offline devices may come back, so runs wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_devices_are_all_gone_ends_at_once() {
    let env = Env::new();
    let api = env.api(&[]);
    let gone = api.device("cor-gone-1", "gone", json!({})).await;
    let ret = api.device("cor-ret-1", "ret", json!({})).await;
    let off = api.device("cor-off-1", "mixed", json!({})).await;
    let back = api.device("cor-off-2", "mixed", json!({})).await;
    assert_eq!(
        api.patch(&format!("/api/v1/devices/{}", off["id"].as_str().unwrap()), json!({"status": "offline"}))
            .await
            .status,
        200
    );

    // No worker: every run waits queued.
    let by_serial = api.start("sleep", json!({"params": {"ms": 1}, "device": {"serial": "cor-gone-1"}})).await;
    let by_pool: Vec<Value> = [0, 1].iter().map(|_| json!({"params": {"ms": 1}, "device": {"pool": "ret"}})).collect();
    let mut ret_runs = Vec::new();
    for body in by_pool {
        ret_runs.push(api.start("sleep", body).await);
    }
    let mixed = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "mixed"}})).await;

    assert_eq!(api.delete(&format!("/api/v1/devices/{}", gone["id"].as_str().unwrap())).await.status, 204);
    let r = api.run(by_serial["id"].as_str().unwrap()).await;
    assert_eq!(r["status"], "errored", "{r}");
    assert_eq!(r["error"]["kind"], "unservable");
    assert!(r["error"]["message"].as_str().unwrap().contains("cor-gone-1"), "{r}");

    let p = api.patch(&format!("/api/v1/devices/{}", ret["id"].as_str().unwrap()), json!({"status": "retired"})).await;
    assert_eq!(p.status, 200);
    for run in &ret_runs {
        let r = api.run(run["id"].as_str().unwrap()).await;
        assert_eq!((r["status"].as_str(), r["error"]["kind"].as_str()), (Some("errored"), Some("unservable")), "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("ret"), "{r}");
        assert_eq!(count(&api.events(run["id"].as_str().unwrap()).await, "run.finished"), 1);
    }

    // Retiring one of two: the other, offline, may come back; the run waits.
    let p = api.patch(&format!("/api/v1/devices/{}", back["id"].as_str().unwrap()), json!({"status": "retired"})).await;
    assert_eq!(p.status, 200);
    assert_eq!(api.run(mixed["id"].as_str().unwrap()).await["status"], "queued");
}

/// Runs wait for a device no longer than `SWITCHBOARD_MAX_QUEUE_WAIT_S`, or their own
/// `max_queue_wait_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waits_no_longer_than_its_queue_wait_limit() {
    let env = Env::new();
    let api = env.api(&[]);
    let _s = env.scheduler(FAST);
    let _w = env.worker(FAST);
    let d = api.device("cor-wait-1", "lab", json!({})).await;
    assert_eq!(
        api.patch(&format!("/api/v1/devices/{}", d["id"].as_str().unwrap()), json!({"status": "maintenance"}))
            .await
            .status,
        200
    );
    let bad = api
        .post(
            "/api/v1/modules/sleep/runs",
            json!({"params": {"ms": 1}, "device": {"pool": "lab"}, "max_queue_wait_s": 0}),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body["error"]["details"]["fields"]["max_queue_wait_s"].is_string(), "{:?}", bad.body);

    let short =
        api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}, "max_queue_wait_s": 2})).await;
    let patient = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    let r = api.wait_terminal(short["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(
        (r["status"].as_str(), r["error"]["kind"].as_str()),
        (Some("errored"), Some("queue_wait_exceeded")),
        "{r}"
    );
    let waited = ts(&r["finished_at"]) - ts(&r["queued_at"]);
    assert!(waited.num_milliseconds() >= 2000, "ended after {waited}");
    assert_eq!(api.run(patient["id"].as_str().unwrap()).await["status"], "queued");
}

/// The queue-wait clock restarts when a run goes back to the queue: time spent running
/// is not time spent waiting for a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_wait_clock_restarts_when_a_run_is_requeued() {
    let env = Env::new();
    let api = env.api(&[]);
    let _s = env.scheduler(FAST);
    let _w = env.worker(&with(FAST, &[("SWITCHBOARD_BREAKER_THRESHOLD", "100")]));
    api.device("cor-requeue-1", "lab", json!({})).await;
    let body = json!({"params": {"ms": 3000, "outcome": "error"}, "device": {"pool": "lab"}, "max_attempts": 2, "max_queue_wait_s": 2});
    let run = api.start("sleep", body).await;
    let r = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!((r["status"].as_str(), r["attempt"].as_i64()), (Some("errored"), Some(2)), "{r}");
    assert_eq!(r["error"]["kind"], "driver_error", "the second attempt ran: {r}");
}

/// Campaign items name devices that exist, and a campaign run ends when its time
/// budget does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_items_are_validated_and_campaign_runs_time_out() {
    let env = Env::new();
    let api = env.api(&[]);
    let _s = env.scheduler(FAST);
    let _w = env.worker(&with(FAST, &[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]));
    api.devices("cor-camp", "farm", 2, json!({})).await;
    let r = api
        .post(
            "/api/v1/campaigns",
            json!({"name": "nowhere", "items": [
                {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "farm"}},
                {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "nowhere"}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["error"]["details"]["fields"]["items[1].device"], "no registered device matches this selector");

    let items: Vec<Value> =
        (0..3).map(|_| json!({"module": "sleep", "params": {"ms": 30000}, "device": {"pool": "farm"}})).collect();
    let c = api.post("/api/v1/campaigns", json!({"name": "slow", "items": items, "max_parallel": 2})).await;
    assert_eq!(c.status, 201, "{:?}", c.body);
    let start =
        api.post(&format!("/api/v1/campaigns/{}/runs", c.body["id"].as_str().unwrap()), json!({"timeout_s": 2})).await;
    assert_eq!(start.status, 202, "{:?}", start.body);
    let run = start.body["id"].as_str().unwrap().to_string();
    let parent = api.wait_terminal(&run, Duration::from_secs(20)).await;
    assert_eq!(parent["status"], "timed_out", "{parent}");
    let kids = eventually(Duration::from_secs(15), "every child ended", || async {
        let r = api.get(&format!("/api/v1/runs?parent_run_id={run}")).await;
        let kids = r.body["items"].as_array().cloned().unwrap_or_default();
        kids.iter().all(|k| !matches!(k["status"].as_str(), Some("queued" | "running"))).then_some(kids)
    })
    .await;
    assert_eq!(kids.len(), 3);
    assert!(kids.iter().all(|k| k["status"] == "cancelled"), "{kids:?}");
}

/// A paused workflow handed back to the queue is not claimed (it would hold a device
/// and a worker slot while it idles) until it is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queued_workflow_is_not_claimed_until_resumed() {
    let env = Env::new();
    let api = env.api(&[]);
    let mut w = env.worker(&[("SWITCHBOARD_SHUTDOWN_GRACE_S", "1")]);
    let device = api.device("cor-pq-1", "lab", json!({})).await;
    let wf = workflow(
        &api,
        "pause-queued",
        json!([
            {"module": "sleep", "params": {"ms": 300}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let r = api.post(&format!("/api/v1/workflows/{wf}/runs"), json!({"device": {"pool": "lab"}})).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    eventually(T, "step 0 running", || async { (api.run(&id).await["steps"][0]["status"] == "running").then_some(()) })
        .await;
    assert_eq!(api.post(&format!("/api/v1/runs/{id}/pause"), json!({})).await.status, 200);
    eventually(T, "step 0 done", || async { (api.run(&id).await["steps"][0]["status"] == "passed").then_some(()) })
        .await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(10)).expect("exit"), Some(0));

    let _w2 = env.worker(&[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = api.run(&id).await;
    assert_eq!((r["status"].as_str(), r["paused"].as_bool()), (Some("queued"), Some(true)), "{r}");
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await.body;
    assert_eq!(d["lease"], Value::Null, "a paused queued run holds no device: {d}");
    let starts = count(&api.events(&id).await, "run.started");
    assert_eq!(starts, 1, "claimed while paused");

    assert_eq!(api.post(&format!("/api/v1/runs/{id}/resume"), json!({})).await.status, 200);
    let r = api.wait_terminal(&id, T).await;
    assert_eq!(r["status"], "succeeded", "{r}");
}

/// Breakers are judged only by runs that touch the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_are_judged_by_runs_that_touch_the_device() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_BREAKER_THRESHOLD", "1"), ("SWITCHBOARD_BREAKER_COOLDOWN_S", "2")]);
    let bad = api.device("cor-brk-1", "lab", json!({"error_rate": 1.0})).await;
    let bad_id = bad["id"].as_str().unwrap().to_string();
    let r = api.start("device_info", json!({"device": {"serial": "cor-brk-1"}, "max_attempts": 1})).await;
    api.wait_terminal(r["id"].as_str().unwrap(), T).await;
    let d = api.get(&format!("/api/v1/devices/{bad_id}")).await.body;
    assert_eq!(d["breaker"]["state"], "open", "{d}");
    let open_until = ts(&d["breaker"]["open_until"]);
    tokio::time::sleep((open_until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300)).await;

    // A sleep run touches no device: it may use the device, but says nothing about it.
    let s = api.start("sleep", json!({"params": {"ms": 10}, "device": {"serial": "cor-brk-1"}})).await;
    let s = api.wait_terminal(s["id"].as_str().unwrap(), T).await;
    assert_eq!(s["status"], "succeeded");
    let d = api.get(&format!("/api/v1/devices/{bad_id}")).await.body;
    assert_ne!(d["breaker"]["state"], "closed", "a sleep run closed the breaker: {d}");
    assert_eq!(d["breaker"]["consecutive_failures"], 1);

    // (An `unsupported` module, neither the device's fault nor retried, is checked in
    // phones::telephony_modules_call_and_text_per_android_version.)
}

/// Input that used to crash a handler, slip through or reach Postgres now gets a
/// precise 422 and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_used_to_slip_through_gets_a_precise_422() {
    let env = Env::new();
    let api = env.api(&[]);
    let d = api.device("cor-in-1", "lab", json!({})).await;
    let id = d["id"].as_str().unwrap();

    let r = api.post("/api/v1/devices", json!({"serial": "x", "driver": null})).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body["error"]["details"]["fields"]["driver"].is_string(), "{:?}", r.body);

    let r = api.post("/api/v1/modules/sleep/runs", json!({"params": {"ms": 5000.0}, "device": {"pool": "lab"}})).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["error"]["details"]["fields"]["params.ms"], "must be an integer (got a number)");

    let r = api.patch(&format!("/api/v1/devices/{id}"), json!({"metadata": {"note": "a\u{0}b"}})).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body["error"]["details"]["fields"]["metadata.note"].as_str().unwrap().contains("NUL"), "{:?}", r.body);
    let r = api
        .post("/api/v1/workflows", json!({"name": "nul\u{0}", "steps": [{"module": "sleep", "params": {"ms": 1}}]}))
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let r = api.get("/api/v1/devices?pool=%00").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(api.get(&format!("/api/v1/devices/{id}")).await.body["metadata"], json!({"sim": {}}));

    // The catalog pages like every list.
    let r = api.get("/api/v1/modules?limit=2").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    let mut seen = 2;
    let mut cursor = r.body["next_cursor"].as_str().expect("a next page").to_string();
    loop {
        let r = api.get(&format!("/api/v1/modules?limit=4&cursor={cursor}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        seen += r.body["items"].as_array().unwrap().len();
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, 10);
    let r = api.get("/api/v1/system/info?verbose=1").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"]["details"]["fields"]["verbose"], "unknown query parameter (this endpoint takes none)");
}

/// A stored snapshot or selector that cannot be read ends the run `errored`, naming
/// what is unreadable; it never runs as a default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_stored_runs_end_errored_naming_what_is_unreadable() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("cor-bad-1", "lab", json!({})).await;
    let wf = workflow(&api, "to-be-damaged", json!([{"module": "sleep", "params": {"ms": 1}}])).await;
    let r = api.post(&format!("/api/v1/workflows/{wf}/runs"), json!({"device": {"pool": "lab"}})).await;
    let wf_run = r.body["id"].as_str().unwrap().to_string();
    let mod_run = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pg = env.pg().await;
    sqlx::query("UPDATE runs SET definition = jsonb_set(definition, '{steps}', '\"garbage\"') WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&wf_run).unwrap())
        .execute(&pg)
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET selector = '{\"colour\": \"red\"}' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&mod_run).unwrap())
        .execute(&pg)
        .await
        .unwrap();
    // A selector whose id is not a UUID: matching it against devices must not fail the
    // queries that match every other run.
    let bad_id = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    sqlx::query("UPDATE runs SET selector = '{\"id\": \"not-a-uuid\"}' WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&bad_id).unwrap())
        .execute(&pg)
        .await
        .unwrap();
    let fine = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Deleting any device matches every queued run's selector against it: a damaged one
    // must not make that fail.
    let other = api.device("cor-bad-2", "elsewhere", json!({})).await;
    let r = api.delete(&format!("/api/v1/devices/{}", other["id"].as_str().unwrap())).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let _w = env.worker(&[]);
    let _s = env.scheduler(FAST);
    assert_eq!(api.wait_terminal(&fine, T).await["status"], "succeeded");
    for (id, what) in [(&wf_run, "definition"), (&mod_run, "selector"), (&bad_id, "selector")] {
        let (status, error) = eventually(T, "the damaged run to end", || async {
            let (status, error) = stored(&pg, id).await;
            (status != "queued" && status != "running").then_some((status, error))
        })
        .await;
        assert_eq!(status, "errored", "{id}: {error}");
        assert_eq!(error["kind"], "unreadable", "{error}");
        assert!(error["message"].as_str().unwrap().contains(what), "{error}");
    }
}

/// A schedule whose stored target no longer reads is disabled with an event; the
/// others keep firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_schedule_is_disabled_and_the_others_keep_firing() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("cor-dmg-1", "lab", json!({})).await;
    let target = json!({"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "lab"}});
    let mut ids = Vec::new();
    for name in ["damaged", "healthy"] {
        let r = api.post("/api/v1/schedules", json!({"name": name, "cron": "* * * * * *", "target": target})).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        ids.push(uuid::Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap());
    }
    let pg = env.pg().await;
    sqlx::query("UPDATE schedules SET target = '{\"kind\": \"teleport\"}' WHERE id = $1")
        .bind(ids[0])
        .execute(&pg)
        .await
        .unwrap();
    let s = env.scheduler(&[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(s);
    let fired = |id| {
        let pg = pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM runs WHERE schedule_id = $1")
                .bind(id)
                .fetch_one(&pg)
                .await
                .unwrap()
        }
    };
    assert!(fired(ids[1]).await >= 2, "the healthy schedule kept firing");
    assert_eq!(fired(ids[0]).await, 0);
    let (enabled, errors): (bool, i64) = sqlx::query_as(
        "SELECT enabled, (SELECT count(*) FROM events WHERE schedule_id = $1 AND type = 'schedule.error') FROM schedules WHERE id = $1",
    )
    .bind(ids[0])
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!((enabled, errors), (false, 1));
}

/// Scheduled workflows apply their `params` to the steps, as API-started ones do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_workflow_params_reach_the_steps() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("cor-sp-1", "lab", json!({})).await;
    let wf = workflow(&api, "pinger", json!([{"module": "ping"}, {"module": "sleep", "params": {"ms": 1}}])).await;
    let bad = api
        .post(
            "/api/v1/schedules",
            json!({"name": "bad", "cron": "@daily",
        "target": {"kind": "workflow", "id": wf, "params": {"colour": 1}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(bad.status, 422, "{:?}", bad.body);
    assert!(bad.body["error"]["details"]["fields"]["target.params.colour"].is_string(), "{:?}", bad.body);
    let s = api
        .post(
            "/api/v1/schedules",
            json!({"name": "nightly-ping", "cron": "@daily",
        "target": {"kind": "workflow", "id": wf, "params": {"host": "1.1.1.1"}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(s.status, 201, "{:?}", s.body);
    let r = api.post(&format!("/api/v1/schedules/{}/trigger", s.body["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["definition"]["steps"][0]["params"]["host"], "1.1.1.1", "{}", r.body);
}

/// A run is recorded as dispatched only once a push succeeded, so the reconciler
/// delivers what Redis never got without waiting for the re-dispatch interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_push_is_not_recorded_as_dispatched() {
    let env = Env::new();
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let redis_via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let api = env.api(&[("REDIS_URL", redis_via_proxy.as_str())]);
    api.device("cor-push-1", "lab", json!({})).await;
    let s = api
        .post(
            "/api/v1/schedules",
            json!({"name": "manual", "cron": "@yearly",
        "target": {"kind": "module", "id": "sleep", "params": {"ms": 1}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(s.status, 201);
    proxy.cut();
    let module_run = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    let r = api.post(&format!("/api/v1/schedules/{}/trigger", s.body["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pg = env.pg().await;
    for id in [module_run["id"].as_str().unwrap(), r.body["id"].as_str().unwrap()] {
        let dispatched: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT dispatched_at FROM runs WHERE id = $1")
            .bind(uuid::Uuid::parse_str(id).unwrap())
            .fetch_one(&pg)
            .await
            .unwrap();
        assert_eq!(dispatched, None, "run {id} recorded as dispatched although Redis was cut off");
    }
    proxy.restore();
}

/// The reconciler keeps its tables and Redis tidy: `processes` rows of long-gone
/// processes are pruned, and the Redis trimmer sees every page of its SCAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_prunes_processes_and_scans_all_of_redis() {
    let env = Env::new();
    let pg = env.pg().await;
    sqlx::query("INSERT INTO processes (id, role, hostname, pid, last_seen_at) VALUES ('worker@ghost:1:old', 'worker', 'ghost', 1, now() - interval '2 days')")
        .execute(&pg)
        .await
        .unwrap();
    let mut conn = env.redis().await;
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("SET").arg(format!("{}:filler:{i}", env.namespace)).arg(1).ignore();
    }
    for i in 0..30 {
        pipe.cmd("HSET").arg(format!("{}:runs:workers:metadata:ghost-{i}", env.namespace)).arg("x").arg(1).ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let _s = env.scheduler(FAST);
    eventually(Duration::from_secs(20), "the ghost process pruned", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processes WHERE id = 'worker@ghost:1:old'")
            .fetch_one(&pg)
            .await
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
    eventually(Duration::from_secs(20), "every ghost worker's metadata trimmed", || async {
        let left = env.redis_keys().await.iter().filter(|k| k.contains(":workers:metadata:ghost-")).count();
        (left == 0).then_some(())
    })
    .await;
}
