//! The `campaigns` table, and campaign runs: a parent run that fans out child runs,
//! admits at most `max_parallel` of them at a time (children wait `held`, which makes
//! them unclaimable, until admitted), stops on the first failure when asked, and ends
//! when every child has.
//!
//! `advance` is the one place that moves a campaign forward. It locks the parent row,
//! so concurrent callers (workers finishing children, the API, every reconciler) are
//! serialized, and it is idempotent, so calling it again after a crash repairs
//! whatever a dead process left half done.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    CoreError, CoreResult, catalog,
    error::FieldErrors,
    input::Fields,
    model::{Run, RunKind, RunStatus, Trigger, event_types},
    pagination::{Cursor, Page},
    repo::{
        events::{self, Subject},
        runs::{self, NewRun},
        workflows,
    },
    selector::Selector,
};

/// One item of a campaign: a workflow or a module, and the devices it may use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
    pub device: Selector,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Campaign {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub items: Vec<CampaignItem>,
    pub stop_on_failure: bool,
    pub max_parallel: i32,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub const MAX_ITEMS: usize = 1000;
pub const DEFAULT_MAX_PARALLEL: i32 = 10;
/// Campaign runs have no time budget of their own (their children do); the column
/// still needs a value.
const CAMPAIGN_TIMEOUT_S: i32 = 7 * 86_400;

/// A campaign as written by a client, validated (workflow ids checked by `check_refs`).
#[derive(Debug, Clone)]
pub struct CampaignInput {
    pub name: String,
    pub description: String,
    pub items: Vec<CampaignItem>,
    pub stop_on_failure: bool,
    pub max_parallel: i32,
}

impl CampaignInput {
    pub fn parse(body: &Value) -> CoreResult<CampaignInput> {
        let mut f = Fields::new(body, &["name", "description", "items", "stop_on_failure", "max_parallel"])?;
        let name = f.string("name", 200);
        let description = f.opt_string("description", 2000).unwrap_or_default();
        let stop_on_failure = f.opt_bool("stop_on_failure").unwrap_or(false);
        let max_parallel = f.opt_int("max_parallel", 1, 1000).map(|n| n as i32).unwrap_or(DEFAULT_MAX_PARALLEL);
        let items = match f.raw("items") {
            None => {
                f.errors.insert("items".into(), "is required: a non-empty array of {workflow_id | module + params, device}".into());
                None
            }
            Some(v) => match parse_items(v) {
                Ok(items) => Some(items),
                Err(errors) => {
                    f.errors.extend(errors);
                    None
                }
            },
        };
        f.finish()?;
        Ok(CampaignInput { name: name.expect("checked"), description, items: items.expect("checked"), stop_on_failure, max_parallel })
    }
}

fn parse_items(value: &Value) -> Result<Vec<CampaignItem>, FieldErrors> {
    let mut errors = FieldErrors::new();
    let Some(list) = value.as_array() else {
        errors.insert("items".into(), "must be an array".into());
        return Err(errors);
    };
    if list.is_empty() || list.len() > MAX_ITEMS {
        errors.insert("items".into(), format!("must hold 1 to {MAX_ITEMS} items (got {})", list.len()));
        return Err(errors);
    }
    let mut items = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let path = format!("items[{i}]");
        let Some(obj) = item.as_object() else {
            errors.insert(path, "must be an object".into());
            continue;
        };
        for key in obj.keys() {
            if !matches!(key.as_str(), "workflow_id" | "module" | "params" | "device") {
                errors.insert(format!("{path}.{key}"), "unknown field (expected workflow_id, module, params or device)".into());
            }
        }
        let device = match obj.get("device") {
            None => {
                errors.insert(format!("{path}.device"), "is required".into());
                None
            }
            Some(v) => match Selector::parse(&format!("{path}.device"), v) {
                Ok(s) => Some(s),
                Err(CoreError::Validation { fields, .. }) => {
                    errors.extend(fields);
                    None
                }
                Err(e) => {
                    errors.insert(format!("{path}.device"), e.to_string());
                    None
                }
            },
        };
        let parsed = match (obj.get("workflow_id"), obj.get("module")) {
            (Some(_), Some(_)) => {
                errors.insert(path.clone(), "give either workflow_id or module, not both".into());
                None
            }
            (None, None) => {
                errors.insert(path.clone(), "needs a workflow_id or a module".into());
                None
            }
            (Some(w), None) => {
                if obj.contains_key("params") {
                    errors.insert(format!("{path}.params"), "only module items take params".into());
                }
                match w.as_str().and_then(|s| Uuid::parse_str(s).ok()) {
                    Some(id) => Some((Some(id), None, None)),
                    None => {
                        errors.insert(format!("{path}.workflow_id"), "must be a UUID".into());
                        None
                    }
                }
            }
            (None, Some(m)) => match m.as_str().and_then(catalog::find) {
                None => {
                    errors.insert(format!("{path}.module"), format!("unknown module {m}"));
                    None
                }
                Some(spec) => match catalog::validate_params(spec, obj.get("params"), &format!("{path}.params")) {
                    Ok(p) => Some((None, Some(spec.id.to_string()), Some(p))),
                    Err(CoreError::Validation { fields, .. }) => {
                        errors.extend(fields);
                        None
                    }
                    Err(e) => {
                        errors.insert(format!("{path}.params"), e.to_string());
                        None
                    }
                },
            },
        };
        if let (Some((workflow_id, module, params)), Some(device)) = (parsed, device) {
            items.push(CampaignItem { workflow_id, module, params, device });
        }
    }
    if errors.is_empty() { Ok(items) } else { Err(errors) }
}

