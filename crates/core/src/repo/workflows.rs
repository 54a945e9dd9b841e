//! The `workflows` table: ordered steps validated against the module catalog.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    CoreError, CoreResult, catalog,
    error::FieldErrors,
    input::Fields,
    pagination::{Cursor, Page},
};

/// One step of a workflow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkflowStep {
    pub module: String,
    pub params: Value,
    #[serde(default)]
    pub timeout_s: Option<i32>,
    #[serde(default)]
    pub continue_on_failure: bool,
}

impl WorkflowStep {
    /// The step's time budget: its own, or its module's default.
    pub fn effective_timeout_s(&self) -> i32 {
        self.timeout_s.unwrap_or_else(|| catalog::find(&self.module).map(|m| m.default_timeout_s).unwrap_or(60))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workflow {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub steps: Vec<WorkflowStep>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub const MAX_STEPS: usize = 100;

/// A workflow as written by a client (POST or PUT), validated.
#[derive(Debug, Clone)]
pub struct WorkflowInput {
    pub name: String,
    pub description: String,
    pub steps: Vec<WorkflowStep>,
}

impl WorkflowInput {
    pub fn parse(body: &Value) -> CoreResult<WorkflowInput> {
        let mut f = Fields::new(body, &["name", "description", "steps"])?;
        let name = f.string("name", 200);
        let description = f.opt_string("description", 2000).unwrap_or_default();
        let steps = match f.raw("steps") {
            None => {
                f.errors.insert("steps".into(), "is required: a non-empty array of {module, params?, timeout_s?, continue_on_failure?}".into());
                None
            }
            Some(v) => match parse_steps(v) {
                Ok(s) => Some(s),
                Err(errors) => {
                    f.errors.extend(errors);
                    None
                }
            },
        };
        f.finish()?;
        Ok(WorkflowInput { name: name.expect("checked"), description, steps: steps.expect("checked") })
    }
}

/// Validates steps against the catalog; errors name `steps[i].field`.
pub fn parse_steps(value: &Value) -> Result<Vec<WorkflowStep>, FieldErrors> {
    let mut errors = FieldErrors::new();
    let Some(items) = value.as_array() else {
        errors.insert("steps".into(), "must be an array".into());
        return Err(errors);
    };
    if items.is_empty() || items.len() > MAX_STEPS {
        errors.insert("steps".into(), format!("must hold 1 to {MAX_STEPS} steps (got {})", items.len()));
        return Err(errors);
    }
    let mut steps = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("steps[{i}]");
        let Some(obj) = item.as_object() else {
            errors.insert(path, "must be an object {module, params?, timeout_s?, continue_on_failure?}".into());
            continue;
        };
        for key in obj.keys() {
            if !matches!(key.as_str(), "module" | "params" | "timeout_s" | "continue_on_failure") {
                errors.insert(format!("{path}.{key}"), "unknown field (expected module, params, timeout_s or continue_on_failure)".into());
            }
        }
        let module = match obj.get("module").and_then(Value::as_str) {
            None => {
                errors.insert(format!("{path}.module"), "is required".into());
                continue;
            }
            Some(m) => match catalog::find(m) {
                Some(spec) => spec,
                None => {
                    let known: Vec<&str> = catalog::builtin().iter().map(|m| m.id).collect();
                    errors.insert(format!("{path}.module"), format!("unknown module {m:?} (expected one of {})", known.join(", ")));
                    continue;
                }
            },
        };
        let params = match catalog::validate_params(module, obj.get("params"), &format!("{path}.params")) {
            Ok(p) => p,
            Err(CoreError::Validation { fields, .. }) => {
                errors.extend(fields);
                continue;
            }
            Err(e) => {
                errors.insert(format!("{path}.params"), e.to_string());
                continue;
            }
        };
        let timeout_s = match obj.get("timeout_s") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) if (1..=86_400).contains(&n) => Some(n as i32),
                _ => {
                    errors.insert(format!("{path}.timeout_s"), "must be an integer between 1 and 86400".into());
                    continue;
                }
            },
        };
        let continue_on_failure = match obj.get("continue_on_failure") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                errors.insert(format!("{path}.continue_on_failure"), "must be a boolean".into());
                continue;
            }
        };
        steps.push(WorkflowStep { module: module.id.to_string(), params, timeout_s, continue_on_failure });
    }
    if errors.is_empty() { Ok(steps) } else { Err(errors) }
}

