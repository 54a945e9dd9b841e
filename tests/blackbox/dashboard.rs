//! The dashboard API (issue 12): every figure checked against runs the test made,
//! with known outcomes and durations.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

/// Registers a sim device with a pool, labels and sim behaviour.
async fn device(api: &Api, serial: &str, pool: &str, labels: Value, sim: Value) -> String {
    let body = json!({"serial": serial, "pool": pool, "labels": labels, "driver": "sim", "metadata": {"sim": sim}});
    let r = api.post("/api/v1/devices", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Starts a module run on the device with `serial` and waits for its end.
async fn run_on(api: &Api, module: &str, serial: &str, params: Value, extra: Value) -> Value {
    let mut body = json!({"params": params, "device": {"serial": serial}});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let started = api.start(module, body).await;
    api.wait_terminal(started["id"].as_str().unwrap(), Duration::from_secs(30)).await
}

fn get_f64(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The continuous median of a sorted list, as Postgres' percentile_cont computes it.
fn median(sorted: &[f64]) -> f64 {
    let at = (sorted.len() - 1) as f64 * 0.5;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_figures_match_the_runs_that_made_them() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&with(FAST, &[("SWITCHBOARD_BREAKER_THRESHOLD", "10")]));
    let five_g = device(&api, "dash-a", "lab", json!(["5g"]), json!({})).await;
    device(&api, "dash-b", "lab", json!([]), json!({})).await;
    let flaky_dev = device(&api, "dash-flaky", "flaky", json!([]), json!({"fail_rate": 1.0})).await;
    let err_dev = device(&api, "dash-err", "bad", json!([]), json!({"error_rate": 1.0})).await;
    let parked = device(&api, "dash-parked", "nowhere", json!([]), json!({})).await;

    // Three passes of known lengths on the 5g device.
    let mut durations = Vec::new();
    for ms in [150, 150, 400] {
        let done = run_on(&api, "sleep", "dash-a", json!({"ms": ms}), json!({})).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        durations.push(get_f64(&done["duration_ms"]));
    }
    durations.sort_by(f64::total_cmp);
    // A failed verdict, then (the device fixed) its retry passes: flaky.
    let failed = run_on(&api, "ping", "dash-flaky", json!({"count": 1}), json!({})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let failed_id = failed["id"].as_str().unwrap();
    let r = api.patch(&format!("/api/v1/devices/{flaky_dev}"), json!({"metadata": {"sim": {"fail_rate": 0.0}}})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let retry = api.post(&format!("/api/v1/runs/{failed_id}/retry"), json!({})).await;
    assert_eq!(retry.status, 202, "{:?}", retry.body);
    let retry_id = retry.body["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&retry_id, Duration::from_secs(30)).await["status"], "succeeded");
    // An infrastructure error, with no retry.
    let errored = run_on(&api, "ping", "dash-err", json!({"count": 1}), json!({"max_attempts": 1})).await;
    assert_eq!(errored["status"], "errored", "{errored}");
    // A cancelled run, left out of the success rate.
    let long = api.start("sleep", json!({"params": {"ms": 60000}, "device": {"serial": "dash-b"}})).await;
    let long_id = long["id"].as_str().unwrap();
    eventually(Duration::from_secs(15), "the long run running", || async {
        (api.run(long_id).await["status"] == "running").then_some(())
    })
    .await;
    assert_eq!(api.post(&format!("/api/v1/runs/{long_id}/cancel"), json!({})).await.status, 200);
    assert_eq!(api.wait_terminal(long_id, Duration::from_secs(15)).await["status"], "cancelled");
    // One run waiting: its only device is in maintenance.
    let r = api.patch(&format!("/api/v1/devices/{parked}"), json!({"status": "maintenance"})).await;
    assert_eq!(r.status, 200);
    api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "nowhere"}})).await;

    // Summary: every run of the window.
    let s = api.get("/api/v1/dashboard/summary?window=1h").await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let s = s.body;
    assert_eq!(s["window"], "1h");
    assert_eq!(s["runs"], json!({"succeeded": 4, "failed": 1, "errored": 1, "timed_out": 0, "cancelled": 1}), "{s}");
    assert!((get_f64(&s["success_rate"]) - 4.0 / 6.0).abs() < 1e-9, "{s}");
    assert_eq!(s["queue"]["depth"], 1, "{s}");
    assert!(get_f64(&s["queue"]["oldest_age_s"]) >= 0.0);
    assert_eq!(s["devices"], json!({"online": 4, "maintenance": 1}), "{s}");
    assert_eq!(s["open_breakers"], 0);

    // The 5g label: exactly the three sleeps, and their median duration.
    let s = api.get("/api/v1/dashboard/summary?window=1h&label=5g").await.body;
    assert_eq!(s["runs"], json!({"succeeded": 3, "failed": 0, "errored": 0, "timed_out": 0, "cancelled": 0}), "{s}");
    assert_eq!(s["success_rate"], 1.0);
    let p50 = get_f64(&s["duration_ms"]["p50"]);
    // The run resource rounds to whole milliseconds; the dashboard does not.
    assert!((p50 - median(&durations)).abs() <= 1.0, "p50 {p50} vs {durations:?}");
    assert!(get_f64(&s["duration_ms"]["p95"]) >= p50);
    assert_eq!(s["devices"], json!({"online": 1}));
    // A pool: the lab's runs (three passes and the cancelled one).
    let s = api.get("/api/v1/dashboard/summary?window=1h&pool=lab").await.body;
    assert_eq!(s["runs"]["succeeded"], 3);
    assert_eq!(s["runs"]["cancelled"], 1);
    assert_eq!(s["success_rate"], 1.0);
    let s = api.get("/api/v1/dashboard/summary?window=1h&pool=nowhere").await.body;
    assert_eq!(s["queue"]["depth"], 1);
    assert_eq!(s["success_rate"], Value::Null, "nothing decided in that pool: no rate");

    // Devices.
    let d = api.get("/api/v1/dashboard/devices?window=1h").await;
    assert_eq!(d.status, 200, "{:?}", d.body);
    let rows = d.body["items"].as_array().unwrap().clone();
    let row = |id: &str| rows.iter().find(|r| r["device_id"] == id).unwrap_or_else(|| panic!("no row {id}")).clone();
    let a = row(&five_g);
    assert_eq!(a["runs"]["succeeded"], 3);
    let mean = durations.iter().sum::<f64>() / 3.0;
    assert!((get_f64(&a["mean_duration_ms"]) - mean).abs() <= 1.0, "{a} vs {durations:?}");
    assert_eq!(a["breaker_state"], "closed");
    assert!(a["last_seen_at"].is_string());
    let e = row(&err_dev);
    assert_eq!(e["runs"]["errored"], 1);
    assert_eq!(e["infrastructure_errors"], 1);
    assert_eq!(e["success_rate"], 0.0);
    let f = row(&flaky_dev);
    assert_eq!((f["runs"]["failed"].clone(), f["runs"]["succeeded"].clone()), (json!(1), json!(1)));
    assert_eq!(rows.len(), 5);

    // Modules: steps, pass rate, flaky count.
    let m = api.get("/api/v1/dashboard/modules?window=1h").await.body;
    let items = m["items"].as_array().unwrap();
    let ping = items.iter().find(|r| r["module"] == "ping").unwrap();
    assert_eq!((ping["runs"].clone(), ping["passed"].clone(), ping["failed"].clone()), (json!(3), json!(1), json!(1)));
    assert_eq!(ping["errored"], 1);
    assert!((get_f64(&ping["pass_rate"]) - 1.0 / 3.0).abs() < 1e-9);
    assert_eq!(ping["flaky"], 1);
    let sleep = items.iter().find(|r| r["module"] == "sleep").unwrap();
    assert_eq!(
        (sleep["runs"].clone(), sleep["passed"].clone(), sleep["flaky"].clone()),
        (json!(3), json!(3), json!(0))
    );

    // Flaky: the failure, with the retry that passed (on the same device, too).
    let fl = api.get("/api/v1/dashboard/flaky?window=1h").await.body;
    let items = fl["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{fl}");
    assert_eq!(items[0]["run_id"], failed_id);
    assert_eq!(items[0]["module"], "ping");
    assert_eq!(items[0]["device_serial"], "dash-flaky");
    assert_eq!(items[0]["passed_on_retry"], json!([retry_id]));
    assert_eq!(items[0]["passed_on_same_device"], json!([retry_id]));
    assert_eq!(fl["next_cursor"], Value::Null, "{fl}");
    let capped = api.get("/api/v1/dashboard/flaky?window=1h&limit=1").await.body;
    assert_eq!(capped["items"], fl["items"], "{capped}");
    let r = api.get("/api/v1/dashboard/flaky?window=1h&limit=0").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body["error"]["details"]["fields"]["limit"].is_string(), "{:?}", r.body);

    // Recent activity: newest first, bounded, filtered.
    let recent = api.get("/api/v1/dashboard/activity/recent?window=1h&limit=5").await.body;
    let ids: Vec<i64> = recent["items"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    let bad = api.get("/api/v1/dashboard/activity/recent?window=1h&pool=bad&limit=500").await.body;
    let bad = bad["items"].as_array().unwrap();
    assert!(!bad.is_empty() && bad.iter().all(|e| e["device_id"] == err_dev.as_str()), "{bad:?}");

    // Bad input: the envelope, naming the parameter.
    for (query, field) in [
        ("window=abc", "window"),
        ("window=0h", "window"),
        ("window=500d", "window"),
        ("kind=bogus", "kind"),
        ("schedule_id=nope", "schedule_id"),
        ("since=1", "since"),
    ] {
        let r = api.get(&format!("/api/v1/dashboard/summary?{query}")).await;
        assert_eq!(r.status, 422, "{query}: {:?}", r.body);
        assert!(r.body["error"]["details"]["fields"][field].is_string(), "{query}: {:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_each_kind_ranked_and_bounded() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(FAST);
    device(&api, "R58M-KESTREL-01", "lab", json!(["volte"]), json!({})).await;
    device(&api, "R58M-OSPREY-02", "lab", json!([]), json!({})).await;
    let wf = api
        .post(
            "/api/v1/workflows",
            json!({"name": "kestrel-volte-smoke", "steps": [{"module": "sleep", "params": {"ms": 1}}]}),
        )
        .await;
    assert_eq!(wf.status, 201);
    let camp = api
        .post("/api/v1/campaigns", json!({"name": "kestrel-nightly", "items": [{"module": "sleep", "params": {"ms": 1}, "device": {"pool": "lab"}}]}))
        .await;
    assert_eq!(camp.status, 201, "{:?}", camp.body);
    let sched = api
        .post(
            "/api/v1/schedules",
            json!({"name": "kestrel-hourly", "cron": "0 0 * * * *", "enabled": false,
            "target": {"kind": "module", "id": "sleep", "params": {"ms": 1}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(sched.status, 201, "{:?}", sched.body);
    let host = api.post("/api/v1/hosts/register", json!({"name": "kestrel-rack", "url": "http://127.0.0.1:9"})).await;
    assert!(host.status == 200 || host.status == 201, "{:?}", host.body);
    let run = api.post("/api/v1/modules/sleep/runs", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    let run_id = run.body["id"].as_str().unwrap().to_string();
    let keyed = api
        .client
        .post(format!("{}/api/v1/modules/sleep/runs", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("idempotency-key", "ci-build-4711")
        .json(&json!({"params": {"ms": 1}, "device": {"pool": "lab"}}))
        .send()
        .await
        .unwrap();
    let keyed: Value = keyed.json().await.unwrap();

    let find = |q: String| {
        let api = &api;
        async move {
            let r = api.get(&format!("/api/v1/search?q={q}")).await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.body);
            r.body["items"].as_array().unwrap().clone()
        }
    };
    let hits = find("kestrel".into()).await;
    let kinds: Vec<&str> = hits.iter().map(|h| h["kind"].as_str().unwrap()).collect();
    for kind in ["device", "workflow", "campaign", "schedule", "host"] {
        assert!(kinds.contains(&kind), "{kind} not found: {hits:?}");
    }
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "ranked: {scores:?}");
    // An exact name first; a label; a near miss; a module of the catalog.
    assert_eq!(find("kestrel-nightly".into()).await[0]["kind"], "campaign");
    assert!(
        find("volte".into())
            .await
            .iter()
            .any(|h| h["kind"] == "device" && h["detail"].as_str().unwrap().contains("[volte]"))
    );
    assert!(find("R58M-OSPRY".into()).await.iter().any(|h| h["name"] == "R58M-OSPREY-02"), "a near miss");
    // A device found by what it is now called and labelled (its searched fields are
    // kept in a table of their own, migration 0016), and no longer once deleted.
    let osprey = hits_of(&find("R58M-OSPREY-02".into()).await, "device");
    let patched =
        api.patch(&format!("/api/v1/devices/{osprey}"), json!({"name": "harrier bench", "labels": ["nr-sa"]})).await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(hits_of(&find("harrier".into()).await, "device"), osprey);
    assert_eq!(hits_of(&find("nr-sa".into()).await, "device"), osprey);
    // Deleted once the runs that may be on it have ended (a leased device is refused).
    for id in [&run_id, keyed["id"].as_str().unwrap()] {
        api.wait_terminal(id, Duration::from_secs(30)).await;
    }
    let deleted = api.delete(&format!("/api/v1/devices/{osprey}")).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    for q in ["harrier", "nr-sa", "R58M-OSPREY-02"] {
        assert!(find(q.into()).await.iter().all(|h| h["id"] != osprey.as_str()), "a deleted device found by {q}");
    }
    let modules = find("airplane".into()).await;
    assert_eq!(modules[0]["kind"], "module", "{modules:?}");
    // Runs by id prefix and by idempotency key.
    let by_prefix = find(run_id[..8].to_string()).await;
    assert!(by_prefix.iter().any(|h| h["kind"] == "run" && h["id"] == run_id.as_str()), "{by_prefix:?}");
    let by_key = find("ci-build-4711".into()).await;
    assert_eq!(by_key[0]["id"], keyed["id"], "{by_key:?}");
    // Bounded, and bad input refused.
    assert_eq!(api.get("/api/v1/search?q=R58M&limit=1").await.body["items"].as_array().unwrap().len(), 1);
    for query in ["", "q=", "q=%20%20", "q=a&limit=0", "q=a&limit=101", "q=a&other=1"] {
        let r = api.get(&format!("/api/v1/search?{query}")).await;
        assert_eq!(r.status, 422, "{query}: {:?}", r.body);
    }
    let long = "x".repeat(201);
    assert_eq!(api.get(&format!("/api/v1/search?q={long}")).await.status, 422);
    // LIKE's wildcards are text, not patterns.
    assert!(find("%25".into()).await.iter().all(|h| h["kind"] != "device"), "a % matched every device");
}

/// The id of the one hit of `kind` among `hits`.
fn hits_of(hits: &[Value], kind: &str) -> String {
    let of: Vec<&Value> = hits.iter().filter(|h| h["kind"] == kind).collect();
    assert_eq!(of.len(), 1, "one {kind} among {hits:?}");
    of[0]["id"].as_str().unwrap().to_string()
}

/// The run's facts copied onto its steps (migration 0013), which the per-module figures
/// and flaky detection read: every step of an ended run carries when it ended, its
/// device, kind and schedule, whether the step was written at the end (a module run),
/// as the workflow went (stamped when the run ended) or by a cancel mid-step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_of_an_ended_run_carries_the_runs_facts() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(FAST);
    device(&api, "facts-1", "facts", json!([]), json!({})).await;
    let module = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "facts"}})).await;
    let module = module["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&module, Duration::from_secs(30)).await["status"], "succeeded");
    let wf = api
        .post(
            "/api/v1/workflows",
            json!({"name": "facts-wf", "steps": [{"module": "sleep", "params": {"ms": 1}}, {"module": "sleep", "params": {"ms": 60000}}]}),
        )
        .await;
    let path = format!("/api/v1/workflows/{}/runs", wf.body["id"].as_str().unwrap());
    let run = api.post(&path, json!({"device": {"pool": "facts"}})).await;
    let wf_run = run.body["id"].as_str().unwrap().to_string();
    let pg = env.pg().await;
    // Its first step recorded as it went, before the run ends: no end on it yet.
    eventually(Duration::from_secs(15), "the first step recorded", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM run_steps WHERE run_id = $1 AND status = 'passed' AND run_finished_at IS NULL AND device_id IS NOT NULL",
        )
        .bind(wf_run.parse::<uuid::Uuid>().unwrap())
        .fetch_one(&pg)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(api.post(&format!("/api/v1/runs/{wf_run}/cancel"), json!({})).await.status, 200);
    assert_eq!(api.wait_terminal(&wf_run, Duration::from_secs(15)).await["status"], "cancelled");

    let rows: Vec<(uuid::Uuid, i32, bool)> = sqlx::query_as(
        "SELECT s.run_id, s.idx,
                s.run_finished_at IS NOT DISTINCT FROM r.finished_at AND s.device_id IS NOT DISTINCT FROM r.device_id
                AND s.run_kind IS NOT DISTINCT FROM r.kind AND s.schedule_id IS NOT DISTINCT FROM r.schedule_id
         FROM run_steps s JOIN runs r ON r.id = s.run_id ORDER BY r.created_at, s.idx",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    let ids: Vec<String> = rows.iter().map(|(id, idx, _)| format!("{id}/{idx}")).collect();
    assert_eq!(ids, [format!("{module}/0"), format!("{wf_run}/0"), format!("{wf_run}/1")]);
    assert!(rows.iter().all(|(_, _, same)| *same), "{rows:?}");
    let stamped: i64 = sqlx::query_scalar("SELECT count(*) FROM run_steps WHERE run_finished_at IS NOT NULL")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(stamped, 3);
    // The modules figures read them: the two passes, and the cancelled step left out.
    let m = api.get("/api/v1/dashboard/modules?window=1h&pool=facts").await.body;
    let sleep = m["items"].as_array().unwrap().iter().find(|r| r["module"] == "sleep").cloned().unwrap();
    assert_eq!((sleep["runs"].clone(), sleep["passed"].clone()), (json!(2), json!(2)), "{m}");
    let m = api.get("/api/v1/dashboard/modules?window=1h&kind=workflow").await.body;
    assert_eq!(m["items"][0]["passed"], 1, "{m}");
}

/// Ages a run (and, with `family`, its campaign children) by `days`, as if it had
/// ended then.
async fn age(pg: &sqlx::PgPool, run: &str, days: i32, family: bool) {
    let id: uuid::Uuid = run.parse().unwrap();
    sqlx::query(
        "UPDATE runs SET finished_at = now() - make_interval(days => $2), started_at = now() - make_interval(days => $2)
         WHERE id = $1 OR ($3 AND parent_run_id = $1)",
    )
    .bind(id)
    .bind(days)
    .bind(family)
    .execute(pg)
    .await
    .unwrap();
}

async fn count(pg: &sqlx::PgPool, sql: &'static str, run: &str) -> i64 {
    sqlx::query_scalar(sql).bind(run.parse::<uuid::Uuid>().unwrap()).fetch_one(pg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_exactly_the_old_ended_runs_with_their_steps_and_events() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(FAST);
    device(&api, "ret-1", "ret", json!([]), json!({})).await;
    let parked = device(&api, "ret-parked", "parked", json!([]), json!({})).await;
    let sleep = json!({"params": {"ms": 1}, "device": {"pool": "ret"}});
    let mut ended = Vec::new();
    for _ in 0..3 {
        let r = api.start("sleep", sleep.clone()).await;
        ended.push(r["id"].as_str().unwrap().to_string());
    }
    let wf = api.post("/api/v1/workflows", json!({"name": "ret-wf", "steps": [{"module": "sleep", "params": {"ms": 1}}, {"module": "sleep", "params": {"ms": 1}}]})).await;
    let r = api
        .post(
            &format!("/api/v1/workflows/{}/runs", wf.body["id"].as_str().unwrap()),
            json!({"device": {"pool": "ret"}}),
        )
        .await;
    ended.push(r.body["id"].as_str().unwrap().to_string());
    let camp = api
        .post(
            "/api/v1/campaigns",
            json!({"name": "ret-camp", "items": [
            {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "ret"}},
            {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "ret"}}]}),
        )
        .await;
    let camp_id = camp.body["id"].as_str().unwrap().to_string();
    let mut campaigns = Vec::new();
    for _ in 0..2 {
        let r = api.post(&format!("/api/v1/campaigns/{camp_id}/runs"), json!({})).await;
        campaigns.push(r.body["id"].as_str().unwrap().to_string());
    }
    for id in ended.iter().chain(&campaigns) {
        assert_eq!(api.wait_terminal(id, Duration::from_secs(30)).await["status"], "succeeded");
    }
    assert_eq!(api.patch(&format!("/api/v1/devices/{parked}"), json!({"status": "maintenance"})).await.status, 200);
    let waiting = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "parked"}})).await;
    let waiting = waiting["id"].as_str().unwrap().to_string();

    let pg = env.pg().await;
    // Old: two module runs, the workflow run, and the first campaign with its children.
    let (old, recent) =
        (vec![ended[0].clone(), ended[1].clone(), ended[3].clone(), campaigns[0].clone()], ended[2].clone());
    for id in &old {
        age(&pg, id, 100, true).await;
    }
    // The second campaign: only its children are old (it ended recently): kept whole.
    age(&pg, &campaigns[1], 100, false).await;
    sqlx::query("UPDATE runs SET finished_at = now() - interval '100 days' WHERE parent_run_id = $1")
        .bind(campaigns[1].parse::<uuid::Uuid>().unwrap())
        .execute(&pg)
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET finished_at = now() WHERE id = $1")
        .bind(campaigns[1].parse::<uuid::Uuid>().unwrap())
        .execute(&pg)
        .await
        .unwrap();
    // A queued run, however old its timestamps, is never pruned.
    age(&pg, &waiting, 100, false).await;
    // An old event about a device, and a recent one.
    sqlx::query("UPDATE events SET at = now() - interval '100 days' WHERE type = 'device.created' AND run_id IS NULL AND data -> 'device' ->> 'serial' = 'ret-1'")
        .execute(&pg)
        .await
        .unwrap();
    let old_children: Vec<String> = sqlx::query_scalar("SELECT id::text FROM runs WHERE parent_run_id = $1")
        .bind(campaigns[0].parse::<uuid::Uuid>().unwrap())
        .fetch_all(&pg)
        .await
        .unwrap();
    assert_eq!(old_children.len(), 2);

    let _scheduler = env.scheduler(&[("SWITCHBOARD_RETENTION_INTERVAL_S", "1")]);
    eventually(Duration::from_secs(20), "the old runs pruned", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = ANY ($1::uuid[])")
            .bind(old.iter().map(|s| s.parse::<uuid::Uuid>().unwrap()).collect::<Vec<_>>())
            .fetch_one(&pg)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    for id in old.iter().chain(&old_children) {
        assert_eq!(count(&pg, "SELECT count(*) FROM runs WHERE id = $1", id).await, 0, "{id}");
        assert_eq!(count(&pg, "SELECT count(*) FROM run_steps WHERE run_id = $1", id).await, 0, "{id}'s steps");
        assert_eq!(count(&pg, "SELECT count(*) FROM events WHERE run_id = $1", id).await, 0, "{id}'s events");
        assert_eq!(api.get(&format!("/api/v1/runs/{id}")).await.status, 404);
    }
    // Everything else stays, with its steps and events.
    let kept: Vec<String> = vec![recent, waiting, campaigns[1].clone()];
    for id in &kept {
        assert_eq!(count(&pg, "SELECT count(*) FROM runs WHERE id = $1", id).await, 1, "{id} kept");
        assert!(count(&pg, "SELECT count(*) FROM events WHERE run_id = $1", id).await > 0, "{id}'s events kept");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM runs WHERE parent_run_id = $1", &campaigns[1]).await, 2);
    assert_eq!(count(&pg, "SELECT count(*) FROM run_steps WHERE run_id = $1", &kept[0]).await, 1);
    let old_device_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE type = 'device.created' AND at < now() - interval '90 days'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(old_device_events, 0);
    let device_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'device.created'").fetch_one(&pg).await.unwrap();
    assert_eq!(device_events, 1, "the recent device's creation is kept");
}

/// One ended run written straight into the history: `steps` are (module, params,
/// status); the run ended `ago_s` seconds ago on `device`. History of every shape in
/// a second, where making each case with real runs would need a scriptable device.
async fn ended_run(
    pg: &sqlx::PgPool,
    device: &str,
    steps: &[(&str, Value, &str)],
    ago_s: i64,
    retry_of: Option<&str>,
) -> String {
    let id = uuid::Uuid::new_v4();
    let failed = steps.iter().any(|s| s.2 == "failed");
    let (kind, target) = if steps.len() > 1 { ("workflow", "wf") } else { ("module", steps[0].0) };
    sqlx::query(
        "INSERT INTO runs (id, kind, target, definition, device_id, status, timeout_s, trigger, retry_of,
                           started_at, finished_at, created_at)
         VALUES ($1, $2::run_kind, $3, '{}', $4, $5::run_status, 60, $6::run_trigger, $7,
                 now() - make_interval(secs => $8 + 1), now() - make_interval(secs => $8),
                 now() - make_interval(secs => $8 + 2))",
    )
    .bind(id)
    .bind(kind)
    .bind(target)
    .bind(device.parse::<uuid::Uuid>().unwrap())
    .bind(if failed { "failed" } else { "succeeded" })
    .bind(if retry_of.is_some() { "retry" } else { "api" })
    .bind(retry_of.map(|r| r.parse::<uuid::Uuid>().unwrap()))
    .bind(ago_s as f64)
    .execute(pg)
    .await
    .unwrap();
    for (idx, (module, params, status)) in steps.iter().enumerate() {
        sqlx::query(
            "INSERT INTO run_steps (run_id, idx, module, params, status, attempt, started_at, finished_at,
                                    run_finished_at, device_id, run_kind)
             SELECT r.id, $2, $3, $4, $5::step_status, 1, r.started_at, r.finished_at, r.finished_at, r.device_id, r.kind
             FROM runs r WHERE r.id = $1",
        )
        .bind(id)
        .bind(idx as i32)
        .bind(module)
        .bind(params)
        .bind(status)
        .execute(pg)
        .await
        .unwrap();
    }
    id.to_string()
}

