//! Starting runs in bulk: `POST /runs/batch` (all or none, a key per item) and the
//! API's group commit (concurrent starts share an INSERT, each still answered only
//! once its run has committed).

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::harness::{Api, Env, json_logs};

/// The one number `sql` selects.
async fn scalar(pg: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pg).await.unwrap()
}

async fn count_runs(env: &Env) -> i64 {
    let pg = env.pg().await;
    let n = scalar(&pg, "SELECT count(*) FROM runs").await;
    pg.close().await;
    n
}

/// Waits until `count_sql` (one count) reaches `at_least`.
async fn count_reaches(pg: &sqlx::PgPool, secs: u64, what: &str, count_sql: &'static str, at_least: i64) {
    crate::harness::eventually(Duration::from_secs(secs), what, || {
        let pg = pg.clone();
        async move { (scalar(&pg, count_sql).await >= at_least).then_some(()) }
    })
    .await;
}

async fn batch(api: &Api, runs: Value) -> (u16, Value) {
    let r = api.post("/api/v1/runs/batch", json!({ "runs": runs })).await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_starts_every_run_or_none_and_replays_its_keys() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&[]);
    api.device("bulk-1", "bulk", json!({})).await;
    let w = api.post("/api/v1/workflows", json!({"name": "two", "steps": [{"module": "sleep", "params": {"ms": 1}}, {"module": "sleep", "params": {"ms": 2}}]}))
        .await;
    assert_eq!(w.status, 201, "{:?}", w.body);
    let workflow = w.body["id"].as_str().unwrap().to_string();
    let items = json!([
        {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "bulk"}, "idempotency_key": "ci-1-a"},
        {"module": "sleep", "params": {"ms": 2}, "device": {"serial": "bulk-1"}, "priority": 8},
        {"workflow_id": workflow, "device": {"pool": "bulk"}},
    ]);
    let (status, first) = batch(&api, items.clone()).await;
    assert_eq!(status, 202, "{first}");
    let runs = first["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|r| r["created"] == true), "{first}");
    assert_eq!(runs[0]["run"]["idempotency_key"], "ci-1-a");
    assert_eq!(runs[1]["run"]["priority"], 8);
    assert_eq!(
        (runs[2]["run"]["kind"].as_str(), runs[2]["run"]["target"].as_str()),
        (Some("workflow"), Some(&*workflow))
    );
    for r in runs {
        let done = api.wait_terminal(r["run"]["id"].as_str().unwrap(), Duration::from_secs(30)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }

    // Sent again: the keyed item is the run it started (created false); the others,
    // without keys, are new runs.
    let (status, again) = batch(&api, items.clone()).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["runs"][0]["created"], false);
    assert_eq!(again["runs"][0]["run"]["id"], first["runs"][0]["run"]["id"]);
    assert_eq!(again["runs"][1]["created"], true);
    assert_ne!(again["runs"][1]["run"]["id"], first["runs"][1]["run"]["id"]);
    let before = count_runs(&env).await;
    assert_eq!(before, 5);

    // Only keyed items, all replayed: 200.
    let (status, replayed) = batch(&api, json!([items[0].clone()])).await;
    assert_eq!((status, &replayed["runs"][0]["run"]["id"]), (200, &first["runs"][0]["run"]["id"]), "{replayed}");

    // The key with another item refuses the whole batch: nothing starts.
    let other = json!([
        {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "bulk"}},
        {"module": "sleep", "params": {"ms": 9}, "device": {"pool": "bulk"}, "idempotency_key": "ci-1-a"},
    ]);
    let (status, refused) = batch(&api, other).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["details"]["reason"], "idempotency_key_reused", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().starts_with("runs[1]"), "{refused}");
    assert_eq!(count_runs(&env).await, before);

    // Every bad item is named, and nothing starts.
    let bad = json!([
        {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "bulk"}},
        {"module": "sleep", "params": {"ms": "soon"}, "device": {"pool": "bulk"}},
        {"module": "teleport", "device": {"pool": "bulk"}},
        {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "nowhere"}},
        {"workflow_id": "00000000-0000-4000-8000-000000000000", "device": {"pool": "bulk"}},
        {"module": "sleep", "workflow_id": workflow, "device": {"pool": "bulk"}},
        {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "bulk"}, "colour": "red"},
        "sleep",
    ]);
    let (status, refused) = batch(&api, bad).await;
    assert_eq!(status, 422, "{refused}");
    let fields = refused["error"]["details"]["fields"].as_object().unwrap().clone();
    for f in ["runs[1].params.ms", "runs[2].module", "runs[5]", "runs[6].colour", "runs[7]"] {
        assert!(fields.contains_key(f), "{f} not named: {refused}");
    }
    assert!(!fields.keys().any(|k| k.starts_with("runs[0]")), "{refused}");
    assert_eq!(count_runs(&env).await, before);
    // What only the database can tell is checked once the items parse.
    let (status, refused) = batch(
        &api,
        json!([
            {"module": "sleep", "params": {"ms": 1}, "device": {"pool": "nowhere"}},
            {"workflow_id": "00000000-0000-4000-8000-000000000000", "device": {"pool": "bulk"}},
        ]),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    let fields = &refused["error"]["details"]["fields"];
    assert!(fields["runs[0].device"].as_str().unwrap().contains("no registered device"), "{refused}");
    assert!(fields["runs[1].workflow_id"].as_str().unwrap().contains("not found"), "{refused}");
    assert_eq!(count_runs(&env).await, before);

    // Empty, too many, or not a list.
    for body in [json!({"runs": []}), json!({}), json!({"runs": "all"}), json!({"runs": [], "more": 1})] {
        let r = api.post("/api/v1/runs/batch", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(r.body["error"]["details"]["fields"]["runs"].is_string(), "{body}: {:?}", r.body);
    }
    let many: Vec<Value> =
        (0..1001).map(|_| json!({"module": "sleep", "params": {"ms": 1}, "device": {"pool": "bulk"}})).collect();
    let (status, refused) = batch(&api, Value::Array(many)).await;
    assert_eq!(status, 422, "{}", refused["error"]["message"]);
    assert!(refused["error"]["message"].as_str().unwrap().contains("1 to 1000"), "{refused}");
    assert_eq!(count_runs(&env).await, before);
}

/// A thousand runs in one call, all queued and run to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_of_1000_runs_all_finish() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "16")]);
    api.devices("thousand", "thousand", 8, json!({})).await;
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"module": "sleep", "params": {"ms": i % 3}, "device": {"pool": "thousand"}}))
        .collect();
    let (status, started) = batch(&api, Value::Array(items)).await;
    assert_eq!(status, 202, "{}", started["error"]);
    assert_eq!(started["runs"].as_array().unwrap().len(), 1000);
    let pg = env.pg().await;
    count_reaches(
        &pg,
        120,
        "every run of the batch to succeed",
        "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        1000,
    )
    .await;
    let events = scalar(&pg, "SELECT count(*) FROM events WHERE type = 'run.queued'").await;
    assert_eq!(events, 1000, "one run.queued per run");
    pg.close().await;
}