/// Every `workflow_id` must name an existing workflow (422 naming the item). The rows
/// are locked `FOR SHARE` until the caller's transaction ends, so a concurrent delete
/// of a workflow waits and then sees this campaign (409) instead of racing past it.
pub async fn check_refs(conn: &mut PgConnection, items: &[CampaignItem]) -> CoreResult<()> {
    let mut errors = FieldErrors::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(id) = item.workflow_id {
            let exists: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM workflows WHERE id = $1 FOR SHARE").bind(id).fetch_optional(&mut *conn).await?;
            if exists.is_none() {
                errors.insert(format!("items[{i}].workflow_id"), format!("no workflow {id}"));
            }
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(CoreError::invalid_fields(errors)) }
}

fn from_row(r: &PgRow) -> Result<Campaign, sqlx::Error> {
    let items: Value = r.try_get("items")?;
    Ok(Campaign {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        items: serde_json::from_value(items).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        stop_on_failure: r.try_get("stop_on_failure")?,
        max_parallel: r.try_get("max_parallel")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub async fn create(pool: &PgPool, c: &CampaignInput) -> CoreResult<Campaign> {
    let mut tx = pool.begin().await?;
    check_refs(&mut tx, &c.items).await?;
    let row = sqlx::query(
        "INSERT INTO campaigns (id, name, description, items, stop_on_failure, max_parallel) VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, name, description, items, stop_on_failure, max_parallel, version, created_at, updated_at",
    )
    .bind(Uuid::new_v4())
    .bind(&c.name)
    .bind(&c.description)
    .bind(json!(c.items))
    .bind(c.stop_on_failure)
    .bind(c.max_parallel)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "campaign", &c.name))?;
    tx.commit().await?;
    Ok(from_row(&row)?)
}

pub async fn get(pool: &PgPool, id: Uuid) -> CoreResult<Campaign> {
    let row = sqlx::query("SELECT id, name, description, items, stop_on_failure, max_parallel, version, created_at, updated_at FROM campaigns WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("campaign {id}")))?;
    Ok(from_row(&row)?)
}

pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Campaign>> {
    let rows = sqlx::query(
        "SELECT id, name, description, items, stop_on_failure, max_parallel, version, created_at, updated_at FROM campaigns
         WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |c| Cursor { created_at: c.created_at, id: c.id }))
}

pub async fn update(pool: &PgPool, id: Uuid, c: &CampaignInput) -> CoreResult<Campaign> {
    let mut tx = pool.begin().await?;
    check_refs(&mut tx, &c.items).await?;
    let row = sqlx::query(
        "UPDATE campaigns SET name = $2, description = $3, items = $4, stop_on_failure = $5, max_parallel = $6,
            version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING id, name, description, items, stop_on_failure, max_parallel, version, created_at, updated_at",
    )
    .bind(id)
    .bind(&c.name)
    .bind(&c.description)
    .bind(json!(c.items))
    .bind(c.stop_on_failure)
    .bind(c.max_parallel)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "campaign", &c.name))?
    .ok_or_else(|| CoreError::not_found(format!("campaign {id}")))?;
    tx.commit().await?;
    Ok(from_row(&row)?)
}