/// Flaky detection, case by case (docs/dashboard.md): the modules route counts what
/// the flaky route lists, and the list pages exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_detection_decides_each_case_and_pages_exactly() {
    let env = Env::new();
    let api = env.api(&[]);
    let pg = env.pg().await;
    let a = device(&api, "flk-a", "flk", json!([]), json!({})).await;
    let b = device(&api, "flk-b", "flk", json!([]), json!({})).await;
    let c = device(&api, "flk-c", "flk", json!([]), json!({})).await;
    let d = device(&api, "flk-d", "flk", json!([]), json!({})).await;
    let e = json!({});
    let step = |m: &'static str, s: &'static str| vec![(m, json!({}), s)];
    // A pass in the failure's own run only: not flaky.
    ended_run(&pg, &a, &[("same_run", e.clone(), "passed"), ("same_run", e.clone(), "failed")], 100, None).await;
    // Failed, its retry failed elsewhere, the retry's retry passed elsewhere: both flaky
    // by their retries, and on no device.
    let r2 = ended_run(&pg, &a, &step("by_retry", "failed"), 110, None).await;
    let r3 = ended_run(&pg, &c, &step("by_retry", "failed"), 105, Some(&r2)).await;
    let r4 = ended_run(&pg, &b, &step("by_retry", "passed"), 102, Some(&r3)).await;
    // One passing run, two failing runs: both flaky.
    let p1 = ended_run(&pg, &a, &step("one_pass", "passed"), 120, None).await;
    ended_run(&pg, &a, &step("one_pass", "failed"), 121, None).await;
    ended_run(&pg, &a, &step("one_pass", "failed"), 90, None).await;
    // Two passes: flaky, the newest pass first.
    let p2 = ended_run(&pg, &a, &step("two_passes", "passed"), 130, None).await;
    let p3 = ended_run(&pg, &a, &step("two_passes", "passed"), 80, None).await;
    ended_run(&pg, &a, &step("two_passes", "failed"), 131, None).await;
    // Passes elsewhere, with other params, or before the window: not flaky.
    ended_run(&pg, &a, &step("other_device", "failed"), 140, None).await;
    ended_run(&pg, &b, &step("other_device", "passed"), 141, None).await;
    ended_run(&pg, &a, &[("other_params", json!({"n": 1}), "failed")], 150, None).await;
    ended_run(&pg, &a, &[("other_params", json!({"n": 2}), "passed")], 151, None).await;
    ended_run(&pg, &a, &step("old_pass", "failed"), 160, None).await;
    ended_run(&pg, &a, &step("old_pass", "passed"), 7200, None).await;
    // Many flaky failures on one device, to page through.
    ended_run(&pg, &d, &step("many", "passed"), 3000, None).await;
    for i in 0..130 {
        ended_run(&pg, &d, &step("many", "failed"), 200 + i * 10, None).await;
    }

    let m = api.get("/api/v1/dashboard/modules?window=1h").await;
    assert_eq!(m.status, 200, "{:?}", m.body);
    let flaky: Vec<(String, i64, i64)> = m.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["module"].as_str().unwrap().to_string(), r["failed"].as_i64().unwrap(), r["flaky"].as_i64().unwrap())
        })
        .collect();
    let want = [
        ("by_retry", 2, 2),
        ("many", 130, 130),
        ("old_pass", 1, 0),
        ("one_pass", 2, 2),
        ("other_device", 1, 0),
        ("other_params", 1, 0),
        ("same_run", 1, 0),
        ("two_passes", 1, 1),
    ];
    assert_eq!(flaky, want.map(|(m, f, k)| (m.to_string(), f, k)), "{}", m.body);

    // The list: every flaky failure once, each with what makes it flaky.
    let all = api.get("/api/v1/dashboard/flaky?window=1h&limit=500").await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    assert_eq!(all.body["next_cursor"], Value::Null);
    let items = all.body["items"].as_array().unwrap().clone();
    for (module, _, n) in want {
        assert_eq!(items.iter().filter(|i| i["module"] == module).count() as i64, n, "{module}");
    }
    let of =
        |run: &str| items.iter().find(|i| i["run_id"] == run).unwrap_or_else(|| panic!("{run} not listed")).clone();
    assert_eq!(
        (of(&r2)["passed_on_retry"].clone(), of(&r2)["passed_on_same_device"].clone()),
        (json!([r4]), json!([]))
    );
    assert_eq!(of(&r3)["passed_on_retry"], json!([r4]));
    let two = items.iter().find(|i| i["module"] == "two_passes").unwrap();
    assert_eq!(two["passed_on_same_device"], json!([p3, p2]));
    assert!(items.iter().filter(|i| i["module"] == "one_pass").all(|i| i["passed_on_same_device"] == json!([p1])));
    let at: Vec<chrono::DateTime<chrono::Utc>> = items.iter().map(|i| ts(&i["failed_at"])).collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // Pages of 50 (the default) put together are the whole list, in its order; so are
    // pages of 1, whose first slices of failures (the four after the cursor) are often
    // too few flaky, so that the next slices are decided.
    let (paged, sizes) = pages(&api, "").await;
    assert_eq!(sizes, [50, 50, 35]);
    assert_eq!(paged, items);
    let (paged, sizes) = pages(&api, "&limit=1").await;
    assert_eq!(sizes, vec![1; 135]);
    assert_eq!(paged, items);
    for bad in ["cursor=abc", "cursor=Zmxha3l8MXx4fDI", "limit=501"] {
        let r = api.get(&format!("/api/v1/dashboard/flaky?window=1h&{bad}")).await;
        assert_eq!(r.status, 422, "{bad}: {:?}", r.body);
    }
}

