//! Grafana's provisioned dashboards (issue 12): every SQL query of
//! `deploy/grafana/dashboards/*.json`, with Grafana's macros and the dashboard's
//! variables substituted, runs against a seeded database and returns the columns its
//! panel expects.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Column, Executor, Row, TypeInfo};

use crate::harness::*;

/// Grafana's macros, as its Postgres datasource expands them (quoted RFC 3339 bounds,
/// epoch buckets) for the last day and a 1-hour interval; `device` for `$device`.
fn expand(sql: &str, device: &str) -> String {
    let now = chrono::Utc::now() + chrono::Duration::minutes(1);
    let (from, to) = ((now - chrono::Duration::days(1)).to_rfc3339(), now.to_rfc3339());
    let mut out = sql.to_string();
    while let Some(start) = out.find("$__timeGroupAlias(") {
        let end = start + out[start..].find(')').expect("a closing parenthesis");
        let column = out[start + "$__timeGroupAlias(".len()..end].split(',').next().unwrap().trim().to_string();
        out.replace_range(start..=end, &format!("floor(extract(epoch from {column})/3600)*3600 AS \"time\""));
    }
    while let Some(start) = out.find("$__timeFilter(") {
        let end = start + out[start..].find(')').expect("a closing parenthesis");
        let column = out[start + "$__timeFilter(".len()..end].trim().to_string();
        out.replace_range(start..=end, &format!("{column} BETWEEN '{from}' AND '{to}'"));
    }
    out.replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"))
        .replace("$__interval", "'1h'")
        .replace("$device", device)
}

fn dashboard(name: &str) -> Value {
    let path = format!("{}/deploy/grafana/dashboards/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard file")).expect("dashboard JSON")
}

const NUMERIC: &[&str] = &["INT2", "INT4", "INT8", "FLOAT4", "FLOAT8", "NUMERIC"];

/// Runs one panel's query; checks its columns against its format; returns its rows.
async fn check(pg: &sqlx::PgPool, title: &str, target: &Value, device: &str) -> usize {
    let sql = expand(target["rawSql"].as_str().unwrap(), device);
    assert!(!sql.contains('$'), "{title}: an unexpanded macro or variable in {sql}");
    let described = pg
        .describe(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.clone())))
        .await
        .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
    let columns: Vec<(String, String)> =
        described.columns().iter().map(|c| (c.name().to_string(), c.type_info().name().to_string())).collect();
    match target["format"].as_str().unwrap() {
        "time_series" => {
            assert_eq!(columns[0].0, "time", "{title}: a time series starts with its time: {columns:?}");
            assert!(
                columns[0].1.starts_with("TIMESTAMP") || NUMERIC.contains(&columns[0].1.as_str()),
                "{title}: {columns:?}"
            );
            for (name, ty) in &columns[1..] {
                assert!(name == "metric" && ty == "TEXT" || NUMERIC.contains(&ty.as_str()), "{title}: {name} is {ty}");
            }
        }
        "table" => assert!(!columns.is_empty(), "{title}: no columns"),
        other => panic!("{title}: format {other}"),
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .fetch_all(pg)
        .await
        .unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
    rows.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_and_gives_its_panel_the_columns_it_expects() {
    let env = Env::new();
    let api = env.api(&[]);
    let _worker = env.worker(FAST);
    api.device("gf-1", "lab", json!({})).await;
    let flaky = api.device("gf-flaky", "lab-flaky", json!({"fail_rate": 1.0})).await;
    for ms in [5, 50] {
        let r = api.start("sleep", json!({"params": {"ms": ms}, "device": {"serial": "gf-1"}})).await;
        api.wait_terminal(r["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    }
    // A flaky failure: failed, then its retry passed.
    let failed = api.start("ping", json!({"device": {"serial": "gf-flaky"}})).await;
    let failed = failed["id"].as_str().unwrap().to_string();
    assert_eq!(api.wait_terminal(&failed, Duration::from_secs(20)).await["status"], "failed");
    api.patch(&format!("/api/v1/devices/{}", flaky["id"].as_str().unwrap()), json!({"metadata": {"sim": {}}})).await;
    let retry = api.post(&format!("/api/v1/runs/{failed}/retry"), json!({})).await;
    api.wait_terminal(retry.body["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    // A schedule that fires, and a run left waiting.
    let s = api
        .post(
            "/api/v1/schedules",
            json!({"name": "gf-every-second", "cron": "* * * * * *",
            "target": {"kind": "module", "id": "sleep", "params": {"ms": 1}, "device": {"pool": "lab"}}}),
        )
        .await;
    assert_eq!(s.status, 201);
    let scheduler = env.scheduler(&[]);
    let pg = env.pg().await;
    eventually(Duration::from_secs(15), "a tick fired", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'schedule.fired'")
            .fetch_one(&pg)
            .await
            .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    drop(scheduler);
    let parked = api.device("gf-parked", "parked", json!({})).await;
    api.patch(&format!("/api/v1/devices/{}", parked["id"].as_str().unwrap()), json!({"status": "maintenance"})).await;
    api.start("sleep", json!({"params": {"ms": 1}, "device": {"pool": "parked"}})).await;

    // The device variable's query gives Grafana __text and __value.
    let device_board = dashboard("device");
    let var = &device_board["templating"]["list"][0];
    assert_eq!(var["name"], "device");
    let rows =
        sqlx::query(sqlx::AssertSqlSafe(var["query"].as_str().unwrap().to_string())).fetch_all(&pg).await.unwrap();
    assert_eq!(rows.len(), 3);
    let texts: Vec<String> = rows.iter().map(|r| r.get("__text")).collect();
    let device: String = rows[texts.iter().position(|t| t == "gf-1").unwrap()].get("__value");

    let mut empty = Vec::new();
    for (name, board) in [("overview", dashboard("overview")), ("device", device_board)] {
        assert!(board["uid"].is_string() && board["title"].is_string(), "{name}");
        for panel in board["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            for target in panel["targets"].as_array().unwrap() {
                if target["datasource"]["type"] != "grafana-postgresql-datasource" {
                    assert!(target["expr"].as_str().is_some_and(|e| e.contains("switchboard_")), "{title}");
                    continue;
                }
                if check(&pg, title, target, &device).await == 0 {
                    empty.push(format!("{name}: {title}"));
                }
            }
        }
    }
    // On this seeded history only the breaker panels have nothing to show.
    assert_eq!(
        empty,
        vec!["overview: Breaker openings", "device: Breaker openings and status changes"],
        "panels without rows"
    );
}
