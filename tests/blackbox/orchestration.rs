//! Issue 4: workflows and campaigns, orchestrated server-side.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{Api, Env, FAST, eventually, ts, types, with};

const T: Duration = Duration::from_secs(40);
async fn workflow(api: &Api, name: &str, steps: Value) -> String {
    let r = api.post("/api/v1/workflows", json!({"name": name, "steps": steps})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

async fn start_workflow(api: &Api, id: &str, body: Value) -> String {
    let r = api.post(&format!("/api/v1/workflows/{id}/runs"), body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

async fn campaign(api: &Api, body: Value) -> String {
    let r = api.post("/api/v1/campaigns", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

async fn start_campaign(api: &Api, id: &str) -> String {
    let r = api.post(&format!("/api/v1/campaigns/{id}/runs"), json!({})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.body["kind"], "campaign");
    r.body["id"].as_str().unwrap().to_string()
}

async fn children(api: &Api, parent: &str) -> Vec<Value> {
    let r = api.get(&format!("/api/v1/runs?parent_run_id={parent}&limit=500")).await;
    assert_eq!(r.status, 200);
    r.body["items"].as_array().cloned().unwrap_or_default()
}

/// Most children whose [started_at, finished_at) intervals overlap at one instant.
fn max_overlap(kids: &[Value]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for k in kids {
        if k["started_at"].is_string() && k["finished_at"].is_string() {
            edges.push((ts(&k["started_at"]), 1));
            edges.push((ts(&k["finished_at"]), -1));
        }
    }
    edges.sort(); // ends (-1) before starts (+1) at the same instant
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_runs_its_steps_in_order_on_one_device() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    api.devices("orc-wf", "lab", 3, json!({"latency_ms": 10})).await;
    let wf = workflow(
        &api,
        "smoke",
        json!([
            {"module": "device_info"},
            {"module": "ping", "params": {"count": 2}},
            {"module": "sleep", "params": {"ms": 50}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}})).await;
    let run = api.wait_terminal(&id, T).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["kind"], "workflow");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    let modules: Vec<&str> = steps.iter().map(|s| s["module"].as_str().unwrap()).collect();
    assert_eq!(modules, ["device_info", "ping", "sleep"]);
    for w in steps.windows(2) {
        assert_eq!(w[0]["status"], "passed");
        assert!(ts(&w[0]["finished_at"]) <= ts(&w[1]["started_at"]), "steps overlapped: {w:?}");
    }
    assert_eq!(steps[1]["result"]["sent"], 2);
    // One device for every step.
    let events = api.events(&id).await;
    let step_events: Vec<&Value> = events.iter().filter(|e| e["type"] == "run.step").collect();
    assert_eq!(step_events.len(), 6, "{:?}", types(&events));
    assert!(step_events.iter().all(|e| e["device_id"] == run["device_id"]));
    assert_eq!(run["result"]["passed"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_on_failure_and_a_failing_step() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    api.device("orc-cof-1", "lab", json!({})).await;
    let tolerant = workflow(
        &api,
        "tolerant",
        json!([
            {"module": "sleep", "params": {"ms": 10, "outcome": "failed"}, "continue_on_failure": true},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let strict = workflow(
        &api,
        "strict",
        json!([
            {"module": "sleep", "params": {"ms": 10, "outcome": "failed"}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let a = start_workflow(&api, &tolerant, json!({"device": {"pool": "lab"}})).await;
    let b = start_workflow(&api, &strict, json!({"device": {"pool": "lab"}})).await;
    let a = api.wait_terminal(&a, T).await;
    assert_eq!(a["status"], "succeeded", "a tolerated failure does not fail the run: {a}");
    assert_eq!(a["steps"][0]["status"], "failed");
    assert_eq!(a["steps"][1]["status"], "passed");
    assert_eq!(a["result"]["tolerated_failures"], json!([0]));
    let b = api.wait_terminal(&b, T).await;
    assert_eq!(b["status"], "failed");
    assert_eq!(b["attempt"], 1, "a failed verdict is never retried");
    assert_eq!(b["steps"][0]["status"], "failed");
    assert_eq!(b["steps"][1]["status"], "skipped");
    assert_eq!(b["result"]["failed_step"]["index"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_definitions_are_validated_versioned_and_snapshotted() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("orc-def-1", "lab", json!({})).await;
    let r = api
        .post(
            "/api/v1/workflows",
            json!({"name": "bad", "steps": [
                {"module": "ping"}, {"module": "teleport"}, {"module": "sleep", "params": {"ms": "soon"}}
            ]}),
        )
        .await;
    assert_eq!(r.status, 422);
    let fields = &r.body["error"]["details"]["fields"];
    assert!(fields["steps[1].module"].as_str().unwrap().starts_with("unknown module"), "{fields}");
    assert_eq!(fields["steps[2].params.ms"], "must be an integer (got a string)");

    let wf = workflow(&api, "snap", json!([{"module": "sleep", "params": {"ms": 10}}])).await;
    assert_eq!(
        api.post("/api/v1/workflows", json!({"name": "snap", "steps": [{"module": "reboot"}]})).await.status,
        409
    );

    // No worker yet: the run stays queued while the workflow is edited.
    let run = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}})).await;
    let put = api
        .request(
            "PUT",
            &format!("/api/v1/workflows/{wf}"),
            Some(json!({"name": "snap", "steps": [
                {"module": "sleep", "params": {"ms": 10}}, {"module": "sleep", "params": {"ms": 10}}
            ]})),
            Some(crate::harness::ADMIN_TOKEN),
        )
        .await;
    assert_eq!(put.status, 200);
    assert_eq!(put.body["version"], 2);
    let _w = env.worker(&[]);
    let run = api.wait_terminal(&run, T).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["steps"].as_array().unwrap().len(), 1, "the queued run kept its snapshot");
    assert_eq!(run["definition"]["version"], 1);

    // A workflow used by a campaign cannot be deleted.
    campaign(&api, json!({"name": "uses-snap", "items": [{"workflow_id": wf, "device": {"pool": "lab"}}]})).await;
    let del = api.delete(&format!("/api/v1/workflows/{wf}")).await;
    assert_eq!(del.status, 409);
    assert!(del.body["error"]["message"].as_str().unwrap().contains("uses-snap"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infrastructure_error_resumes_the_workflow_at_the_failed_step() {
    let env = Env::new();
    let api = env.api(&[]);
    let _s = env.scheduler(FAST);
    let _w = env.worker(&[("SWITCHBOARD_RETRY_BASE_MS", "200"), ("SWITCHBOARD_BREAKER_THRESHOLD", "100")]);
    api.device("orc-resume-1", "lab", json!({})).await;
    let wf = workflow(
        &api,
        "flaky",
        json!([
            {"module": "sleep", "params": {"ms": 10}},
            {"module": "sleep", "params": {"ms": 10, "outcome": "error"}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}, "max_attempts": 3})).await;
    let run = api.wait_terminal(&id, T).await;
    assert_eq!(run["status"], "errored", "{run}");
    assert_eq!(run["attempt"], 3);
    assert_eq!(run["steps"][0]["attempt"], 1, "a passed step is not run again");
    assert_eq!(run["steps"][1]["attempt"], 3, "the failing step says how often it ran");
    assert_eq!(run["steps"][1]["status"], "errored");
    assert_eq!(run["steps"][2]["status"], "skipped");
    assert_eq!(run["error"]["step"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_between_steps_keeps_the_device() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    let device = api.device("orc-pause-1", "lab", json!({})).await;
    let wf = workflow(
        &api,
        "pausable",
        json!([
            {"module": "sleep", "params": {"ms": 400}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}})).await;
    eventually(T, "step 0 running", || async {
        let r = api.run(&id).await;
        (r["steps"][0]["status"] == "running").then_some(())
    })
    .await;
    let p = api.post(&format!("/api/v1/runs/{id}/pause"), json!({})).await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    assert_eq!((p.body["paused"].as_bool(), p.body["status"].as_str()), (Some(true), Some("running")));
    assert_eq!(api.post(&format!("/api/v1/runs/{id}/pause"), json!({})).await.status, 409);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = api.run(&id).await;
    assert_eq!(r["status"], "running");
    assert_eq!(r["steps"][0]["status"], "passed");
    assert!(r["steps"].as_array().unwrap().len() == 1, "step 1 must not start while paused: {r}");
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await.body;
    assert_eq!(d["lease"]["run_id"], id, "a paused workflow keeps its device");
    let resumed = api.post(&format!("/api/v1/runs/{id}/resume"), json!({})).await;
    assert_eq!((resumed.status, resumed.body["paused"].as_bool()), (200, Some(false)));
    let r = api.wait_terminal(&id, T).await;
    assert_eq!(r["status"], "succeeded");
    let events = types(&api.events(&id).await);
    assert!(events.contains(&"run.paused".to_string()) && events.contains(&"run.resumed".to_string()));
    // Module runs cannot be paused.
    let m = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    assert_eq!(api.post(&format!("/api/v1/runs/{}/pause", m["id"].as_str().unwrap()), json!({})).await.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_never_exceeds_max_parallel_and_summarises() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "8")]);
    api.devices("orc-par", "farm", 6, json!({})).await;
    let items: Vec<Value> =
        (0..6).map(|_| json!({"module": "sleep", "params": {"ms": 300}, "device": {"pool": "farm"}})).collect();
    let c = campaign(&api, json!({"name": "six", "items": items, "max_parallel": 2})).await;
    let run = start_campaign(&api, &c).await;
    let parent = api.wait_terminal(&run, Duration::from_secs(60)).await;
    assert_eq!(parent["status"], "succeeded", "{parent}");
    assert_eq!(parent["result"]["total"], 6);
    assert_eq!(parent["result"]["counts"]["succeeded"], 6);
    assert_eq!(parent["children"]["succeeded"], 6);
    assert_eq!(parent["children"]["total"], 6);
    let kids = children(&api, &run).await;
    assert_eq!(kids.len(), 6);
    assert!(kids.iter().all(|k| k["status"] == "succeeded"));
    let overlap = max_overlap(&kids);
    assert!(overlap <= 2, "{overlap} children ran at once");
    assert_eq!(overlap, 2, "with 6 free devices, two should run side by side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_on_failure_cancels_the_children_not_yet_started() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "8")]);
    api.devices("orc-stop", "farm", 4, json!({})).await;
    let c = campaign(
        &api,
        json!({"name": "stopper", "stop_on_failure": true, "max_parallel": 2, "items": [
            {"module": "sleep", "params": {"ms": 400}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 20, "outcome": "failed"}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 10}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 10}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 10}, "device": {"pool": "farm"}},
        ]}),
    )
    .await;
    let run = start_campaign(&api, &c).await;
    let parent = api.wait_terminal(&run, T).await;
    assert_eq!(parent["status"], "failed", "{parent}");
    assert_eq!(parent["result"]["stopped_on_failure"], true);
    let counts = &parent["result"]["counts"];
    assert_eq!(
        (counts["succeeded"].as_i64(), counts["failed"].as_i64(), counts["cancelled"].as_i64()),
        (Some(1), Some(1), Some(3)),
        "{counts}"
    );
    for k in children(&api, &run).await {
        if k["status"] == "cancelled" {
            assert!(k["started_at"].is_null(), "only children not yet started are cancelled: {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_survives_its_worker_being_killed() {
    let env = Env::new();
    let api = env.api(&[]);
    let _s = env.scheduler(FAST);
    let mut a = env.worker(&with(FAST, &[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]));
    api.devices("orc-kill", "farm", 3, json!({})).await;
    let items: Vec<Value> =
        (0..6).map(|_| json!({"module": "sleep", "params": {"ms": 1000}, "device": {"pool": "farm"}})).collect();
    let c = campaign(&api, json!({"name": "crashy", "items": items, "max_parallel": 2})).await;
    let run = start_campaign(&api, &c).await;
    eventually(T, "two children running", || async {
        let kids = children(&api, &run).await;
        (kids.iter().filter(|k| k["status"] == "running").count() == 2).then_some(())
    })
    .await;
    a.sigkill();
    let _b = env.worker(&with(FAST, &[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]));
    let parent = api.wait_terminal(&run, Duration::from_secs(90)).await;
    assert_eq!(parent["status"], "succeeded", "{parent}");
    let kids = children(&api, &run).await;
    assert_eq!(kids.len(), 6);
    for k in &kids {
        assert_eq!(k["status"], "succeeded");
        let events = api.events(k["id"].as_str().unwrap()).await;
        assert_eq!(events.iter().filter(|e| e["type"] == "run.finished").count(), 1, "{:?}", types(&events));
    }
    assert!(kids.iter().any(|k| k["attempt"] == 2), "a killed child should have been recovered");
    // Never more than max_parallel admitted at once: each child's attempts (from its
    // events) never overlap more than two other children's.
    let mut spans = Vec::new();
    for k in &kids {
        let events = api.events(k["id"].as_str().unwrap()).await;
        let start = events.iter().find(|e| e["type"] == "run.started").map(|e| e["at"].clone()).unwrap();
        spans.push(json!({"started_at": start, "finished_at": k["finished_at"]}));
    }
    let overlap = max_overlap(&spans);
    assert!(overlap <= 2, "{overlap} children were in flight at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_campaign_cancels_its_children() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]);
    api.devices("orc-cc", "farm", 2, json!({})).await;
    let items: Vec<Value> =
        (0..4).map(|_| json!({"module": "sleep", "params": {"ms": 30000}, "device": {"pool": "farm"}})).collect();
    let c = campaign(&api, json!({"name": "long", "items": items, "max_parallel": 2})).await;
    let run = start_campaign(&api, &c).await;
    eventually(T, "two children running", || async {
        let kids = children(&api, &run).await;
        (kids.iter().filter(|k| k["status"] == "running").count() == 2).then_some(())
    })
    .await;
    let r = api.post(&format!("/api/v1/runs/{run}/cancel"), json!({})).await;
    assert_eq!(r.status, 200);
    let parent = api.wait_terminal(&run, Duration::from_secs(15)).await;
    assert_eq!(parent["status"], "cancelled");
    let kids = children(&api, &run).await;
    assert!(kids.iter().all(|k| k["status"] == "cancelled"), "{kids:?}");
    assert_eq!(api.post(&format!("/api/v1/runs/{run}/cancel"), json!({})).await.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_makes_a_new_run_of_the_same_snapshot() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "4")]);
    api.devices("orc-retry", "farm", 2, json!({})).await;
    let failed =
        api.start("sleep", json!({"params": {"ms": 5, "outcome": "failed"}, "device": {"pool": "farm"}})).await;
    let failed_id = failed["id"].as_str().unwrap();
    api.wait_terminal(failed_id, T).await;
    let r = api.post(&format!("/api/v1/runs/{failed_id}/retry"), json!({})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!((r.body["trigger"].as_str(), r.body["retry_of"].as_str()), (Some("retry"), Some(failed_id)));
    assert_eq!(r.body["definition"], failed["definition"]);

    let c = campaign(
        &api,
        json!({"name": "mixed", "max_parallel": 2, "items": [
            {"module": "sleep", "params": {"ms": 5}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 5, "outcome": "failed"}, "device": {"pool": "farm"}},
            {"module": "sleep", "params": {"ms": 5}, "device": {"pool": "farm"}},
        ]}),
    )
    .await;
    let run = start_campaign(&api, &c).await;
    let parent = api.wait_terminal(&run, T).await;
    assert_eq!(parent["status"], "failed");
    let r = api.post(&format!("/api/v1/runs/{run}/retry"), json!({"failed_only": true})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let again = r.body["id"].as_str().unwrap().to_string();
    let again_run = api.wait_terminal(&again, T).await;
    assert_eq!(again_run["retry_of"], run.as_str());
    assert_eq!(again_run["children"]["total"], 1, "only the failed child is retried");
    assert_eq!(api.post(&format!("/api/v1/runs/{failed_id}/retry"), json!({"failed_only": true})).await.status, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_interrupts_the_current_step_and_step_timeouts_end_the_run() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    let device = api.device("orc-wfc-1", "lab", json!({})).await;
    let wf = workflow(
        &api,
        "long-middle",
        json!([
            {"module": "sleep", "params": {"ms": 10}},
            {"module": "sleep", "params": {"ms": 30000}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}})).await;
    eventually(T, "step 1 running", || async { (api.run(&id).await["steps"][1]["status"] == "running").then_some(()) })
        .await;
    let r = api.post(&format!("/api/v1/runs/{id}/cancel"), json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("cancelled")), "{}", r.body);
    let steps = r.body["steps"].as_array().unwrap();
    let statuses: Vec<&str> = steps.iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["passed", "cancelled", "skipped"]);
    let d = api.get(&format!("/api/v1/devices/{}", device["id"].as_str().unwrap())).await.body;
    assert_eq!(d["lease"], Value::Null);

    let slow = workflow(
        &api,
        "slow-step",
        json!([
            {"module": "sleep", "params": {"ms": 10}},
            {"module": "sleep", "params": {"ms": 5000}, "timeout_s": 1},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &slow, json!({"device": {"pool": "lab"}})).await;
    let run = api.wait_terminal(&id, T).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(run["steps"][1]["status"], "timed_out");
    assert!(run["error"]["message"].as_str().unwrap().contains("step 1"));
    assert_eq!(run["steps"][2]["status"], "skipped");
}

/// A paused workflow whose worker stops is handed back still paused; the next worker
/// waits for the resume before the next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_workflow_stays_paused_across_a_worker_restart() {
    let env = Env::new();
    let api = env.api(&[]);
    let mut w = env.worker(&[("SWITCHBOARD_SHUTDOWN_GRACE_S", "1")]);
    api.device("orc-pstop-1", "lab", json!({})).await;
    let wf = workflow(
        &api,
        "pause-restart",
        json!([
            {"module": "sleep", "params": {"ms": 300}},
            {"module": "sleep", "params": {"ms": 10}},
        ]),
    )
    .await;
    let id = start_workflow(&api, &wf, json!({"device": {"pool": "lab"}})).await;
    eventually(T, "step 0 running", || async { (api.run(&id).await["steps"][0]["status"] == "running").then_some(()) })
        .await;
    assert_eq!(api.post(&format!("/api/v1/runs/{id}/pause"), json!({})).await.status, 200);
    eventually(T, "step 0 done", || async { (api.run(&id).await["steps"][0]["status"] == "passed").then_some(()) })
        .await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(10)).expect("exit"), Some(0));
    let r = api.run(&id).await;
    assert_eq!((r["status"].as_str(), r["paused"].as_bool()), (Some("queued"), Some(true)), "{r}");
    let _w2 = env.worker(&[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = api.run(&id).await;
    assert_eq!(r["paused"], true);
    assert_eq!(r["steps"].as_array().unwrap().len(), 1, "step 1 must wait for the resume: {r}");
    assert_eq!(api.post(&format!("/api/v1/runs/{id}/resume"), json!({})).await.status, 200);
    let r = api.wait_terminal(&id, T).await;
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["paused"], false);
}