/// Every page of `/dashboard/flaky?window=1h` (with `more` query), following the
/// cursors: the items put together, and each page's size.
async fn pages(api: &Api, more: &str) -> (Vec<Value>, Vec<usize>) {
    let (mut items, mut sizes) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let page = api.get(&format!("/api/v1/dashboard/flaky?window=1h{more}{q}")).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let got = page.body["items"].as_array().unwrap();
        sizes.push(got.len());
        items.extend(got.iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (items, sizes),
        }
    }
}

/// Windows whose per-module figures read the day rollup (`step_days`), as the API
/// queries them.
const ROLLED_WINDOWS: [&str; 6] = ["7d", "30d", "2d", "7d&pool=rl", "7d&kind=workflow", "1h"];

async fn module_items(api: &Api, query: &str) -> Value {
    let m = api.get(&format!("/api/v1/dashboard/modules?window={query}")).await;
    assert_eq!(m.status, 200, "{query}: {:?}", m.body);
    m.body["items"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_figures_read_from_the_day_rollup_equal_those_counted_live() {
    let env = Env::new();
    let api = env.api(&[]);
    let pg = env.pg().await;
    let a = device(&api, "rl-a", "rl", json!([]), json!({})).await;
    let b = device(&api, "rl-b", "rl2", json!([]), json!({})).await;
    let (e, day) = (json!({}), 86_400);
    let step = |m: &'static str, s: &'static str| vec![(m, json!({}), s)];
    // Passes three days and an hour ago, a failure in between: flaky, its group settled
    // by a rolled-up pass and a live one.
    ended_run(&pg, &a, &step("across", "passed"), 3 * day, None).await;
    ended_run(&pg, &a, &step("across", "failed"), 2 * day, None).await;
    ended_run(&pg, &a, &step("across", "passed"), 3600, None).await;
    // One pass, on an earlier day than the failure: flaky, decided one by one.
    ended_run(&pg, &a, &step("one_pass", "passed"), 5 * day / 2, None).await;
    ended_run(&pg, &a, &step("one_pass", "failed"), 3 * day / 2, None).await;
    // Failed four days ago, its retry passed on another device: flaky by the retry.
    let r = ended_run(&pg, &a, &step("by_retry", "failed"), 4 * day, None).await;
    ended_run(&pg, &b, &step("by_retry", "passed"), 4 * day - 100, Some(&r)).await;
    // Failed with no pass in a week; errored and timed out; a pass ten days back counts
    // in the 30-day window only, where it makes the failure flaky.
    ended_run(&pg, &b, &step("plain", "failed"), 5 * day, None).await;
    ended_run(&pg, &b, &step("plain", "errored"), 6 * day, None).await;
    ended_run(&pg, &b, &step("plain", "timed_out"), day / 2, None).await;
    ended_run(&pg, &b, &step("plain", "passed"), 10 * day, None).await;
    // A workflow run two days ago (for the kind filter), and a run long past retention.
    ended_run(&pg, &a, &[("across", e.clone(), "passed"), ("plain", e.clone(), "failed")], 2 * day + 60, None).await;
    let ancient = ended_run(&pg, &a, &step("plain", "passed"), 100 * day, None).await;

    // Counted live (nothing rolled up yet), with the figures this history makes.
    let mut live = Vec::new();
    for q in ROLLED_WINDOWS {
        live.push(module_items(&api, q).await);
    }
    let week: Vec<(String, i64, i64, i64, i64, i64)> = live[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_i64().unwrap();
            (r["module"].as_str().unwrap().into(), n("passed"), n("failed"), n("errored"), n("timed_out"), n("flaky"))
        })
        .collect();
    let want =
        [("across", 3, 1, 0, 0, 1), ("by_retry", 1, 1, 0, 0, 1), ("one_pass", 1, 1, 0, 0, 1), ("plain", 0, 2, 1, 1, 0)];
    assert_eq!(week, want.map(|(m, p, f, e, t, k)| (m.to_string(), p, f, e, t, k)), "{}", live[0]);
    let month = live[1].as_array().unwrap().iter().find(|r| r["module"] == "plain").unwrap().clone();
    assert_eq!((month["passed"].clone(), month["flaky"].clone()), (json!(1), json!(1)), "{month}");

    // The scheduler rolls up every day that has ended, and prunes what is past
    // retention, the rollup of its days with it.
    let _scheduler = env.scheduler(&[("SWITCHBOARD_RETENTION_INTERVAL_S", "1")]);
    eventually(Duration::from_secs(60), "the rollup current and the old day pruned", || async {
        let (through, old, ancient_left): (bool, i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT through >= date_bin('1 day', now() - interval '2 minutes', 'epoch') FROM step_rollup), false),
                    (SELECT count(*) FROM step_days WHERE day < now() - interval '91 days'),
                    (SELECT count(*) FROM runs WHERE id = $1)",
        )
        .bind(ancient.parse::<uuid::Uuid>().unwrap())
        .fetch_one(&pg)
        .await
        .unwrap();
        (through && old == 0 && ancient_left == 0).then_some(())
    })
    .await;
    let (rolled, weeks): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE days = 1 AND day > now() - interval '8 days'), count(*) FILTER (WHERE days = 7)
         FROM step_days",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(rolled >= 8, "the week's days are rolled up: {rolled} rows");
    // The 30-day window spans whole weeks, read as weeks: the history of ten to three
    // days back is in one or two of them.
    assert!(weeks >= 1, "no week rolled up");

    // Read from the rollup, every window's figures are those counted live.
    for (q, want) in ROLLED_WINDOWS.iter().zip(&live) {
        assert_eq!(&module_items(&api, q).await, want, "{q}");
    }
    // And they are read from it: a change to a rolled-up day shows.
    let bump = "UPDATE step_days SET passed = passed + $1 WHERE days = 1 AND module = 'plain'
                AND day < now() - interval '4 days' AND day > now() - interval '7 days'";
    sqlx::query(bump).bind(1000i64).execute(&pg).await.unwrap();
    let bumped = module_items(&api, "7d").await;
    let plain = bumped.as_array().unwrap().iter().find(|r| r["module"] == "plain").unwrap();
    assert_eq!(plain["passed"], 2000, "two days of 'plain' read from the rollup: {plain}");
    sqlx::query(bump).bind(-1000i64).execute(&pg).await.unwrap();
}