fn from_row(r: &PgRow) -> Result<Workflow, sqlx::Error> {
    let steps: Value = r.try_get("steps")?;
    Ok(Workflow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        steps: serde_json::from_value(steps).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub async fn create(pool: &PgPool, w: &WorkflowInput) -> CoreResult<Workflow> {
    let row = sqlx::query(
        "INSERT INTO workflows (id, name, description, steps) VALUES ($1, $2, $3, $4)
         RETURNING id, name, description, steps, version, created_at, updated_at",
    )
    .bind(Uuid::new_v4())
    .bind(&w.name)
    .bind(&w.description)
    .bind(json!(w.steps))
    .fetch_one(pool)
    .await
    .map_err(|e| CoreError::name_taken(e, "workflow", &w.name))?;
    Ok(from_row(&row)?)
}

pub async fn get(pool: &PgPool, id: Uuid) -> CoreResult<Workflow> {
    let row = sqlx::query("SELECT id, name, description, steps, version, created_at, updated_at FROM workflows WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("workflow {id}")))?;
    Ok(from_row(&row)?)
}

pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Workflow>> {
    let rows = sqlx::query(
        "SELECT id, name, description, steps, version, created_at, updated_at FROM workflows
         WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |w| Cursor { created_at: w.created_at, id: w.id }))
}

/// Replaces the definition and bumps its version. Runs already started keep their
/// snapshot.
pub async fn update(pool: &PgPool, id: Uuid, w: &WorkflowInput) -> CoreResult<Workflow> {
    let row = sqlx::query(
        "UPDATE workflows SET name = $2, description = $3, steps = $4, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING id, name, description, steps, version, created_at, updated_at",
    )
    .bind(id)
    .bind(&w.name)
    .bind(&w.description)
    .bind(json!(w.steps))
    .fetch_optional(pool)
    .await
    .map_err(|e| CoreError::name_taken(e, "workflow", &w.name))?
    .ok_or_else(|| CoreError::not_found(format!("workflow {id}")))?;
    Ok(from_row(&row)?)
}

/// Deletes a workflow no campaign or schedule uses (409 naming the users otherwise).
pub async fn delete(pool: &PgPool, id: Uuid) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM workflows WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
    if exists.is_none() {
        return Err(CoreError::not_found(format!("workflow {id}")));
    }
    let campaigns: Vec<String> = sqlx::query_scalar("SELECT name FROM campaigns WHERE items @> $1 ORDER BY name")
        .bind(json!([{"workflow_id": id}]))
        .fetch_all(&mut *tx)
        .await?;
    let schedules: Vec<String> = sqlx::query_scalar("SELECT name FROM schedules WHERE target @> $1 ORDER BY name")
        .bind(json!({"kind": "workflow", "id": id}))
        .fetch_all(&mut *tx)
        .await?;
    if !campaigns.is_empty() || !schedules.is_empty() {
        let mut users = Vec::new();
        if !campaigns.is_empty() {
            users.push(format!("campaigns {}", campaigns.join(", ")));
        }
        if !schedules.is_empty() {
            users.push(format!("schedules {}", schedules.join(", ")));
        }
        return Err(CoreError::Conflict(format!("workflow {id} is used by {}", users.join(" and "))));
    }
    sqlx::query("DELETE FROM workflows WHERE id = $1").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_validated_with_their_index_named() {
        let ok = parse_steps(&json!([{"module": "device_info"}, {"module": "ping", "params": {"count": 2}, "continue_on_failure": true}])).unwrap();
        assert_eq!(ok[1].params["count"], 2);
        assert_eq!(ok[1].params["host"], "8.8.8.8");
        assert!(ok[1].continue_on_failure);
        let e = parse_steps(&json!([{"module": "ping"}, {"module": "teleport"}, {"module": "sleep", "params": {}}])).unwrap_err();
        assert!(e["steps[1].module"].starts_with("unknown module"));
        assert_eq!(e["steps[2].params.ms"], "is required");
        assert!(parse_steps(&json!([])).is_err());
    }
}