/// Deletes a campaign no schedule targets (409 otherwise).
pub async fn delete(pool: &PgPool, id: Uuid) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM campaigns WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
    if exists.is_none() {
        return Err(CoreError::not_found(format!("campaign {id}")));
    }
    let schedules: Vec<String> = sqlx::query_scalar("SELECT name FROM schedules WHERE target @> $1 ORDER BY name")
        .bind(json!({"kind": "campaign", "id": id}))
        .fetch_all(&mut *tx)
        .await?;
    if !schedules.is_empty() {
        return Err(CoreError::Conflict(format!("campaign {id} is used by schedules {}", schedules.join(", "))));
    }
    sqlx::query("DELETE FROM campaigns WHERE id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// What one child of a campaign run executes: a snapshot, so editing the campaign or
/// its workflows never changes a run already started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub index: i32,
    pub kind: RunKind,
    pub target: String,
    pub definition: Value,
    pub params: Value,
    pub selector: Selector,
    pub timeout_s: i32,
    pub max_attempts: i32,
}

/// Snapshots a campaign's items as child specs (workflows at their current version).
pub async fn snapshot(pool: &PgPool, c: &Campaign) -> CoreResult<Vec<ChildSpec>> {
    let mut specs = Vec::with_capacity(c.items.len());
    for (i, item) in c.items.iter().enumerate() {
        let spec = match (&item.workflow_id, &item.module) {
            (Some(wid), _) => {
                let w = workflows::get(pool, *wid).await.map_err(|e| match e {
                    CoreError::NotFound { .. } => CoreError::invalid(format!("items[{i}].workflow_id"), "the workflow no longer exists"),
                    other => other,
                })?;
                workflow_child(i as i32, &w, &item.device, json!({}))
            }
            (None, Some(module)) => {
                let m = catalog::find(module).ok_or_else(|| CoreError::invalid(format!("items[{i}].module"), "unknown module"))?;
                let params = item.params.clone().unwrap_or_else(|| json!({}));
                ChildSpec {
                    index: i as i32,
                    kind: RunKind::Module,
                    target: m.id.to_string(),
                    definition: json!({"module": m.id, "params": params, "timeout_s": m.default_timeout_s}),
                    params,
                    selector: item.device.clone(),
                    timeout_s: m.default_timeout_s,
                    max_attempts: m.max_attempts,
                }
            }
            (None, None) => return Err(CoreError::invalid(format!("items[{i}]"), "needs a workflow_id or a module")),
        };
        specs.push(spec);
    }
    Ok(specs)
}

/// The child spec (and run snapshot) of a workflow on `device`.
pub fn workflow_child(index: i32, w: &workflows::Workflow, device: &Selector, params: Value) -> ChildSpec {
    let timeout: i64 = w.steps.iter().map(|s| s.effective_timeout_s() as i64).sum();
    ChildSpec {
        index,
        kind: RunKind::Workflow,
        target: w.id.to_string(),
        definition: json!({"workflow_id": w.id, "name": w.name, "version": w.version, "steps": w.steps}),
        params,
        selector: device.clone(),
        timeout_s: timeout.clamp(1, 86_400) as i32,
        max_attempts: 3,
    }
}

/// How a campaign run starts.
#[derive(Debug, Clone)]
pub struct CampaignStart {
    pub priority: i16,
    pub trigger: Trigger,
    pub schedule_id: Option<Uuid>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub retry_of: Option<Uuid>,
    pub idempotency_key: Option<String>,
}

/// Creates a campaign run and all its children (held) in one transaction, then admits
/// the first `max_parallel`. Returns the parent, whether it was created (an idempotency
/// key may return an earlier one), and the children to push.
pub async fn start_run(pool: &PgPool, header: &CampaignHeader, children: &[ChildSpec], start: &CampaignStart) -> CoreResult<(Run, bool, Advance)> {
    let mut tx = pool.begin().await?;
    let Some((id, advance)) = start_run_tx(&mut tx, header, children, start).await? else {
        tx.rollback().await.ok();
        let key = start.idempotency_key.as_deref().unwrap_or_default();
        let id: Uuid = sqlx::query_scalar("SELECT id FROM runs WHERE idempotency_key = $1").bind(key).fetch_one(pool).await?;
        return Ok((runs::get(pool, id).await?, false, Advance::default()));
    };
    tx.commit().await?;
    Ok((runs::get(pool, id).await?, true, advance))
}

/// What a campaign run snapshots of its campaign, besides the children.
#[derive(Debug, Clone)]
pub struct CampaignHeader {
    pub campaign_id: Uuid,
    pub name: String,
    pub version: i32,
    pub stop_on_failure: bool,
    pub max_parallel: i32,
}

impl From<&Campaign> for CampaignHeader {
    fn from(c: &Campaign) -> CampaignHeader {
        CampaignHeader { campaign_id: c.id, name: c.name.clone(), version: c.version, stop_on_failure: c.stop_on_failure, max_parallel: c.max_parallel }
    }
}