/// Concurrent starts share INSERTs, yet each answer means its own run committed, and
/// two starts with one key, even in one shared INSERT, make one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_share_commits_and_keep_their_guarantees() {
    let env = Env::new();
    // A window wide enough that the concurrent starts below do share INSERTs.
    let api = env.api(&[("SWITCHBOARD_GROUP_COMMIT_WINDOW_US", "2000")]);
    api.device("gc-1", "gc", json!({})).await;
    let body = json!({"params": {"ms": 1}, "device": {"pool": "gc"}});
    let starts = (0..60).map(|i| {
        let key = format!("gc-key-{}", i / 2); // two requests per key
        let r = api
            .client
            .post(format!("{}/api/v1/modules/sleep/runs", api.base))
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .header("idempotency-key", key.clone())
            .json(&body)
            .send();
        async move {
            let r = r.await.unwrap();
            (key, r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    let answers = join_all(starts).await;
    let pg = env.pg().await;
    for pair in answers.chunks(2) {
        let [(key, s1, a), (_, s2, b)] = pair else { unreachable!() };
        assert_eq!(a["id"], b["id"], "{key}: one run per key ({a} / {b})");
        let mut statuses = [*s1, *s2];
        statuses.sort();
        assert_eq!(statuses, [200, 202], "{key}: one start, one replay");
        // Answered: so committed, and visible to anyone.
        let id: uuid::Uuid = a["id"].as_str().unwrap().parse().unwrap();
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = $1").bind(id).fetch_one(&pg).await.unwrap();
        assert_eq!(n, 1);
    }
    let total = scalar(&pg, "SELECT count(*) FROM runs").await;
    assert_eq!(total, 30);
    // The starts did share statements: fewer INSERTs than runs.
    // One statement's rows share their transaction's now().
    let shared =
        scalar(&pg, "SELECT count(*) FROM (SELECT created_at FROM runs GROUP BY 1 HAVING count(*) > 1) s").await;
    assert!(shared > 0, "no two runs share a transaction");
    pg.close().await;
}

/// More due jobs than one Lua `unpack` can move (about 8,000) piled up in Redis while
/// no worker polled: apalis' fetch alone fails at every poll and the queue would stall
/// for good. Workers move the pile in chunks first, and the runs flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pile_of_9000_pushed_runs_does_not_stall_the_workers() {
    let env = Env::new();
    let api = env.api(&[]);
    api.devices("pile", "pile", 4, json!({})).await;
    let items: Vec<Value> =
        (0..1000).map(|_| json!({"module": "sleep", "params": {"ms": 0}, "device": {"pool": "pile"}})).collect();
    for _ in 0..9 {
        let (status, body) = batch(&api, Value::Array(items.clone())).await;
        assert_eq!(status, 202, "{}", body["error"]);
    }
    let _worker = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "8")]);
    let pg = env.pg().await;
    count_reaches(
        &pg,
        60,
        "the worker to get through the pile",
        "SELECT count(*) FROM runs WHERE status = 'succeeded'",
        300,
    )
    .await;
    pg.close().await;
}

