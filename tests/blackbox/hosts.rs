//! Remote host agents (issue 9): a real `switchboard host-agent` on loopback, with the
//! fake adb behind it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const HOST_TIMEOUT: &[(&str, &str)] = &[("SWITCHBOARD_HOST_TIMEOUT_S", "3")];

/// The host as `GET /hosts/{id}` shows it.
async fn host(api: &Api, id: &str) -> Value {
    let r = api.get(&format!("/api/v1/hosts/{id}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

async fn only_host(api: &Api) -> Value {
    eventually(Duration::from_secs(15), "the agent to register", || async {
        api.get("/api/v1/hosts").await.body["items"].as_array().and_then(|a| a.first().cloned())
    })
    .await
}

async fn phone_status(api: &Api, host_id: &str, serial: &str) -> Option<(String, Option<String>)> {
    let h = host(api, host_id).await;
    let d = h["devices"].as_array()?.iter().find(|d| d["serial"] == serial)?.clone();
    Some((d["status"].as_str()?.to_string(), d["status_reason"].as_str().map(str::to_string)))
}

fn agent_env<'a>(adb: &'a [(String, String)], state_file: &'a str) -> Vec<(&'a str, &'a str)> {
    pairs(
        adb,
        &[
            ("SWITCHBOARD_HEARTBEAT_S", "1"),
            ("SWITCHBOARD_HOST_NAME", "bench-3"),
            ("SWITCHBOARD_AGENT_STATE", state_file),
        ],
    )
}

#[tokio::test]
async fn a_run_goes_through_a_host_agent_and_every_call_is_authenticated() {
    let env = Env::new();
    let adb = FakeAdb::new(&env, json!({"HOST1": {}}));
    let api = env.api(HOST_TIMEOUT);
    let _worker = env.worker(FAST);
    let _scheduler = env.scheduler(FAST);
    let state = env.log_dir.join("agent.json").display().to_string();
    let fake = adb.env();
    let agent = env.agent(&api, &agent_env(&fake, &state));

    let h = only_host(&api).await;
    let id = h["id"].as_str().unwrap().to_string();
    assert_eq!((h["name"].as_str(), h["status"].as_str()), (Some("bench-3"), Some("online")));
    assert_eq!(h["url"], agent.base);
    assert!(h.get("secret").is_none(), "the secret is shown once, at registration");
    let (status, _) = eventually(Duration::from_secs(20), "HOST1 reported", || phone_status(&api, &id, "HOST1")).await;
    assert_eq!(status, "online");
    let phone = host(&api, &id).await["devices"][0].clone();
    assert_eq!((phone["driver"].as_str(), phone["host_id"].as_str()), (Some("host"), Some(id.as_str())));

    let run =
        api.start("ping", json!({"device": {"serial": "HOST1"}, "params": {"host": "example.com", "count": 2}})).await;
    let run = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = &run["steps"][0]["result"];
    assert_eq!((r["sent"].as_u64(), r["received"].as_u64(), r["loss_pct"].as_f64()), (Some(2), Some(2), Some(0.0)));
    // Captures made on the agent come back with the run.
    let run = api.start("capture_logs", json!({"device": {"serial": "HOST1"}})).await;
    let run = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let caps = api.get(&format!("/api/v1/runs/{}/captures", run["id"].as_str().unwrap())).await;
    assert_eq!(caps.body["items"][0]["name"], "logcat-main.txt");

    // Both directions need the host secret.
    let client = reqwest::Client::new();
    let body = json!({"run_id": uuid::Uuid::new_v4(), "attempt": 1, "serial": "HOST1", "module": "reboot",
                      "params": {}, "timeout_ms": 1000});
    let direct = client.post(format!("{}/v1/execute", agent.base)).json(&body).send().await.unwrap();
    assert_eq!(direct.status(), 401);
    let wrong =
        client.post(format!("{}/v1/execute", agent.base)).bearer_auth("sbh_wrong").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(adb.log().iter().all(|e| e["adb"] != "reboot"), "nothing reached the phone");
    let beat = api.request("POST", &format!("/api/v1/hosts/{id}/heartbeat"), Some(json!({})), Some("sbh_wrong")).await;
    assert_eq!(beat.status, 401, "{:?}", beat.body);
    let beat = api.request("POST", &format!("/api/v1/hosts/{id}/heartbeat"), Some(json!({})), Some(ADMIN_TOKEN)).await;
    assert_eq!(beat.status, 401, "an API token is not the host's secret");
    // Registering the same name without its secret is refused.
    let r = api.post("/api/v1/hosts/register", json!({"name": "bench-3", "url": "http://127.0.0.1:1"})).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    let r = api.post("/api/v1/hosts/register", json!({"name": "x", "url": "ftp://nope"})).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body["error"]["details"]["fields"]["url"].is_string());

    // The run shows the host it went through.
    assert_eq!(run["host_id"], id.as_str(), "{run}");

    // SIGTERM mid-call: the agent stops the call at once and exits 0.
    let run = api
        .start(
            "voice_call",
            json!({"device": {"serial": "HOST1"}, "params": {"to": "112", "duration_s": 30}, "max_attempts": 1}),
        )
        .await;
    eventually(Duration::from_secs(10), "the call to be up", || async {
        adb.commands("HOST1").iter().any(|c| c[0] == "am").then_some(())
    })
    .await;
    let mut agent = agent;
    agent.proc.sigterm();
    assert_eq!(
        agent.proc.wait_exit(Duration::from_secs(5)),
        Some(Some(0)),
        "a clean stop, without waiting for the call"
    );
    let run = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "errored", "{run}");
    eventually(Duration::from_secs(5), "the call hung up", || async {
        adb.commands("HOST1").iter().any(|c| c.join(" ") == "input keyevent KEYCODE_ENDCALL").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_killed_agent_takes_its_host_offline_and_comes_back_when_restarted() {
    let env = Env::new();
    let adb = FakeAdb::new(&env, json!({"HOST2": {"call": {"offhook_after_s": 0.1}}}));
    let api = env.api(HOST_TIMEOUT);
    let _worker = env.worker(FAST);
    let _scheduler = env.scheduler(FAST);
    let state = env.log_dir.join("agent.json").display().to_string();
    let fake = adb.env();
    let mut agent = env.agent(&api, &agent_env(&fake, &state));
    let id = only_host(&api).await["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "HOST2 online", || async {
        phone_status(&api, &id, "HOST2").await.filter(|(s, _)| s == "online")
    })
    .await;

    // A long call, and the agent killed in the middle of it.
    let run = api
        .start(
            "voice_call",
            json!({"device": {"serial": "HOST2"}, "params": {"to": "112", "duration_s": 20}, "max_attempts": 1}),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "the call to be up", || async {
        adb.commands("HOST2").iter().any(|c| c[0] == "am").then_some(())
    })
    .await;
    agent.proc.sigkill();
    let killed_at = std::time::Instant::now();
    let run = api.wait_terminal(&run_id, Duration::from_secs(20)).await;
    assert_eq!(
        (run["status"].as_str(), run["error"]["kind"].as_str()),
        (Some("errored"), Some("device_unreachable")),
        "{run}"
    );
    assert!(run["error"]["message"].as_str().unwrap().contains("host bench-3"), "{run}");

    // Silent past its 3 s timeout (the scheduler looks every second): offline, with its phone.
    let h = eventually(Duration::from_secs(10), "the host offline", || async {
        Some(host(&api, &id).await).filter(|h| h["status"] == "offline")
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(9), "offline {:?} after the kill", killed_at.elapsed());
    assert!(h["status_reason"].as_str().unwrap().starts_with("no heartbeat for"), "{h}");
    let (status, reason) = phone_status(&api, &id, "HOST2").await.unwrap();
    assert_eq!(status, "offline");
    assert!(reason.unwrap().starts_with("host bench-3 is offline"));
    let pg = env.pg().await;
    let kinds: Vec<String> = sqlx::query_scalar("SELECT type FROM events WHERE host_id = $1::uuid ORDER BY id")
        .bind(&id)
        .fetch_all(&pg)
        .await
        .unwrap();
    assert!(kinds.contains(&"host.registered".to_string()) && kinds.contains(&"host.offline".to_string()), "{kinds:?}");

    // A run for it waits while it is away.
    let waiting = api.start("device_info", json!({"device": {"serial": "HOST2"}})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.run(waiting["id"].as_str().unwrap()).await["status"], "queued");

    // Restarted (same state file, a new port): the host and its phone come back and
    // take the waiting run.
    let agent = env.agent(&api, &agent_env(&fake, &state));
    let h = eventually(Duration::from_secs(10), "the host online", || async {
        Some(host(&api, &id).await).filter(|h| h["status"] == "online")
    })
    .await;
    assert_eq!(h["url"], agent.base, "registered again with its new address");
    let run = api.wait_terminal(waiting["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["result"]["model"], "Pixel 6a");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT type FROM events WHERE host_id = $1::uuid ORDER BY id")
        .bind(&id)
        .fetch_all(&pg)
        .await
        .unwrap();
    assert!(kinds.contains(&"device.status_changed".to_string()), "{kinds:?}");
}