impl CampaignHeader {
    /// The header recorded in a campaign run's snapshot (for a retry).
    pub fn from_snapshot(campaign_id: Uuid, definition: &Value) -> CampaignHeader {
        CampaignHeader {
            campaign_id,
            name: definition["name"].as_str().unwrap_or_default().to_string(),
            version: definition["version"].as_i64().unwrap_or(1) as i32,
            stop_on_failure: definition["stop_on_failure"].as_bool().unwrap_or(false),
            max_parallel: definition["max_parallel"].as_i64().unwrap_or(DEFAULT_MAX_PARALLEL as i64) as i32,
        }
    }
}

/// `start_run` inside the caller's transaction (the scheduler's tick). `None` when the
/// idempotency key is taken.
pub async fn start_run_tx(
    tx: &mut PgConnection,
    header: &CampaignHeader,
    children: &[ChildSpec],
    start: &CampaignStart,
) -> CoreResult<Option<(Uuid, Advance)>> {
    let CampaignHeader { campaign_id, name, version, stop_on_failure, max_parallel } = header;
    let definition = json!({
        "campaign_id": campaign_id, "name": name, "version": version,
        "stop_on_failure": stop_on_failure, "max_parallel": max_parallel, "items": children,
    });
    let mut parent = NewRun::new(RunKind::Campaign, campaign_id.to_string(), definition, json!({}), None);
    parent.priority = start.priority;
    parent.trigger = start.trigger;
    parent.schedule_id = start.schedule_id;
    parent.scheduled_for = start.scheduled_for;
    parent.retry_of = start.retry_of;
    parent.idempotency_key = start.idempotency_key.clone();
    parent.timeout_s = CAMPAIGN_TIMEOUT_S;
    parent.max_attempts = 1;
    let Some(run) = runs::insert_tx(tx, &parent, RunStatus::Running).await? else { return Ok(None) };
    for child in children {
        let mut new = NewRun::new(child.kind, child.target.clone(), child.definition.clone(), child.params.clone(), Some(child.selector.clone()));
        new.priority = start.priority;
        new.timeout_s = child.timeout_s;
        new.max_attempts = child.max_attempts;
        new.trigger = start.trigger;
        new.schedule_id = start.schedule_id;
        new.scheduled_for = None; // the tick belongs to the campaign run
        new.parent_run_id = Some(run.id);
        new.parent_index = Some(child.index);
        new.held = true;
        runs::insert_tx(tx, &new, RunStatus::Queued).await?;
    }
    let advance = advance_tx(tx, run.id).await?;
    Ok(Some((run.id, advance)))
}

/// What `advance` decided: children to push (newly admitted) and running children to
/// signal (cancelled).
#[derive(Debug, Default, Clone)]
pub struct Advance {
    pub admit: Vec<Uuid>,
    pub signal: Vec<Uuid>,
    pub finished: Option<RunStatus>,
}

/// Moves a campaign run forward (see the module docs). Safe to call any time, from any
/// process, as often as wanted.
pub async fn advance(pool: &PgPool, parent: Uuid) -> CoreResult<Advance> {
    let mut tx = pool.begin().await?;
    let a = advance_tx(&mut tx, parent).await?;
    tx.commit().await?;
    Ok(a)
}

