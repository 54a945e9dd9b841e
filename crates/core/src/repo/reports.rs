//! Gathers a run for its JUnit report (`junit`): its steps or its campaign items, the
//! attempts that errored before the last, the device it ran on and the newest capture
//! of each step.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::{
    CoreResult,
    definition::RunDefinition,
    ids::{DeviceId, RunId},
    junit::{Case, ErroredAttempt, Outcome, Suite},
    model::{Run, RunStatus, RunStep, StepStatus},
    repo::{devices, runs},
    run_error::RunError,
};

/// The longest log excerpt put in a case's `system-out` (its newest part).
const EXCERPT_BYTES: usize = 64 * 1024;

/// The suite of run `id`; `run_url` is where its resource is served.
pub async fn junit_suite(pool: &PgPool, id: RunId, run_url: &str) -> CoreResult<Suite> {
    let run = runs::get(pool, id).await?;
    let mut properties = vec![
        ("run_id".to_string(), run.id.to_string()),
        ("run_url".to_string(), run_url.to_string()),
        ("kind".to_string(), run.kind.to_string()),
        ("status".to_string(), run.status.to_string()),
        ("attempts".to_string(), run.attempt.to_string()),
    ];
    let serial = match run.device_id {
        Some(d) => Some(device_properties(pool, d, &mut properties).await?),
        None => None,
    };
    let (name, cases) = match &run.definition {
        RunDefinition::Campaign(c) => (c.name.clone(), campaign_cases(pool, &run, &c.name, &c.items).await?),
        RunDefinition::Workflow(w) => {
            let planned: Vec<(String, Value)> = w.steps.iter().map(|s| (s.module.clone(), s.params.clone())).collect();
            (w.name.clone(), step_cases(pool, &run, &w.name, serial.as_deref(), &planned).await?)
        }
        RunDefinition::Module(m) => {
            let planned = vec![(m.module.clone(), m.params.clone())];
            (m.module.clone(), step_cases(pool, &run, &m.module, serial.as_deref(), &planned).await?)
        }
    };
    Ok(Suite {
        name,
        id: run.id.to_string(),
        timestamp: run.started_at.unwrap_or(run.created_at),
        time_s: seconds(run.started_at, run.finished_at),
        properties,
        cases,
    })
}

/// The device's serial, with its model and build added to the suite's properties.
async fn device_properties(pool: &PgPool, id: DeviceId, props: &mut Vec<(String, String)>) -> CoreResult<String> {
    let d = devices::get(pool, id).await?;
    props.push(("device_serial".into(), d.serial.clone()));
    props.push(("device_name".into(), d.name.clone()));
    if let Some(model) = &d.model {
        props.push(("device_model".into(), model.clone()));
    }
    // What discovery or the operator recorded: a build fingerprint, else a build id.
    let build = ["fingerprint", "build"].iter().find_map(|k| d.metadata.get(*k).and_then(Value::as_str));
    if let Some(build) = build {
        props.push(("device_build".into(), build.to_string()));
    }
    Ok(d.serial)
}

/// One case per planned step of a module or workflow run, with what was recorded.
async fn step_cases(
    pool: &PgPool,
    run: &Run,
    suite: &str,
    serial: Option<&str>,
    planned: &[(String, Value)],
) -> CoreResult<Vec<Case>> {
    let recorded: HashMap<i32, RunStep> =
        runs::steps(&mut *pool.acquire().await?, run.id).await?.into_iter().map(|s| (s.index, s)).collect();
    let errored = errored_attempts(pool, &[run.id]).await?;
    let mut logs = excerpts(pool, run.id).await?;
    let classname = format!("{}.{suite}", serial.unwrap_or("unplaced"));
    // An attempt's error belongs to the step it happened in; without one, to the step
    // the next attempt resumed at (the first recorded on a later attempt), else step 0.
    let resumed = recorded.values().filter(|s| s.attempt > 1).map(|s| s.index).min().unwrap_or(0);
    let mut per_step: HashMap<i32, Vec<ErroredAttempt>> = HashMap::new();
    for e in errored.get(&run.id).into_iter().flatten() {
        per_step.entry(e.step.unwrap_or(resumed)).or_default().push(attempt(e));
    }
    Ok(planned
        .iter()
        .enumerate()
        .map(|(i, (module, _))| {
            let i = i as i32;
            let step = recorded.get(&i);
            let outcome = match step {
                Some(s) => {
                    let error = s.error.as_ref().map(kind_message);
                    Outcome::of_step(s.status, s.result.as_ref(), error.as_ref().map(|(k, m)| (k.as_str(), *m)))
                }
                None if run.status.is_terminal() => {
                    Outcome::Skipped { message: "never ran: the run ended before this step".into() }
                }
                None => Outcome::of_step(StepStatus::Pending, None, None),
            };
            Case {
                classname: classname.clone(),
                name: format!("{module}[{i}]"),
                time_s: step.map_or(0.0, |s| seconds(s.started_at, s.finished_at)),
                outcome,
                errored_attempts: per_step.remove(&i).unwrap_or_default(),
                system_out: logs.remove(&i),
            }
        })
        .collect())
}

