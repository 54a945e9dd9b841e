//! Reports for CI (issue 12): `GET /runs/{id}/junit.xml` and `switchboard run --wait`
//! with its exit codes, on scripted sleep outcomes.

use std::{process::Command, time::Duration};

use serde_json::json;

use crate::harness::*;

/// Checks a JUnit document against the rules of the Surefire/Jenkins JUnit schema
/// that CI servers rely on (docs/reports.md): the element tree, the required
/// attributes and their types, one outcome per case, and the suite's counts.
fn validate(xml: &str) -> Result<(), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "testsuites" {
        return Err(format!("the root is <{}>, not <testsuites>", root.tag_name().name()));
    }
    let number = |n: roxmltree::Node, a: &str| -> Result<f64, String> {
        n.attribute(a)
            .ok_or(format!("<{}> lacks {a}", n.tag_name().name()))?
            .parse::<f64>()
            .map_err(|e| format!("{a}: {e}"))
    };
    for suite in root.children().filter(|n| n.is_element()) {
        if suite.tag_name().name() != "testsuite" {
            return Err(format!("<{}> inside <testsuites>", suite.tag_name().name()));
        }
        for a in ["name", "tests", "failures", "errors", "skipped", "time", "timestamp"] {
            suite.attribute(a).ok_or(format!("<testsuite> lacks {a}"))?;
        }
        chrono::NaiveDateTime::parse_from_str(suite.attribute("timestamp").unwrap(), "%Y-%m-%dT%H:%M:%S")
            .map_err(|e| format!("timestamp: {e}"))?;
        let (mut tests, mut failures, mut errors, mut skipped) = (0.0, 0.0, 0.0, 0.0);
        for child in suite.children().filter(|n| n.is_element()) {
            match child.tag_name().name() {
                "properties" => {
                    for p in child.children().filter(|n| n.is_element()) {
                        if p.tag_name().name() != "property"
                            || p.attribute("name").is_none()
                            || p.attribute("value").is_none()
                        {
                            return Err("a <properties> child is not <property name value>".into());
                        }
                    }
                }
                "system-out" | "system-err" => {}
                "testcase" => {
                    tests += 1.0;
                    for a in ["name", "classname"] {
                        child.attribute(a).ok_or(format!("<testcase> lacks {a}"))?;
                    }
                    number(child, "time")?;
                    let mut outcomes = 0;
                    for c in child.children().filter(|n| n.is_element()) {
                        match c.tag_name().name() {
                            "failure" => (outcomes, failures) = (outcomes + 1, failures + 1.0),
                            "error" => (outcomes, errors) = (outcomes + 1, errors + 1.0),
                            "skipped" => (outcomes, skipped) = (outcomes + 1, skipped + 1.0),
                            "flakyFailure" | "flakyError" | "rerunFailure" | "rerunError" => {
                                c.attribute("type").ok_or("a flaky or rerun element lacks type")?;
                                for s in c.children().filter(|n| n.is_element()) {
                                    if !["stackTrace", "system-out", "system-err"].contains(&s.tag_name().name()) {
                                        return Err(format!(
                                            "<{}> inside <{}>",
                                            s.tag_name().name(),
                                            c.tag_name().name()
                                        ));
                                    }
                                }
                            }
                            "system-out" | "system-err" => {}
                            other => return Err(format!("<{other}> inside <testcase>")),
                        }
                        if matches!(c.tag_name().name(), "failure" | "error") {
                            c.attribute("type").ok_or("failure/error lacks type")?;
                        }
                    }
                    if outcomes > 1 {
                        return Err("a testcase with more than one outcome".into());
                    }
                }
                other => return Err(format!("<{other}> inside <testsuite>")),
            }
        }
        for (a, counted) in [("tests", tests), ("failures", failures), ("errors", errors), ("skipped", skipped)] {
            if number(suite, a)? != counted {
                return Err(format!("{a}={} but {counted} counted", suite.attribute(a).unwrap()));
            }
        }
    }
    Ok(())
}