async fn advance_tx(tx: &mut PgConnection, parent: Uuid) -> CoreResult<Advance> {
    let mut out = Advance::default();
    let row = sqlx::query("SELECT status, cancel_requested, definition, started_at FROM runs WHERE id = $1 AND kind = 'campaign' FOR UPDATE")
        .bind(parent)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else { return Ok(out) };
    if row.try_get::<String, _>("status")? != "running" {
        return Ok(out);
    }
    let cancel_requested: bool = row.try_get("cancel_requested")?;
    let definition: Value = row.try_get("definition")?;
    let started_at: Option<DateTime<Utc>> = row.try_get("started_at")?;
    let stop_on_failure = definition["stop_on_failure"].as_bool().unwrap_or(false);
    let max_parallel = definition["max_parallel"].as_i64().unwrap_or(DEFAULT_MAX_PARALLEL as i64);

    // A failure is a child that ended failed, errored or timed out; a child still
    // being retried is `queued` and does not count.
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE parent_run_id = $1 AND status IN ('failed', 'errored', 'timed_out')",
    )
    .bind(parent)
    .fetch_one(&mut *tx)
    .await?;
    let stopping = cancel_requested || (stop_on_failure && failures > 0);
    if stopping {
        let (message, reason) = if cancel_requested {
            ("the campaign was cancelled", "campaign_cancelled")
        } else {
            ("not started: the campaign stopped at its first failure", "stop_on_failure")
        };
        let error = json!({"kind": "cancelled", "message": message, "reason": reason});
        let cancelled = sqlx::query(
            "UPDATE runs SET status = 'cancelled', held = false, paused = false, finished_at = clock_timestamp(), error = $2,
                not_before = NULL, updated_at = now()
             WHERE parent_run_id = $1 AND status = 'queued' RETURNING id, attempt",
        )
        .bind(parent)
        .bind(&error)
        .fetch_all(&mut *tx)
        .await?;
        for r in &cancelled {
            events::append(
                tx,
                event_types::RUN_FINISHED,
                Subject::run(r.try_get("id")?, None),
                json!({"status": "cancelled", "attempt": r.try_get::<i32, _>("attempt")?, "error": error}),
            )
            .await?;
        }
        if cancel_requested {
            out.signal = sqlx::query_scalar(
                "UPDATE runs SET cancel_requested = true, updated_at = now()
                 WHERE parent_run_id = $1 AND status = 'running' AND NOT cancel_requested RETURNING id",
            )
            .bind(parent)
            .fetch_all(&mut *tx)
            .await?;
        }
    } else {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE parent_run_id = $1 AND NOT held AND status IN ('queued', 'running')",
        )
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
        let free = (max_parallel - active).max(0);
        if free > 0 {
            out.admit = sqlx::query_scalar(
                // A materialized CTE: `WHERE id IN (SELECT .. LIMIT n FOR UPDATE)` may be
                // re-evaluated by the planner and update more than n rows.
                "WITH picked AS MATERIALIZED (
                    SELECT id FROM runs WHERE parent_run_id = $1 AND held AND status = 'queued'
                    ORDER BY parent_index LIMIT $2 FOR UPDATE)
                 UPDATE runs SET held = false, queued_at = clock_timestamp(), dispatched_at = now(), updated_at = now()
                 FROM picked WHERE runs.id = picked.id
                 RETURNING runs.id",
            )
            .bind(parent)
            .bind(free)
            .fetch_all(&mut *tx)
            .await?;
        }
    }

    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE parent_run_id = $1 AND status IN ('queued', 'running')")
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
    if open == 0 {
        let rows = sqlx::query("SELECT status, count(*) AS n FROM runs WHERE parent_run_id = $1 GROUP BY status")
            .bind(parent)
            .fetch_all(&mut *tx)
            .await?;
        let mut counts = serde_json::Map::new();
        let mut total = 0i64;
        let mut succeeded = 0i64;
        for r in &rows {
            let status: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            total += n;
            if status == "succeeded" {
                succeeded = n;
            }
            counts.insert(status, json!(n));
        }
        let status = if cancel_requested {
            RunStatus::Cancelled
        } else if succeeded == total {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        };
        let now = Utc::now();
        let duration_ms = started_at.map(|s| (now - s).num_milliseconds());
        let summary = json!({"total": total, "counts": counts, "duration_ms": duration_ms,
                             "stopped_on_failure": stop_on_failure && failures > 0 && !cancel_requested});
        sqlx::query(
            "UPDATE runs SET status = $2, result = $3, finished_at = clock_timestamp(), updated_at = now() WHERE id = $1",
        )
        .bind(parent)
        .bind(status.as_str())
        .bind(&summary)
        .execute(&mut *tx)
        .await?;
        events::append(
            tx,
            event_types::RUN_FINISHED,
            Subject::run(parent, None),
            json!({"status": status, "attempt": 1, "summary": summary}),
        )
        .await?;
        out.finished = Some(status);
    }
    Ok(out)
}

/// Campaign runs still running, oldest first (the reconciler advances each).
pub async fn running(pool: &PgPool, limit: i64) -> CoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar("SELECT id FROM runs WHERE kind = 'campaign' AND status = 'running' ORDER BY created_at LIMIT $1")
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_name_their_index() {
        let ok = parse_items(&json!([
            {"module": "ping", "params": {"count": 1}, "device": {"pool": "lab"}},
            {"workflow_id": Uuid::nil(), "device": {"serial": "x"}}
        ]))
        .unwrap();
        assert_eq!(ok[0].params.as_ref().unwrap()["count"], 1);
        let e = parse_items(&json!([
            {"module": "ping", "device": {}},
            {"module": "teleport", "device": {"pool": "p"}},
            {"workflow_id": "nope", "device": {"pool": "p"}},
            {"device": {"pool": "p"}}
        ]))
        .unwrap_err();
        assert!(e.contains_key("items[0].device"));
        assert!(e.contains_key("items[1].module"));
        assert!(e.contains_key("items[2].workflow_id"));
        assert!(e.contains_key("items[3]"));
    }
}