/// Outcomes that end together are written together (issue 13), and each keeps its own
/// fate: its own status, step, single `run.finished`, released device and breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_written_together_each_keep_their_own_fate() {
    let env = Env::new();
    let api = env.api(&[]);
    // One finish transaction at a time: whatever ends meanwhile has to share the next.
    let _worker = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "32"), ("SWITCHBOARD_FINISH_LANES", "1")]);
    api.devices("fin-ok", "fin-ok", 8, json!({})).await;
    api.device("fin-fail-0", "fin-fail", json!({"fail_rate": 1.0})).await;
    api.device("fin-fail-1", "fin-fail", json!({"fail_rate": 1.0})).await;
    let bad = api.device("fin-err-0", "fin-err", json!({"error_rate": 1.0})).await;
    let ping =
        |pool: &str| json!({"module": "ping", "params": {"count": 1}, "device": {"pool": pool}, "max_attempts": 1});
    let mut items: Vec<Value> = (0..90).map(|_| ping("fin-ok")).collect();
    items.extend((0..12).map(|_| ping("fin-fail")));
    items.extend((0..2).map(|_| ping("fin-err")));
    let (status, started) = batch(&api, Value::Array(items)).await;
    assert_eq!(status, 202, "{}", started["error"]);
    let pg = env.pg().await;
    count_reaches(
        &pg,
        60,
        "every run to end",
        "SELECT count(*) FROM runs WHERE status NOT IN ('queued', 'running')",
        104,
    )
    .await;
    let by_pool: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT r.selector ->> 'pool', r.status::text, s.status::text, count(*) FROM runs r
         JOIN run_steps s ON s.run_id = r.id AND s.idx = 0 GROUP BY 1, 2, 3 ORDER BY 1",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    let expected = [
        ("fin-err", "errored", "errored", 2),
        ("fin-fail", "failed", "failed", 12),
        ("fin-ok", "succeeded", "passed", 90),
    ];
    let expected: Vec<(String, String, String, i64)> =
        expected.iter().map(|(p, r, s, n)| (p.to_string(), r.to_string(), s.to_string(), *n)).collect();
    assert_eq!(by_pool, expected);
    // One run.finished per run, saying its own status.
    let wrong = scalar(&pg, "SELECT count(*) FROM runs r WHERE (SELECT count(*) FROM events e WHERE e.run_id = r.id AND e.type = 'run.finished'
             AND e.data ->> 'status' = r.status::text) <> 1").await;
    assert_eq!(wrong, 0, "runs without exactly one matching run.finished");
    // Every device released; the bad one's breaker counted both errors, the rest none.
    let leased = scalar(&pg, "SELECT count(*) FROM devices WHERE lease_run_id IS NOT NULL").await;
    assert_eq!(leased, 0);
    let d = api.get(&format!("/api/v1/devices/{}", bad["id"].as_str().unwrap())).await.body;
    assert_eq!(d["breaker"]["consecutive_failures"], 2, "{d}");
    let counted = scalar(&pg, "SELECT sum(breaker_failures) FROM devices WHERE serial <> 'fin-err-0'").await;
    assert_eq!(counted, 0);
    // And they were written together: fewer finish transactions than runs (rows one
    // transaction inserted share its xmin).
    let transactions = scalar(&pg, "SELECT count(DISTINCT xmin::text) FROM events WHERE type = 'run.finished'").await;
    assert!(transactions < 104, "{transactions} finish transactions for 104 runs: none shared");
    pg.close().await;
}

