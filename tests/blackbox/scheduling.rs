//! Issue 5: cron schedules that fire exactly once, however many schedulers run.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::Row;

use crate::harness::{Api, Env, ts};

async fn schedule(api: &Api, body: Value) -> String {
    let r = api.post("/api/v1/schedules", body).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Runs of a schedule (ticks only, not manual triggers), by scheduled time.
async fn ticks(env: &Env, schedule_id: &str) -> Vec<(DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    let pg = env.pg().await;
    let rows = sqlx::query(
        "SELECT scheduled_for, started_at, finished_at FROM runs WHERE schedule_id = $1 AND scheduled_for IS NOT NULL
         AND parent_run_id IS NULL ORDER BY scheduled_for",
    )
    .bind(uuid::Uuid::parse_str(schedule_id).unwrap())
    .fetch_all(&pg)
    .await
    .unwrap();
    rows.iter().map(|r| (r.get("scheduled_for"), r.get("started_at"), r.get("finished_at"))).collect()
}

async fn schedule_events(env: &Env, schedule_id: &str, kind: &str) -> Vec<Value> {
    let pg = env.pg().await;
    sqlx::query_scalar("SELECT data FROM events WHERE schedule_id = $1 AND type = $2 ORDER BY id")
        .bind(uuid::Uuid::parse_str(schedule_id).unwrap())
        .bind(kind)
        .fetch_all(&pg)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_get_precise_422s_and_good_ones_preview_and_trigger() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("sch-val-1", "lab", json!({})).await;
    let target = json!({"kind": "module", "id": "sleep", "params": {"ms": 1}, "device": {"pool": "lab"}});
    for (cron, tz, field, needle) in [
        ("61 * * * *", "UTC", "cron", "minute 61 is out of range"),
        ("not cron", "UTC", "cron", "expected 5 fields"),
        ("0 2 * * 1-5", "Mars/Olympus", "timezone", "unknown time zone"),
    ] {
        let r =
            api.post("/api/v1/schedules", json!({"name": "x", "cron": cron, "timezone": tz, "target": target})).await;
        assert_eq!(r.status, 422, "{cron} {tz}: {:?}", r.body);
        assert_eq!(r.body["error"]["code"], "validation_failed");
        let msg = r.body["error"]["details"]["fields"][field].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{field}: {msg}");
    }
    let r = api.post("/api/v1/schedules", json!({"name": "x", "cron": "@daily"})).await;
    assert_eq!(r.status, 422);
    assert!(r.body["error"]["details"]["fields"]["target"].is_string());
    let r = api.post("/api/v1/schedules", json!({"name": "x", "cron": "@daily", "target": {"kind": "workflow", "id": uuid::Uuid::new_v4(), "device": {"pool": "lab"}}})).await;
    assert_eq!(r.status, 422);
    assert!(r.body["error"]["details"]["fields"]["target.id"].as_str().unwrap().starts_with("no workflow"));
    assert_eq!(api.get("/api/v1/schedules").await.body["items"], json!([]), "bad input changed nothing");

    let id = schedule(
        &api,
        json!({"name": "weekday-nights", "cron": "0 2 * * 1-5", "timezone": "Europe/Paris", "target": target}),
    )
    .await;
    let s = api.get(&format!("/api/v1/schedules/{id}")).await.body;
    assert_eq!(
        (s["enabled"].as_bool(), s["misfire"].as_str(), s["overlap"].as_str()),
        (Some(true), Some("skip"), Some("allow"))
    );
    let p = api.get(&format!("/api/v1/schedules/{id}/preview?count=7")).await;
    assert_eq!(p.status, 200);
    let items = p.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 7);
    for it in items {
        let local: chrono::DateTime<chrono::FixedOffset> =
            chrono::DateTime::parse_from_rfc3339(it["local"].as_str().unwrap()).unwrap();
        use chrono::{Datelike, Timelike};
        assert_eq!((local.hour(), local.minute()), (2, 0));
        assert!(!matches!(local.weekday(), chrono::Weekday::Sat | chrono::Weekday::Sun));
    }
    assert_eq!(api.get(&format!("/api/v1/schedules/{id}/preview?count=0")).await.status, 422);

    let r = api.post(&format!("/api/v1/schedules/{id}/trigger"), json!({})).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!((r.body["trigger"].as_str(), r.body["schedule_id"].as_str()), (Some("schedule"), Some(id.as_str())));

    let r = api.patch(&format!("/api/v1/schedules/{id}"), json!({"enabled": false})).await;
    assert_eq!((r.status, r.body["next_fire_at"].clone()), (200, Value::Null));
    let r = api.patch(&format!("/api/v1/schedules/{id}"), json!({"cron": "@hourly", "enabled": true})).await;
    assert_eq!(r.status, 200);
    assert!(r.body["next_fire_at"].is_string());
    assert_eq!(api.patch(&format!("/api/v1/schedules/{id}"), json!({"cron": "* * *"})).await.status, 422);
    assert_eq!(api.delete(&format!("/api/v1/schedules/{id}")).await.status, 204);
    assert_eq!(api.get(&format!("/api/v1/schedules/{id}")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_fire_each_second_exactly_once() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("sch-once-1", "lab", json!({})).await;
    let id = schedule(
        &api,
        json!({"name": "every-second", "cron": "* * * * * *",
        "target": {"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "lab"}}}),
    )
    .await;
    // A generous grace: on a loaded machine a late tick still fires (this test is about
    // exactly once, not about timeliness).
    let grace = [("SWITCHBOARD_MISFIRE_GRACE_MS", "5000")];
    let schedulers: Vec<_> = (0..3).map(|_| env.metered("scheduler", &grace)).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Each scheduler counts the ticks it fired itself; their sum (what Prometheus
    // shows) is every tick, once. Disabled first, so no tick lands between the
    // scrapes and the count.
    let r = api.patch(&format!("/api/v1/schedules/{id}"), json!({"enabled": false})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut counted = 0.0;
    for (_, url) in &schedulers {
        let text = api.client.get(url).send().await.unwrap().text().await.unwrap();
        let series = format!(
            r#"switchboard_schedule_ticks_total{{schedule_id="{id}",schedule="every-second",decision="fired"}} "#
        );
        counted += text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
    }
    drop(schedulers);
    let t = ticks(&env, &id).await;
    assert!(t.len() >= 8, "only {} runs in 10 s", t.len());
    for w in t.windows(2) {
        assert_eq!(
            (w[1].0 - w[0].0).num_milliseconds(),
            1000,
            "a duplicate or a gap between {} and {}",
            w[0].0,
            w[1].0
        );
    }
    let s = api.get(&format!("/api/v1/schedules/{id}")).await.body;
    assert_eq!(s["stats"]["fired"].as_u64().unwrap() as usize, t.len());
    assert_eq!(s["stats"]["missed"], 0);
    assert_eq!(counted as usize, t.len(), "the schedulers' fired counters sum to the ticks fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_fire_once_catches_up_once_and_skip_does_not() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("sch-mis-1", "lab", json!({})).await;
    let target = json!({"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "lab"}});
    let once =
        schedule(&api, json!({"name": "once", "cron": "* * * * * *", "misfire": "fire_once", "target": target})).await;
    let skip =
        schedule(&api, json!({"name": "skip", "cron": "* * * * * *", "misfire": "skip", "target": target})).await;
    let grace = [("SWITCHBOARD_MISFIRE_GRACE_MS", "1000")];
    let mut s = env.scheduler(&grace);
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.sigkill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s2 = env.scheduler(&grace);
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(s2);

    for (id, catch_up) in [(&once, true), (&skip, false)] {
        let missed = schedule_events(&env, id, "schedule.missed").await;
        // The downtime is one decision covering its ticks (a loaded machine may add a
        // small late-tick decision; each is judged the same way).
        assert_eq!(missed.iter().filter(|m| m["count"].as_u64().unwrap() >= 3).count(), 1, "{missed:?}");
        let t = ticks(&env, id).await;
        for m in &missed {
            let (first, last) = (ts(&m["first"]), ts(&m["last"]));
            let in_gap: Vec<_> = t.iter().filter(|(sf, _, _)| *sf >= first && *sf <= last).collect();
            if catch_up {
                assert_eq!(in_gap.len(), 1, "fire_once: exactly one catch-up run: {in_gap:?}");
                assert_eq!(in_gap[0].0, last, "the catch-up is for the latest missed tick");
                assert_eq!(ts(&m["catch_up"]), last);
            } else {
                assert!(in_gap.is_empty(), "skip: no run for missed ticks: {in_gap:?}");
            }
        }
        // Ticks before and after the downtime still ran.
        let outage = missed.iter().find(|m| m["count"].as_u64().unwrap() >= 3).unwrap();
        assert!(
            t.iter().any(|(sf, _, _)| *sf < ts(&outage["first"]))
                && t.iter().any(|(sf, _, _)| *sf > ts(&outage["last"]))
        );
        let stats = api.get(&format!("/api/v1/schedules/{id}")).await.body["stats"].clone();
        assert!(stats["missed"].as_u64().unwrap() >= 2, "{stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_never_runs_two_at_once() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    api.device("sch-ovl-1", "lab", json!({})).await;
    api.device("sch-ovl-2", "lab", json!({})).await;
    let id = schedule(
        &api,
        json!({"name": "slow", "cron": "* * * * * *", "overlap": "skip",
        "target": {"kind": "module", "id": "sleep", "params": {"ms": 2500}, "device": {"pool": "lab"}}}),
    )
    .await;
    let s = env.scheduler(&[]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = ticks(&env, &id).await;
    assert!(t.len() >= 2, "{t:?}");
    let done: Vec<_> = t.iter().filter_map(|(_, s, f)| Some(((*s)?, (*f)?))).collect();
    for w in done.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs of the schedule overlapped: {w:?}");
    }
    let skipped = schedule_events(&env, &id, "schedule.skipped").await;
    assert!(skipped.len() >= 3, "ticks during a run are skipped and recorded: {skipped:?}");
    assert_eq!(skipped[0]["reason"], "overlap");
    let stats = api.get(&format!("/api/v1/schedules/{id}")).await.body["stats"].clone();
    assert_eq!(stats["skipped"].as_u64().unwrap() as usize, skipped.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_buffer_one_runs_one_more_when_the_active_one_ends() {
    let env = Env::new();
    let api = env.api(&[]);
    let _w = env.worker(&[]);
    api.device("sch-buf-1", "lab", json!({})).await;
    api.device("sch-buf-2", "lab", json!({})).await;
    let id = schedule(
        &api,
        json!({"name": "buffered", "cron": "* * * * * *", "overlap": "buffer_one",
        "target": {"kind": "module", "id": "sleep", "params": {"ms": 2500}, "device": {"pool": "lab"}}}),
    )
    .await;
    let s = env.scheduler(&[]);
    tokio::time::sleep(Duration::from_secs(7)).await;
    drop(s);
    let pg = env.pg().await;
    // Let the last started run end.
    for _ in 0..100 {
        let active: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')")
            .fetch_one(&pg)
            .await
            .unwrap();
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = ticks(&env, &id).await;
    let done: Vec<_> = t.iter().filter_map(|(sf, s, f)| Some((*sf, (*s)?, (*f)?))).collect();
    assert!(done.len() >= 2, "{t:?}");
    for w in done.windows(2) {
        assert!(w[0].2 <= w[1].1, "two runs overlapped: {w:?}");
        // The buffered tick was taken while the previous run was active, and started as
        // soon as it ended.
        assert!(w[1].0 < w[0].2, "the second run's tick came during the first run: {w:?}");
        assert!((w[1].1 - w[0].2).num_milliseconds() < 3000, "the buffered run waited: {w:?}");
    }
    assert!(!schedule_events(&env, &id, "schedule.buffered").await.is_empty());
    let fired = schedule_events(&env, &id, "schedule.fired").await;
    assert!(fired.iter().any(|f| f["buffered"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_schedule_does_not_hold_back_the_others() {
    let env = Env::new();
    let api = env.api(&[]);
    api.device("sch-iso-1", "lab", json!({})).await;
    let wf = api
        .post("/api/v1/workflows", json!({"name": "doomed", "steps": [{"module": "sleep", "params": {"ms": 1}}]}))
        .await;
    let wf_id = wf.body["id"].as_str().unwrap().to_string();
    let broken = schedule(
        &api,
        json!({"name": "broken", "cron": "* * * * * *",
        "target": {"kind": "workflow", "id": wf_id, "device": {"pool": "lab"}}}),
    )
    .await;
    let healthy = schedule(
        &api,
        json!({"name": "healthy", "cron": "* * * * * *",
        "target": {"kind": "module", "id": "sleep", "params": {"ms": 0}, "device": {"pool": "lab"}}}),
    )
    .await;
    // The workflow vanishes behind the API's back (a race the API cannot fully close).
    let pg = env.pg().await;
    sqlx::query("DELETE FROM workflows WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&wf_id).unwrap())
        .execute(&pg)
        .await
        .unwrap();
    let s = env.scheduler(&[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(s);
    let t = ticks(&env, &healthy).await;
    assert!(t.len() >= 3, "the healthy schedule kept firing: {t:?}");
    assert!(ticks(&env, &broken).await.is_empty());
    let errors = schedule_events(&env, &broken, "schedule.error").await;
    assert!(!errors.is_empty(), "the broken tick is recorded");
    assert!(errors[0]["error"].as_str().unwrap().contains("workflow"));
}
