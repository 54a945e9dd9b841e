//! Real phones (issue 9), through the fake adb: every module's parsed result, adb's
//! infrastructure errors and the breaker, a hung call, shell injection, discovery.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// A lab: its own database, the fake adb with `phones`, an API and a worker using it.
struct Lab {
    env: Env,
    adb: FakeAdb,
    api: Api,
    _worker: Proc,
}

async fn lab(phones: Value, worker_env: &[(&str, &str)]) -> Lab {
    let env = Env::new();
    let adb = FakeAdb::new(&env, phones);
    let api = env.api(&[]);
    let fake = adb.env();
    let worker = env.worker(&pairs(&fake, &with(FAST, worker_env)));
    Lab { env, adb, api, _worker: worker }
}

impl Lab {
    async fn phone(&self, serial: &str) -> Value {
        let r = self.api.post("/api/v1/devices", json!({"serial": serial, "driver": "adb", "pool": "lab"})).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body
    }

    /// Runs a module on `serial` to its end.
    async fn run(&self, module: &str, serial: &str, params: Value) -> Value {
        let run =
            self.api.start(module, json!({"device": {"serial": serial}, "params": params, "max_attempts": 1})).await;
        self.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(30)).await
    }
}

fn result(run: &Value) -> &Value {
    &run["steps"][0]["result"]
}