/// Deliveries taken together are claimed together (issue 13): one read and one
/// transaction for several runs, each still on its own device, and the runs whose
/// only device is taken left queued, holding nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_taken_together_are_claimed_together_each_on_its_own_device() {
    let env = Env::new();
    let api = env.api(&[]);
    api.devices("claim", "claim", 24, json!({})).await;
    api.device("claim-one", "claim-one", json!({})).await;
    let sleep = |pool: &str| json!({"module": "sleep", "params": {"ms": 1500}, "device": {"pool": pool}});
    let mut items: Vec<Value> = (0..24).map(|_| sleep("claim")).collect();
    items.extend((0..3).map(|_| sleep("claim-one")));
    let (status, started) = batch(&api, Value::Array(items)).await;
    assert_eq!(status, 202, "{}", started["error"]);
    // Pushed before any worker runs: the worker's first fetch delivers them at once.
    let _worker = env.worker(&[("SWITCHBOARD_WORKER_CONCURRENCY", "32")]);
    let pg = env.pg().await;
    let (running, devices): (i64, i64) =
        crate::harness::eventually(Duration::from_secs(30), "25 runs running at once", || {
            let pg = pg.clone();
            async move {
                let r: (i64, i64) =
                    sqlx::query_as("SELECT count(*), count(DISTINCT device_id) FROM runs WHERE status = 'running'")
                        .fetch_one(&pg)
                        .await
                        .unwrap();
                (r.0 == 25).then_some(r)
            }
        })
        .await;
    assert_eq!((running, devices), (25, 25), "each run on its own device");
    let leases = scalar(
        &pg,
        "SELECT count(*) FROM devices d JOIN runs r ON r.id = d.lease_run_id AND r.device_id = d.id
         WHERE r.status = 'running'",
    )
    .await;
    assert_eq!(leases, 25, "each device leased to the run that runs on it");
    let stranded = scalar(
        &pg,
        "SELECT count(*) FROM runs WHERE selector ->> 'pool' = 'claim-one' AND status = 'queued' AND device_id IS NULL",
    )
    .await;
    assert_eq!(stranded, 2, "runs whose one device is taken wait queued, holding nothing");
    // The claims shared transactions: fewer than one per run started (rows one
    // transaction inserted share its xmin).
    let transactions = scalar(&pg, "SELECT count(DISTINCT xmin::text) FROM events WHERE type = 'run.started'").await;
    assert!(transactions < 25, "{transactions} claim transactions for 25 runs: none shared");
    count_reaches(&pg, 30, "all 27 runs to succeed", "SELECT count(*) FROM runs WHERE status = 'succeeded'", 27).await;
    pg.close().await;
}