async fn junit(api: &Api, run: &str) -> String {
    let r = api
        .client
        .get(format!("{}/api/v1/runs/{run}/junit.xml", api.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/xml"));
    let xml = r.text().await.unwrap();
    validate(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    xml
}

/// The cases of a report: (name, outcome element or "passed", flaky children).
fn cases(xml: &str) -> Vec<(String, String, usize)> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .map(|c| {
            let outcome = c
                .children()
                .find(|n| ["failure", "error", "skipped"].contains(&n.tag_name().name()))
                .map_or("passed".to_string(), |n| n.tag_name().name().to_string());
            let flaky = c.children().filter(|n| n.has_tag_name("flakyError")).count();
            (c.attribute("name").unwrap().to_string(), outcome, flaky)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junit_reports_show_failures_errors_skips_and_flaky_passes() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[("SWITCHBOARD_RETRY_BASE_MS", "1500")]);
    api.device("rep-1", "rep", json!({})).await;
    let flaky = api.device("rep-flaky", "rep-flaky", json!({"error_rate": 1.0})).await;

    // A workflow: a pass, a scripted failure, and a step that never ran.
    let wf = api
        .post(
            "/api/v1/workflows",
            json!({"name": "rep-wf", "steps": [
            {"module": "sleep", "params": {"ms": 1}},
            {"module": "sleep", "params": {"ms": 1, "outcome": "failed"}},
            {"module": "ping"}]}),
        )
        .await;
    assert_eq!(wf.status, 201, "{:?}", wf.body);
    let r = api
        .post(
            &format!("/api/v1/workflows/{}/runs", wf.body["id"].as_str().unwrap()),
            json!({"device": {"serial": "rep-1"}}),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&id, Duration::from_secs(20)).await["status"], "failed");
    let xml = junit(&api, &id).await;
    assert_eq!(
        cases(&xml),
        vec![
            ("sleep[0]".into(), "passed".into(), 0),
            ("sleep[1]".into(), "failure".into(), 0),
            ("ping[2]".into(), "skipped".into(), 0)
        ],
        "{xml}"
    );
    assert!(xml.contains(r#"classname="rep-1.rep-wf""#), "{xml}");
    assert!(xml.contains(r#"<property name="device_model" value="Pixel 8"/>"#), "{xml}");
    assert!(xml.contains(&format!("/api/v1/runs/{id}\"")), "the run URL: {xml}");

    // An infrastructure error that exhausts its attempts: <error>.
    let run = api
        .start(
            "sleep",
            json!({"params": {"ms": 1, "outcome": "error"}, "device": {"serial": "rep-1"}, "max_attempts": 1}),
        )
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&id, Duration::from_secs(20)).await["status"], "errored");
    let xml = junit(&api, &id).await;
    assert_eq!(cases(&xml), vec![("sleep[0]".into(), "error".into(), 0)], "{xml}");

    // A pass after an errored attempt: the attempt is a flakyError of the passing case.
    let run = api.start("ping", json!({"device": {"serial": "rep-flaky"}})).await;
    let id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(15), "the first attempt errored", || async {
        types(&api.events(&id).await).contains(&"run.requeued".to_string()).then_some(())
    })
    .await;
    let fixed = api
        .patch(&format!("/api/v1/devices/{}", flaky["id"].as_str().unwrap()), json!({"metadata": {"sim": {}}}))
        .await;
    assert_eq!(fixed.status, 200, "{:?}", fixed.body);
    assert_eq!(api.wait_terminal(&id, Duration::from_secs(20)).await["status"], "succeeded");
    let xml = junit(&api, &id).await;
    assert_eq!(cases(&xml), vec![("ping[0]".into(), "passed".into(), 1)], "{xml}");

    // A campaign that stops on its first failure: the items it never ran are skipped.
    let c = api
        .post(
            "/api/v1/campaigns",
            json!({"name": "rep-camp", "stop_on_failure": true, "max_parallel": 1, "items": [
            {"module": "sleep", "params": {"ms": 1, "outcome": "failed"}, "device": {"pool": "rep"}},
            {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "rep"}}]}),
        )
        .await;
    assert_eq!(c.status, 201, "{:?}", c.body);
    let r = api.post(&format!("/api/v1/campaigns/{}/runs", c.body["id"].as_str().unwrap()), json!({})).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&id, Duration::from_secs(20)).await["status"], "failed");
    let xml = junit(&api, &id).await;
    assert_eq!(
        cases(&xml),
        vec![("sleep[0]".into(), "failure".into(), 0), ("sleep[1]".into(), "skipped".into(), 0)],
        "{xml}"
    );
    assert!(xml.contains(r#"<testsuite name="rep-camp""#), "{xml}");

    let missing = api.get(&format!("/api/v1/runs/{}/junit.xml", uuid::Uuid::new_v4())).await;
    assert_eq!(missing.status, 404);
}

/// Runs `switchboard run ARGS` against the api; its exit code, stdout and stderr.
fn cli(api: &Api, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("run")
        .args(args)
        .env("SWITCHBOARD_URL", &api.base)
        .env("SWITCHBOARD_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run the cli");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_run_waits_and_exits_with_the_outcomes_code() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(FAST);
    api.device("cli-1", "cli", json!({})).await;
    let dir = env.log_dir.join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name).to_string_lossy().to_string();

    let api2 = &api;
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| cli(api2, &args))
    };
    let sleep = |outcome: &str, report: &str| {
        let params = json!({"ms": 1, "outcome": outcome}).to_string();
        vec![
            "module".into(),
            "sleep".into(),
            "--device".into(),
            "cli-1".into(),
            "--params".into(),
            params,
            "--wait".into(),
            "--junit".into(),
            file(report),
        ]
    };
    for (outcome, code) in [("passed", 0), ("failed", 10), ("error", 20)] {
        let (got, _, err) = run(sleep(outcome, &format!("{outcome}.xml"))).await;
        assert_eq!(got, code, "{outcome}: {err}");
        let xml = std::fs::read_to_string(file(&format!("{outcome}.xml"))).unwrap();
        validate(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    }
    // A workflow by name, and a selector as JSON.
    let wf = api
        .post(
            "/api/v1/workflows",
            json!({"name": "cli-wf", "steps": [{"module": "sleep", "params": {"ms": 1, "outcome": "failed"}}]}),
        )
        .await;
    assert_eq!(wf.status, 201);
    let (got, _, err) =
        run(vec!["workflow".into(), "cli-wf".into(), "--device".into(), r#"{"pool": "cli"}"#.into()]).await;
    assert_eq!(got, 10, "{err}");
    // --timeout: 15, the run goes on, and the report is still written.
    let params = json!({"ms": 20000}).to_string();
    let (got, _, err) = run(vec![
        "module".into(),
        "sleep".into(),
        "--device".into(),
        "cli-1".into(),
        "--params".into(),
        params,
        "--timeout".into(),
        "1s".into(),
        "--junit".into(),
        file("timeout.xml"),
    ])
    .await;
    assert_eq!(got, 15, "{err}");
    assert!(err.contains("the run goes on"), "{err}");
    let xml = std::fs::read_to_string(file("timeout.xml")).unwrap();
    validate(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    // --async: the id, at once.
    let one_ms = json!({"ms": 1}).to_string();
    let (got, out, err) = run(vec![
        "module".into(),
        "sleep".into(),
        "--device".into(),
        "cli-1".into(),
        "--params".into(),
        one_ms,
        "--async".into(),
    ])
    .await;
    assert_eq!(got, 0, "{err}");
    let id = out.trim();
    assert!(id.parse::<uuid::Uuid>().is_ok(), "{out}");
    assert_eq!(api.run(id).await["target"], "sleep");
    // Usage and API errors: 1-9.
    let (got, _, err) = run(vec!["module".into(), "sleep".into()]).await;
    assert_eq!(got, 2, "no device: {err}");
    let (got, _, err) =
        run(vec!["workflow".into(), "no-such-workflow".into(), "--device".into(), "cli-1".into()]).await;
    assert_eq!(got, 3, "{err}");
    let (got, _, err) = run(vec![
        "module".into(),
        "sleep".into(),
        "--device".into(),
        "cli-1".into(),
        "--params".into(),
        r#"{"ms": "soon"}"#.into(),
    ])
    .await;
    assert_eq!(got, 3, "refused params: {err}");
    assert!(err.contains("422"), "{err}");
}
