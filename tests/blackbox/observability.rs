//! Traces and metrics (issue 11): one trace from the API request to the worker's
//! driver call, exported over OTLP to a receiver the test owns; every role's
//! `/metrics` with the names and labels the docs promise.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{harness::*, otlp};

/// The span names of one trace, by service.
fn names(spans: &[otlp::Span], service: &str) -> Vec<String> {
    spans.iter().filter(|s| s.service == service).map(|s| s.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_request_through_the_claim_and_steps_to_the_driver() {
    let receiver = otlp::Receiver::start().await;
    let env = Env::new();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("SWITCHBOARD_LOG_FORMAT", "json"),
    ];
    let api = env.api(&otel);
    let _worker = env.worker(&otel);
    api.device("trace-1", "lab", json!({})).await;

    // The client is traced too: its `traceparent` makes the run part of its trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = api
        .client
        .post(format!("{}/api/v1/workflows", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "traced", "steps": [{"module": "ping", "params": {"count": 1}}, {"module": "sleep", "params": {"ms": 1}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let workflow: Value = resp.json().await.unwrap();
    let resp = api
        .client
        .post(format!("{}/api/v1/workflows/{}/runs", api.base, workflow["id"].as_str().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{client_trace}-00f067aa0ba902b7-01"))
        .json(&json!({"device": {"pool": "lab"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let run: Value = resp.json().await.unwrap();
    let id = run["id"].as_str().unwrap().to_string();
    assert_eq!(run["trace_id"], client_trace, "the run keeps the request's trace: {run}");
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let spans = eventually(Duration::from_secs(20), "the worker's spans exported", || async {
        let spans: Vec<otlp::Span> = receiver.spans().into_iter().filter(|s| s.trace_id == client_trace).collect();
        let worker = names(&spans, "switchboard-worker");
        let want = ["claim", "run workflow", "step 0 ping", "sim ping", "step 1 sleep"];
        want.iter().all(|w| worker.iter().any(|n| n == w)).then_some(spans)
    })
    .await;
    let api_spans = names(&spans, "switchboard-api");
    assert!(api_spans.iter().any(|n| n == "POST /api/v1/workflows/{id}/runs"), "{api_spans:?}");
    let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no span {n}"));
    let request = by_name("POST /api/v1/workflows/{id}/runs");
    assert_eq!(request.parent_span_id, "00f067aa0ba902b7", "the request span is the client's child");
    let (claim, run_span) = (by_name("claim"), by_name("run workflow"));
    assert_eq!(claim.parent_span_id, request.span_id, "the claim joins the request's trace");
    assert_eq!(run_span.parent_span_id, request.span_id);
    let step = by_name("step 0 ping");
    assert_eq!(step.parent_span_id, run_span.span_id);
    assert_eq!(by_name("sim ping").parent_span_id, step.span_id, "the driver call is the step's child");
    assert_eq!(run_span.attr("run_id"), Some(id.as_str()));
    assert!(run_span.attr("device_id").is_some_and(|d| !d.is_empty()), "{run_span:?}");

    // Every JSON log line written inside the run carries its run, device and trace ids.
    let lines: Vec<Value> = json_logs(&env, "worker")
        .into_iter()
        .filter(|l| l["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["run_id"] == id.as_str())))
        .collect();
    assert!(!lines.is_empty(), "no worker log lines inside the run");
    for line in &lines {
        let run_span = line["spans"].as_array().unwrap().iter().find(|s| s["name"] == "run");
        let run_span = run_span.unwrap_or_else(|| panic!("a line outside the run span: {line}"));
        assert_eq!(run_span["trace_id"], client_trace, "{line}");
        assert!(run_span["device_id"].is_string(), "{line}");
    }
    let request_lines: Vec<Value> = json_logs(&env, "api")
        .into_iter()
        .filter(|l| l["span"]["name"] == "request" && l["span"]["trace_id"] == client_trace)
        .collect();
    assert!(request_lines.iter().all(|l| l["span"]["request_id"].is_string()));
}

/// One scrape of a metrics endpoint.
async fn scrape(api: &Api, url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = api.client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of the sample `name{labels}` (labels in the exporter's order), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_its_own_metrics_with_the_documented_names_and_labels() {
    let env = Env::new();
    let token = [("SWITCHBOARD_METRICS_TOKEN", "scrape-secret"), ("SWITCHBOARD_METRICS_REFRESH_S", "1")];
    let api = env.api(&token);
    let (_worker, worker_url) = env.metered("worker", &with(&token, &[("SWITCHBOARD_RETRY_BASE_MS", "100")]));
    let (_scheduler, scheduler_url) = env.metered("scheduler", &token);
    let api_url = format!("{}/metrics", api.base);
    for url in [&api_url, &worker_url, &scheduler_url] {
        let (status, body) = scrape(&api, url, None).await;
        assert_eq!(status, 401, "{url}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(scrape(&api, url, Some(ADMIN_TOKEN)).await.0, 401, "only the metrics token opens {url}");
    }

    api.device("met-ok", "lab", json!({})).await;
    api.device("met-bad", "flaky", json!({"error_rate": 1.0})).await;
    let ok = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "lab"}})).await;
    let ok = api.wait_terminal(ok["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(ok["status"], "succeeded");
    let bad = api.start("ping", json!({"device": {"pool": "flaky"}, "max_attempts": 2})).await;
    let bad = api.wait_terminal(bad["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    // A run whose only device is in maintenance stays queued: the queue-depth gauge
    // has something to show.
    let parked = api.device("met-parked", "nowhere", json!({})).await;
    let r = api
        .patch(&format!("/api/v1/devices/{}", parked["id"].as_str().unwrap()), json!({"status": "maintenance"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let waiting = api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "nowhere"}})).await;
    assert_eq!(waiting["status"], "queued");
    let sched = api
        .post(
            "/api/v1/schedules",
            json!({"name": "each-second", "cron": "* * * * * *",
                   "target": {"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(sched.status, 201, "{:?}", sched.body);
    let sched_id = sched.body["id"].as_str().unwrap().to_string();

    let worker = eventually(Duration::from_secs(20), "the worker's run counters", || async {
        let (_, text) = scrape(&api, &worker_url, Some("scrape-secret")).await;
        let finished = sample(&text, r#"switchboard_runs_finished_total{kind="module",status="succeeded"}"#)?;
        (finished >= 1.0).then_some(text)
    })
    .await;
    for series in [
        r#"switchboard_runs_started_total{kind="module"}"#,
        r#"switchboard_run_duration_seconds_count{kind="module",status="succeeded"}"#,
        r#"switchboard_run_start_latency_seconds_count{kind="module"}"#,
        r#"switchboard_run_duration_seconds_bucket{kind="module",status="succeeded",le="0.01"}"#,
    ] {
        assert!(sample(&worker, series).is_some(), "{series} missing from the worker's:\n{worker}");
    }
    // The errored run: one retry, then its end.
    assert_eq!(bad["status"], "errored", "{bad}");
    assert_eq!(
        sample(&worker, r#"switchboard_runs_finished_total{kind="module",status="errored"}"#),
        Some(1.0),
        "{worker}"
    );
    assert_eq!(sample(&worker, "switchboard_run_retries_total"), Some(1.0), "{worker}");
    assert_eq!(sample(&worker, r#"switchboard_runs_requeued_total{reason="retry"}"#), Some(1.0), "{worker}");

    let scheduler = eventually(Duration::from_secs(20), "the scheduler's tick counters", || async {
        let (_, text) = scrape(&api, &scheduler_url, Some("scrape-secret")).await;
        let series = format!(
            r#"switchboard_schedule_ticks_total{{schedule_id="{sched_id}",schedule="each-second",decision="fired"}}"#
        );
        (sample(&text, &series)? >= 1.0).then_some(text)
    })
    .await;
    assert!(sample(&scheduler, "switchboard_schedule_fire_lag_seconds_count").is_some_and(|n| n >= 1.0), "{scheduler}");

    let api_text = eventually(Duration::from_secs(15), "the api's gauges", || async {
        let (_, text) = scrape(&api, &api_url, Some("scrape-secret")).await;
        (sample(&text, r#"switchboard_queue_depth{pool="nowhere"}"#)? == 1.0).then_some(text)
    })
    .await;
    assert!(sample(&api_text, r#"switchboard_queue_oldest_age_seconds{pool="nowhere"}"#).is_some(), "{api_text}");
    assert_eq!(sample(&api_text, r#"switchboard_runs_open{kind="module",status="queued"}"#), Some(1.0), "{api_text}");
    assert!(sample(&api_text, r#"switchboard_devices{status="online"}"#).is_some(), "{api_text}");
    assert!(api_text.contains("switchboard_device_breaker_state{device_id="), "{api_text}");
    assert_eq!(sample(&api_text, "switchboard_ws_clients"), Some(0.0), "{api_text}");
    // Route templates, never raw paths: the run ids do not become labels.
    assert!(
        api_text.contains(r#"switchboard_http_requests_total{method="GET",route="/api/v1/runs/{id}",status="200"}"#),
        "{api_text}"
    );
    assert!(!api_text.contains(ok["id"].as_str().unwrap()), "a run id leaked into a label");
    assert!(api_text.contains("switchboard_http_request_duration_seconds_bucket"), "{api_text}");
}