/// Devices released together are handed their next runs together (issue 13): one
/// read of every released device's candidates, then each device its own run. No run is
/// given to two devices, no device runs two at once, and every run is executed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_released_together_are_handed_distinct_runs() {
    let env = Env::new();
    let api = env.api(&[]);
    api.devices("hand", "hand", 12, json!({})).await;
    // Runs of one length on twelve devices end together; one finish lane makes them
    // share a finish transaction, and so its hand-offs. More slots than devices keep
    // deliveries coming, whose claims lock queued runs while the hand-offs pick theirs.
    let items: Vec<Value> =
        (0..120).map(|_| json!({"module": "sleep", "params": {"ms": 100}, "device": {"pool": "hand"}})).collect();
    let (status, started) = batch(&api, Value::Array(items)).await;
    assert_eq!(status, 202, "{}", started["error"]);
    let _worker = env.worker(&[
        ("SWITCHBOARD_WORKER_CONCURRENCY", "32"),
        ("SWITCHBOARD_FINISH_LANES", "1"),
        ("SWITCHBOARD_LOG_FORMAT", "json"),
    ]);
    let pg = env.pg().await;
    let done = "SELECT count(*) FROM runs WHERE status = 'succeeded'";
    count_reaches(&pg, 60, "a first wave to end", done, 24).await;
    // The oldest waiting runs, every device's first choice, held by another
    // transaction: the picks fail, and those devices look again alone, after the
    // batch's other picks.
    let mut holder = pg.begin().await.unwrap();
    let held: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE status = 'queued' ORDER BY priority DESC, queued_at, id LIMIT 3 FOR UPDATE",
    )
    .fetch_all(&mut *holder)
    .await
    .unwrap();
    assert_eq!(held.len(), 3);
    // Held for a few rounds of hand-offs only (runs take 100 ms), three seconds at
    // most: a claimer whose deliveries include a held run waits for it (by design,
    // `lock_candidates`), holding the runs it locked before it in id order, and a
    // finish of one of those waits in turn. A lock held this long is the test's own
    // doing; were it held until many more runs end, the finishes it stalls could hold
    // the test up to its timeout.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until && scalar(&pg, done).await < 60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.commit().await.unwrap();
    count_reaches(&pg, 60, "every run to succeed", done, 120).await;
    // Written together, not rescued one by one: a batch whose transaction failed (two
    // devices starting one run would) is written again alone, and says so.
    let alone: Vec<String> =
        json_logs(&env, "worker").iter().map(Value::to_string).filter(|l| l.contains("writing each alone")).collect();
    assert!(alone.is_empty(), "finish batches that failed: {alone:?}");
    // Each run started once, on one device.
    let starts: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.type = 'run.started' GROUP BY r.id",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(starts.len() == 120 && starts.iter().all(|n| *n == 1), "run.started per run: {starts:?}");
    // No device ran two at once: on each, a run starts after the one before it ended.
    let overlaps = scalar(&pg, "SELECT count(*) FROM (SELECT started_at, lag(finished_at) OVER (PARTITION BY device_id ORDER BY started_at) AS prev
                               FROM runs) x WHERE started_at < prev").await;
    assert_eq!(overlaps, 0, "a device ran two runs at once");
    // And finish transactions handed several runs over at once: run.started rows that
    // share a run.finished's transaction, more than one in it.
    let shared = scalar(
        &pg,
        "SELECT count(*) FROM (SELECT xmin::text FROM events WHERE type = 'run.started'
                                 AND xmin::text IN (SELECT xmin::text FROM events WHERE type = 'run.finished')
                               GROUP BY 1 HAVING count(*) > 1) x",
    )
    .await;
    assert!(shared > 0, "no finish transaction handed over more than one run");
    let leased = scalar(&pg, "SELECT count(*) FROM devices WHERE lease_run_id IS NOT NULL").await;
    assert_eq!(leased, 0);
    pg.close().await;
}