/// One case per campaign item: its child's outcome, or skipped when it has none.
async fn campaign_cases(
    pool: &PgPool,
    run: &Run,
    suite: &str,
    items: &[crate::definition::ChildSpec],
) -> CoreResult<Vec<Case>> {
    let children = sqlx::query!(
        r#"SELECT r.parent_index, r.id AS "id: RunId", r.status AS "status: RunStatus", r.result, r.error,
                  r.started_at, r.finished_at, d.serial AS "serial?"
           FROM runs r LEFT JOIN devices d ON d.id = r.device_id
           WHERE r.parent_run_id = $1"#,
        run.id as RunId
    )
    .fetch_all(pool)
    .await?;
    let ids: Vec<RunId> = children.iter().map(|c| c.id).collect();
    let mut errored = errored_attempts(pool, &ids).await?;
    let by_index: HashMap<i32, _> = children.into_iter().filter_map(|c| c.parent_index.map(|i| (i, c))).collect();
    Ok(items
        .iter()
        .map(|item| {
            let what = match &item.definition {
                RunDefinition::Workflow(w) => w.name.clone(),
                _ => item.target.clone(),
            };
            let name = format!("{what}[{}]", item.index);
            let Some(child) = by_index.get(&item.index) else {
                return Case {
                    classname: format!("unplaced.{suite}"),
                    name,
                    time_s: 0.0,
                    outcome: Outcome::Skipped { message: "never ran: no run was created for this item".into() },
                    errored_attempts: Vec::new(),
                    system_out: None,
                };
            };
            let error = child.error.as_ref().map(|e| kind_message(&e.0));
            Case {
                classname: format!("{}.{suite}", child.serial.as_deref().unwrap_or("unplaced")),
                name,
                time_s: seconds(child.started_at, child.finished_at),
                outcome: Outcome::of_run(
                    child.status,
                    child.result.as_ref(),
                    error.as_ref().map(|(k, m)| (k.as_str(), *m)),
                ),
                errored_attempts: errored.remove(&child.id).unwrap_or_default().iter().map(attempt).collect(),
                system_out: None,
            }
        })
        .collect())
}

/// The errors of the attempts of `runs` that ended and were retried, by run, oldest
/// first (from their `run.requeued` events; a hand-back is not an error).
async fn errored_attempts(pool: &PgPool, runs: &[RunId]) -> CoreResult<HashMap<RunId, Vec<RunError>>> {
    let rows = sqlx::query!(
        r#"SELECT run_id AS "run_id!: RunId", data -> 'error' AS error FROM events
           WHERE run_id = ANY ($1) AND type = 'run.requeued' AND data ->> 'reason' <> 'handed_back'
           ORDER BY id"#,
        runs as &[RunId]
    )
    .fetch_all(pool)
    .await?;
    let mut out: HashMap<RunId, Vec<RunError>> = HashMap::new();
    for r in rows {
        if let Some(e) = r.error.and_then(|e| serde_json::from_value(e).ok()) {
            out.entry(r.run_id).or_default().push(e);
        }
    }
    Ok(out)
}

/// The newest capture of each step, its newest `EXCERPT_BYTES` (from a whole line).
async fn excerpts(pool: &PgPool, run: RunId) -> CoreResult<HashMap<i32, String>> {
    let rows = sqlx::query!(
        r#"SELECT DISTINCT ON (step_index) step_index, name, data FROM run_captures
           WHERE run_id = $1 ORDER BY step_index, created_at DESC"#,
        run as RunId
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let text = String::from_utf8_lossy(&r.data);
            let mut cut = text.len().saturating_sub(EXCERPT_BYTES);
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            let tail = &text[cut..];
            let tail = if cut > 0 { tail.find('\n').map_or(tail, |i| &tail[i + 1..]) } else { tail };
            (r.step_index, format!("[{}]\n{tail}", r.name))
        })
        .collect())
}

fn attempt(e: &RunError) -> ErroredAttempt {
    ErroredAttempt { kind: kind_message(e).0, message: e.message.clone() }
}

/// An error's kind as written on the wire (`device_unreachable`), and its message.
fn kind_message(e: &RunError) -> (String, &str) {
    let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    (kind, e.message.as_str())
}

fn seconds(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> f64 {
    match (from, to) {
        (Some(f), Some(t)) if t >= f => (t - f).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    }
}