#[tokio::test]
async fn network_modules_parse_ping_and_follow_the_radios() {
    let lab = lab(json!({"NET1": {}}), &[]).await;
    lab.phone("NET1").await;

    let run = lab.run("ping", "NET1", json!({"host": "example.com", "count": 3, "interval_ms": 200})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!(
        (r["host"].as_str(), r["sent"].as_u64(), r["received"].as_u64()),
        (Some("example.com"), Some(3), Some(3))
    );
    assert_eq!(
        (r["loss_pct"].as_f64(), r["time_ms"].as_u64(), r["exit_status"].as_i64()),
        (Some(0.0), Some(403), Some(0))
    );
    assert_eq!(r["rtt_ms"], json!({"min": 10.0, "avg": 11.25, "max": 12.5, "mdev": 1.021}));
    // The command as the phone ran it, each argument its own word.
    let ran: Vec<String> = lab.adb.commands("NET1").iter().map(|c| c.join(" ")).collect();
    assert!(ran.contains(&"ping -c 3 -i 0.2 example.com".to_string()), "{ran:?}");

    lab.adb.set("NET1", json!({"net": {"loss_pct": 100}}));
    let run = lab.run("ping", "NET1", json!({"host": "8.8.8.8", "count": 2})).await;
    assert_eq!(run["status"], "failed", "100% loss is a verdict: {run}");
    assert_eq!((result(&run)["received"].as_u64(), result(&run)["loss_pct"].as_f64()), (Some(0), Some(100.0)));
    assert_eq!(result(&run)["exit_status"], 1);
    let run = lab.run("ping", "NET1", json!({"host": "nowhere.invalid", "count": 1})).await;
    assert_eq!(run["status"], "failed", "unknown host is a verdict: {run}");
    assert!(result(&run)["reason"].as_str().unwrap().starts_with("unknown host"));
    lab.adb.set("NET1", json!({"net": {"loss_pct": 0}}));

    let run = lab.run("airplane_mode", "NET1", json!({"enabled": true})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!(
        (r["airplane_mode"].as_bool(), r["changed"].as_bool(), r["verified"].as_bool()),
        (Some(true), Some(true), Some(true))
    );
    assert_eq!((r["method"].as_str(), r["api_level"].as_u64()), (Some("cmd connectivity airplane-mode"), Some(34)));
    let run = lab.run("ping", "NET1", json!({"host": "8.8.8.8", "count": 1})).await;
    assert_eq!(run["status"], "failed", "no network in airplane mode is a verdict: {run}");
    assert!(result(&run)["reason"].as_str().unwrap().starts_with("network unreachable"), "{run}");
    assert_eq!(result(&run)["exit_status"], 2);
    let run = lab.run("airplane_mode", "NET1", json!({"enabled": false})).await;
    assert_eq!((run["status"].as_str(), result(&run)["airplane_mode"].as_bool()), (Some("succeeded"), Some(false)));

    let run = lab.run("mobile_data", "NET1", json!({"enabled": false})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!((r["mobile_data"].as_bool(), r["changed"].as_bool()), (Some(false), Some(true)));
    assert_eq!((r["data_state"].as_str(), r["method"].as_str()), (Some("disconnected"), Some("cmd phone data")));
    let run = lab.run("mobile_data", "NET1", json!({"enabled": true})).await;
    assert_eq!(result(&run)["data_state"], "connected");

    let run = lab.run("wifi", "NET1", json!({"enabled": true, "ssid": "lab-5G"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!(
        (r["wifi"].as_bool(), r["ssid"].as_str(), r["rssi_dbm"].as_i64()),
        (Some(true), Some("lab-5G"), Some(-55))
    );
    assert_eq!(r["ssid_checked"], true);
    lab.adb.set("NET1", json!({"wifi_ssid": "guest"}));
    let run = lab
        .api
        .start(
            "wifi",
            json!({"device": {"serial": "NET1"}, "params": {"enabled": true, "ssid": "lab-5G"}, "timeout_s": 4}),
        )
        .await;
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(result(&run)["ssid"], "guest");
}

#[tokio::test]
async fn device_modules_read_the_phone_reboot_it_and_capture_its_log() {
    let lab = lab(
        json!({"DEV1": {}, "OLD9": {"sdk": 28, "release": "9", "signal": "pie", "model": "SM_G960F",
                                      "manufacturer": "samsung"}}),
        &[],
    )
    .await;
    lab.phone("DEV1").await;
    lab.phone("OLD9").await;

    let run = lab.run("device_info", "DEV1", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!((r["model"].as_str(), r["manufacturer"].as_str()), (Some("Pixel 6a"), Some("Google")));
    assert_eq!((r["os_version"].as_str(), r["api_level"].as_u64()), (Some("14"), Some(34)));
    assert_eq!(r["fingerprint"], "google/bluejay/bluejay:14/UQ1A.240205.004/11269751:user/release-keys");
    assert_eq!(
        r["battery"],
        json!({"level_pct": 87, "status": "charging", "health": "good", "temperature_c": 27.4,
                                    "voltage_mv": 4211, "plugged": "usb"})
    );
    assert_eq!(r["battery_pct"], 87);
    assert_eq!(r["signal"], json!({"technology": "lte", "dbm": -94, "level": 3}));
    assert_eq!(r["network_operator"], "Orange F");
    let run = lab.run("device_info", "OLD9", json!({})).await;
    let r = result(&run);
    assert_eq!((r["model"].as_str(), r["api_level"].as_u64()), (Some("SM G960F"), Some(28)));
    assert_eq!(r["signal"], json!({"technology": "lte", "dbm": -101, "level": null}), "Android 9's flat list");

    let run = lab.run("capture_logs", "DEV1", json!({"duration_s": 60, "buffer": "main"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!((r["lines"].as_u64(), r["errors"].as_u64(), r["crashes"].as_u64()), (Some(4), Some(2), Some(1)));
    assert_eq!((r["capture"].as_str(), r["truncated"].as_bool()), (Some("logcat-main.txt"), Some(false)));
    let id = run["id"].as_str().unwrap();
    let list = lab.api.get(&format!("/api/v1/runs/{id}/captures")).await;
    assert_eq!(list.status, 200);
    let item = &list.body["items"][0];
    assert_eq!((item["name"].as_str(), item["step_index"].as_i64()), (Some("logcat-main.txt"), Some(0)));
    let raw = lab
        .api
        .client
        .get(format!("{}/api/v1/runs/{id}/captures/{}", lab.api.base, item["id"].as_str().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["content-type"], "text/plain; charset=utf-8");
    let text = raw.text().await.unwrap();
    assert!(text.starts_with("--------- beginning of main\n"), "{text}");
    assert!(text.lines().any(|l| l.ends_with(" E AndroidRuntime: FATAL EXCEPTION: main")), "threadtime lines: {text}");
    assert_eq!(item["size_bytes"].as_u64(), Some(text.len() as u64));

    // The cap keeps the newest lines and says so.
    lab.adb.set("DEV1", json!({"logcat_spam": 40000}));
    let run = lab.run("capture_logs", "DEV1", json!({"duration_s": 60})).await;
    let r = result(&run);
    assert_eq!(r["truncated"], true, "{run}");
    assert!(r["bytes"].as_u64().unwrap() <= 1_048_576);
    lab.adb.set("DEV1", json!({"logcat_spam": 0}));

    let started = Instant::now();
    let run = lab.run("reboot", "DEV1", json!({"wait_boot": true})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!((r["rebooted"].as_bool(), r["waited"].as_bool()), (Some(true), Some(true)));
    // The fake phone still answers from the old boot for 0.5 s (sys.boot_completed=1),
    // then is gone 0.6 s, offline 0.6 s, booting 1.2 s: a new boot id or nothing.
    assert!(r["boot_ms"].as_u64().unwrap() >= 2900, "{r}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let log = lab.adb.log();
    assert!(log.iter().any(|e| e["serial"] == "DEV1" && e["adb"] == "reboot"), "adb -s DEV1 reboot");
}

#[tokio::test]
async fn telephony_modules_call_and_text_per_android_version() {
    let lab = lab(json!({"NEW1": {}, "OLD8": {"sdk": 27, "release": "8.1.0"}}), &[]).await;
    lab.phone("NEW1").await;
    lab.phone("OLD8").await;

    let run = lab.run("voice_call", "NEW1", json!({"to": "+33612345678", "duration_s": 1})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!(
        (r["connected"].as_bool(), r["dropped"].as_bool(), r["ended"].as_bool()),
        (Some(true), Some(false), Some(true))
    );
    assert_eq!(r["duration_s"], 1);
    assert!(r["setup_ms"].as_u64().unwrap() >= 300, "off-hook after 0.3 s: {r}");
    let cmds = lab.adb.commands("NEW1");
    assert!(cmds.iter().any(|c| c.join(" ") == "am start -a android.intent.action.CALL -d tel:+33612345678"));
    assert!(cmds.iter().any(|c| c.join(" ") == "input keyevent KEYCODE_ENDCALL"));
    lab.adb.set("NEW1", json!({"call": {"drop_after_s": 0.5}}));
    let run = lab.run("voice_call", "NEW1", json!({"to": "112", "duration_s": 3})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(result(&run)["dropped"], true);

    // Android 14: no shell SMS method Switchboard trusts: unsupported, not retried, not
    // counted against the phone.
    let run = lab
        .api
        .start("send_sms", json!({"device": {"serial": "NEW1"}, "params": {"to": "+33612345678", "body": "hello"}}))
        .await;
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(
        (run["status"].as_str(), run["error"]["kind"].as_str()),
        (Some("errored"), Some("unsupported")),
        "{run}"
    );
    assert_eq!(run["attempt"], 1, "unsupported is not retried: {run}");
    let phone = lab.api.get("/api/v1/devices?pool=lab").await.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["serial"] == "NEW1")
        .cloned()
        .unwrap();
    assert_eq!(phone["breaker"]["consecutive_failures"], 0, "{phone}");

    // Android 8.1: `service call isms`, confirmed from the sent box.
    let run = lab.run("send_sms", "OLD8", json!({"to": "+33612345678", "body": "hello, lab"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let r = result(&run);
    assert_eq!(
        (r["sent"].as_bool(), r["message_id"].as_i64(), r["segments"].as_u64()),
        (Some(true), Some(40), Some(1))
    );
    assert_eq!(r["delivered"], Value::Null, "no report was asked for: never claim one");
    assert_eq!(r["delivery_status"], "not_reported");
    lab.adb.set("OLD8", json!({"sms": {"new_status": 0}}));
    let run = lab.run("send_sms", "OLD8", json!({"to": "0612345678", "body": "second"})).await;
    assert_eq!(
        (result(&run)["delivered"].as_bool(), result(&run)["delivery_status"].as_str()),
        (Some(true), Some("delivered"))
    );
    lab.adb.set("OLD8", json!({"sms": {"new_status": 64}}));
    let run = lab.run("send_sms", "OLD8", json!({"to": "0612345678", "body": "third"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(result(&run)["delivered"], false);
    lab.adb.set("OLD8", json!({"sms": {"readable": false, "new_status": 0}}));
    let run = lab.run("send_sms", "OLD8", json!({"to": "0612345678", "body": "fourth"})).await;
    assert_eq!(
        (run["status"].as_str(), result(&run)["delivery_status"].as_str()),
        (Some("succeeded"), Some("unreadable"))
    );
    assert_eq!(result(&run)["delivered"], Value::Null);
    // Airplane mode on Android 8.1 without root: the broadcast is refused there.
    let run = lab.run("airplane_mode", "OLD8", json!({"enabled": true})).await;
    assert_eq!(
        (run["status"].as_str(), run["error"]["kind"].as_str()),
        (Some("errored"), Some("unsupported")),
        "{run}"
    );
}

#[tokio::test]
async fn nothing_reaches_the_phone_shell_but_the_argument_itself() {
    let lab = lab(json!({"INJ1": {"sdk": 26}}), &[]).await;
    lab.phone("INJ1").await;
    let body = "hi; reboot $(id) `id` && echo 'pwned' | sh > /data/x \"q\" \\ $HOME";
    let run = lab.run("send_sms", "INJ1", json!({"to": "+33612345678", "body": body, "expect_delivery": true})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let sent: Vec<Value> = lab.adb.log().into_iter().filter(|e| e["sms"].is_object()).collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["sms"]["body"], body, "the body reached the phone as one argument, unchanged");
    let ran: Vec<String> = lab.adb.commands("INJ1").into_iter().map(|c| c[0].clone()).collect();
    for forbidden in ["reboot", "id", "echo", "sh"] {
        assert!(!ran.iter().any(|c| c == forbidden), "the phone ran {forbidden}: {ran:?}");
    }
    assert!(lab.adb.log().iter().all(|e| e["adb"] != "reboot"));

    // Hosts, SSIDs and numbers are checked against strict sets at enqueue: 422, nothing stored.
    for (module, params, field) in [
        ("ping", json!({"host": "8.8.8.8; reboot"}), "params.host"),
        ("ping", json!({"host": "$(reboot)"}), "params.host"),
        ("wifi", json!({"enabled": true, "ssid": "lab'; reboot; '"}), "params.ssid"),
        ("voice_call", json!({"to": "+33`reboot`"}), "params.to"),
        ("send_sms", json!({"to": "112;id", "body": "x"}), "params.to"),
        ("ping", json!({"host": "8.8.8.8", "interval_ms": 100}), "params.interval_ms"),
    ] {
        let r = lab
            .api
            .post(&format!("/api/v1/modules/{module}/runs"), json!({"device": {"serial": "INJ1"}, "params": params}))
            .await;
        assert_eq!(r.status, 422, "{module} {params}: {:?}", r.body);
        assert!(r.body["error"]["details"]["fields"].get(field).is_some(), "{:?}", r.body);
    }
    let runs = lab.api.get("/api/v1/runs").await;
    assert_eq!(runs.body["items"].as_array().unwrap().len(), 1, "the refused runs were not stored");
}

/// The breaker of one phone, by serial.
async fn breaker(api: &Api, serial: &str) -> Value {
    let phones = api.get("/api/v1/devices?limit=500").await.body["items"].as_array().cloned().unwrap_or_default();
    phones.into_iter().find(|d| d["serial"] == serial).map(|d| d["breaker"].clone()).unwrap_or(Value::Null)
}

#[tokio::test]
async fn adb_failures_are_infrastructure_errors_retried_and_counted_by_the_breaker() {
    let phones = json!({"GONE": {"state": "absent"}, "OFF1": {"state": "offline"}, "UNAU": {"state": "unauthorized"},
                        "CLSD": {"close_next": true}});
    let lab = lab(phones, &[("SWITCHBOARD_BREAKER_THRESHOLD", "3")]).await;
    for serial in ["GONE", "OFF1", "UNAU", "CLSD"] {
        lab.phone(serial).await;
    }
    let expect = [
        ("GONE", "adb: device 'GONE' not found"),
        ("OFF1", "adb: device offline"),
        ("UNAU", "adb: device unauthorized: accept the USB debugging prompt on the phone"),
    ];
    // Each is retried (three attempts) and each attempt counts: the breaker opens.
    let mut runs = Vec::new();
    for (serial, _) in expect {
        let run = lab.api.start("device_info", json!({"device": {"serial": serial}, "max_attempts": 3})).await;
        runs.push(run["id"].as_str().unwrap().to_string());
    }
    for ((serial, message), id) in expect.iter().zip(&runs) {
        let run = lab.api.wait_terminal(id, Duration::from_secs(30)).await;
        let error = (run["status"].as_str(), run["error"]["kind"].as_str(), run["attempt"].as_i64());
        assert_eq!(error, (Some("errored"), Some("device_unreachable"), Some(3)), "{run}");
        assert!(run["error"]["message"].as_str().unwrap().contains(message), "{serial}: {run}");
        assert_eq!(breaker(&lab.api, serial).await["state"], "open", "{serial}");
    }
    // `error: closed` was one dropped connection: the retry works.
    let run = lab.api.start("device_info", json!({"device": {"serial": "CLSD"}, "max_attempts": 3})).await;
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!((run["status"].as_str(), run["attempt"].as_i64()), (Some("succeeded"), Some(2)), "{run}");
    let requeued = lab.api.events(run["id"].as_str().unwrap()).await;
    let why = requeued.iter().find(|e| e["type"] == "run.requeued").expect("a retry");
    assert!(why["data"].to_string().contains("error: closed"), "{why}");
    drop(lab);

    // No adb at all: a driver error, retried and counted like the others.
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&with(FAST, &[("SWITCHBOARD_ADB_PATH", "/nonexistent/adb")]));
    let r = api.post("/api/v1/devices", json!({"serial": "X1", "driver": "adb"})).await;
    assert_eq!(r.status, 201);
    let run = api.start("ping", json!({"device": {"serial": "X1"}, "max_attempts": 3})).await;
    let run = api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    let error = (run["status"].as_str(), run["error"]["kind"].as_str(), run["attempt"].as_i64());
    assert_eq!(error, (Some("errored"), Some("driver_error"), Some(3)), "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("adb not found at \"/nonexistent/adb\""), "{run}");
    assert_eq!(breaker(&api, "X1").await["state"], "open");
}

#[tokio::test]
async fn a_hung_adb_call_is_killed_with_its_children_within_the_timeout() {
    let lab = lab(json!({"HUNG": {"hang": ["ping"]}}), &[("SWITCHBOARD_ADB_TIMEOUT_S", "30")]).await;
    lab.phone("HUNG").await;
    let started = Instant::now();
    let run = lab.api.start("ping", json!({"device": {"serial": "HUNG"}, "timeout_s": 3, "max_attempts": 1})).await;
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(run["status"], "timed_out", "{run}");
    assert!(took < Duration::from_secs(10), "the run ended {took:?} after it started, its timeout is 3 s");
    let hung: Vec<Value> = lab.adb.log().into_iter().filter(|e| e["hang"].is_string()).collect();
    assert_eq!(hung.len(), 1, "{hung:?}");
    let (adb, child) = (hung[0]["pid"].as_i64().unwrap() as i32, hung[0]["child"].as_i64().unwrap() as i32);
    eventually(Duration::from_secs(5), "the hung adb and its child to be gone", || async {
        (process_gone(adb) && process_gone(child)).then_some(())
    })
    .await;

    // A plain call past SWITCHBOARD_ADB_TIMEOUT_S is killed too, as an infrastructure error.
    lab.adb.set("HUNG", json!({"hang": ["getprop"]}));
    let env = lab.adb.env();
    let _quick = lab.env.worker(&pairs(&env, &with(FAST, &[("SWITCHBOARD_ADB_TIMEOUT_S", "1")])));
    drop(lab._worker);
    let started = Instant::now();
    let run =
        lab.api.start("device_info", json!({"device": {"serial": "HUNG"}, "timeout_s": 60, "max_attempts": 1})).await;
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(8), "killed at its 1 s timeout, not the run's 60 s");
    assert_eq!(
        (run["status"].as_str(), run["error"]["kind"].as_str()),
        (Some("errored"), Some("device_unreachable")),
        "{run}"
    );
    assert!(run["error"]["message"].as_str().unwrap().contains("was killed"), "{run}");
    let hung: Vec<Value> = lab.adb.log().into_iter().filter(|e| e["hang"].is_string()).collect();
    for h in &hung {
        let (adb, child) = (h["pid"].as_i64().unwrap() as i32, h["child"].as_i64().unwrap() as i32);
        eventually(Duration::from_secs(5), "every hung adb to be gone", || async {
            (process_gone(adb) && process_gone(child)).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn discovery_adds_loses_and_finds_phones_again() {
    let discover = [
        ("SWITCHBOARD_ADB_DISCOVER", "true"),
        ("SWITCHBOARD_ADB_DISCOVER_INTERVAL_S", "1"),
        ("SWITCHBOARD_ADB_POOL", "found"),
    ];
    let lab = lab(json!({"FOUND1": {}, "FOUND2": {"state": "unauthorized", "transport_id": 2}}), &discover).await;
    let device = |serial: &'static str| {
        let api = &lab.api;
        async move {
            let items =
                api.get("/api/v1/devices?pool=found").await.body["items"].as_array().cloned().unwrap_or_default();
            items.into_iter().find(|d| d["serial"] == serial)
        }
    };
    let one = eventually(Duration::from_secs(15), "FOUND1 registered online", || async {
        device("FOUND1").await.filter(|d| d["status"] == "online")
    })
    .await;
    assert_eq!(
        (one["driver"].as_str(), one["model"].as_str(), one["pool"].as_str()),
        (Some("adb"), Some("Pixel 6a"), Some("found"))
    );
    assert_eq!(one["metadata"]["adb"]["product"], "bluejay");
    let two = device("FOUND2").await.expect("FOUND2 registered");
    assert_eq!((two["status"].as_str(), two["status_source"].as_str()), (Some("offline"), Some("discovery")));
    assert!(two["status_reason"].as_str().unwrap().contains("unauthorized: accept the USB debugging prompt"), "{two}");

    // FOUND1 unplugged: offline with a reason; its queued run waits, it is not failed.
    lab.adb.set("FOUND1", json!({"state": "absent"}));
    eventually(Duration::from_secs(10), "FOUND1 offline", || async {
        device("FOUND1").await.filter(|d| d["status"] == "offline")
    })
    .await;
    let gone = device("FOUND1").await.unwrap();
    assert_eq!(gone["status_reason"], "not listed by adb devices");
    let run = lab.api.start("device_info", json!({"device": {"serial": "FOUND1"}})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lab.api.run(run["id"].as_str().unwrap()).await["status"], "queued");

    // Plugged back: online again, and the waiting run runs.
    lab.adb.set("FOUND1", json!({"state": "device"}));
    let run = lab.api.wait_terminal(run["id"].as_str().unwrap(), Duration::from_secs(15)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let back = device("FOUND1").await.unwrap();
    assert_eq!((back["status"].as_str(), back["status_reason"].as_str()), (Some("online"), None));
    // FOUND2 authorized: online.
    lab.adb.set("FOUND2", json!({"state": "device"}));
    eventually(Duration::from_secs(10), "FOUND2 online", || async {
        device("FOUND2").await.filter(|d| d["status"] == "online")
    })
    .await;

    // An operator's maintenance stands whatever adb says.
    let id = back["id"].as_str().unwrap();
    let r = lab
        .api
        .patch(&format!("/api/v1/devices/{id}"), json!({"status": "maintenance", "status_reason": "battery swap"}))
        .await;
    assert_eq!(r.status, 200);
    lab.adb.set("FOUND1", json!({"state": "absent"}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = device("FOUND1").await.unwrap();
    assert_eq!((kept["status"].as_str(), kept["status_reason"].as_str()), (Some("maintenance"), Some("battery swap")));
    let pg = lab.env.pg().await;
    let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'device.status_changed'")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert!(changes >= 3, "every change is an event ({changes})");
}
