//! The `workflows` table: ordered steps validated against the module catalog.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreError, CoreResult, catalog,
    definition::WorkflowStep,
    error::FieldErrors,
    ids::WorkflowId,
    pagination::{Cursor, Page},
};

/// A workflow definition.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Workflow {
    /// Its id.
    pub id: WorkflowId,
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its steps, in order.
    pub steps: Vec<WorkflowStep>,
    /// Grows with each edit (runs snapshot the version they started from).
    pub version: i32,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

struct WorkflowRow {
    id: WorkflowId,
    name: String,
    description: String,
    steps: Json<Vec<WorkflowStep>>,
    version: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<WorkflowRow> for Workflow {
    fn from(r: WorkflowRow) -> Workflow {
        Workflow {
            id: r.id,
            name: r.name,
            description: r.description,
            steps: r.steps.0,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Most steps a workflow may have.
pub const MAX_STEPS: usize = 100;

/// A workflow as written by a client (POST or PUT), validated.
#[derive(Debug, Clone)]
pub struct WorkflowInput {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its steps (1 to `MAX_STEPS`).
    pub steps: Vec<WorkflowStep>,
}

/// Validates one step against the catalog; errors name `{path}.field`.
pub fn check_step(
    path: &str,
    module: &str,
    params: Option<&Value>,
    timeout_s: Option<i64>,
    continue_on_failure: bool,
) -> Result<WorkflowStep, FieldErrors> {
    let Some(spec) = catalog::find(module) else {
        let known: Vec<&str> = catalog::builtin().iter().map(|m| m.id).collect();
        let problem = format!("unknown module {module:?} (expected one of {})", known.join(", "));
        return Err(FieldErrors::from([(format!("{path}.module"), problem)]));
    };
    let mut errors = FieldErrors::new();
    let params = catalog::validate_params(spec, params, &format!("{path}.params")).map_err(|e| errors.extend(e)).ok();
    let timeout_s = match timeout_s {
        None => None,
        Some(n) if (1..=86_400).contains(&n) => Some(n as i32),
        Some(_) => {
            errors.insert(format!("{path}.timeout_s"), "must be an integer between 1 and 86400".into());
            None
        }
    };
    match params {
        Some(params) if errors.is_empty() => {
            Ok(WorkflowStep { module: spec.id.to_string(), params, timeout_s, continue_on_failure })
        }
        _ => Err(errors),
    }
}

/// The steps with a run's shared `params` applied: each goes to every step whose
/// module takes it, unless the step set its own value (a module default does not
/// count); every step is validated again. A parameter no step takes is an error
/// (`{path}.name`), as are values a step's module refuses.
pub fn apply_params(
    steps: &[WorkflowStep],
    shared: &Map<String, Value>,
    path: &str,
) -> Result<Vec<WorkflowStep>, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut out = steps.to_vec();
    if shared.is_empty() {
        return Ok(out);
    }
    let mut used = std::collections::BTreeSet::new();
    for (i, step) in out.iter_mut().enumerate() {
        let Some(module) = catalog::find(&step.module) else { continue };
        let Some(mut merged) = step.params.as_object().cloned() else {
            errors.insert(format!("{path} (steps[{i}])"), "the step's stored params are not an object".into());
            continue;
        };
        for (key, value) in shared {
            let Some(schema) = module.params_schema["properties"].get(key) else { continue };
            used.insert(key.clone());
            let own = steps[i].params.get(key);
            if own.is_none() || own == schema.get("default") {
                merged.insert(key.clone(), value.clone());
            }
        }
        match catalog::validate_params(module, Some(&Value::Object(merged)), &format!("{path} (steps[{i}])")) {
            Ok(p) => step.params = p,
            Err(e) => errors.extend(e),
        }
    }
    for key in shared.keys().filter(|k| !used.contains(*k)) {
        errors.insert(format!("{path}.{key}"), "no step of this workflow takes this parameter".into());
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Creates a workflow (409 when the name is taken).
pub async fn create(pool: &PgPool, w: &WorkflowInput) -> CoreResult<Workflow> {
    let row = sqlx::query_as!(
        WorkflowRow,
        "INSERT INTO workflows (id, name, description, steps) VALUES ($1, $2, $3, $4) RETURNING *",
        WorkflowId::random() as WorkflowId,
        w.name,
        w.description,
        Json(&w.steps) as _,
    )
    .fetch_one(pool)
    .await
    .map_err(|e| CoreError::name_taken(e, "workflow", &w.name))?;
    Ok(row.into())
}

/// One workflow.
pub async fn get(pool: &PgPool, id: WorkflowId) -> CoreResult<Workflow> {
    let mut conn = pool.acquire().await?;
    find(&mut conn, id).await?.ok_or_else(|| CoreError::not_found(format!("workflow {id}")))
}

/// One workflow, on the caller's connection.
pub async fn find(conn: &mut PgConnection, id: WorkflowId) -> CoreResult<Option<Workflow>> {
    let row = sqlx::query_as!(WorkflowRow, "SELECT * FROM workflows WHERE id = $1", id as WorkflowId)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(Workflow::from))
}

/// Workflows newest first, one page.
pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Workflow>> {
    let rows = sqlx::query_as!(
        WorkflowRow,
        "SELECT * FROM workflows WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(Workflow::from).collect();
    Ok(Page::from_rows(items, limit, |w: &Workflow| Cursor { created_at: w.created_at, id: w.id.0 }))
}

/// Replaces the definition and bumps its version. Runs already started keep their
/// snapshot.
pub async fn update(pool: &PgPool, id: WorkflowId, w: &WorkflowInput) -> CoreResult<Workflow> {
    let row = sqlx::query_as!(
        WorkflowRow,
        "UPDATE workflows SET name = $2, description = $3, steps = $4, version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING *",
        id as WorkflowId,
        w.name,
        w.description,
        Json(&w.steps) as _,
    )
    .fetch_optional(pool)
    .await
    .map_err(|e| CoreError::name_taken(e, "workflow", &w.name))?
    .ok_or_else(|| CoreError::not_found(format!("workflow {id}")))?;
    Ok(row.into())
}

/// Locks a workflow `FOR SHARE` until the caller's transaction ends (so a concurrent
/// delete waits, then sees the campaign or schedule that names it); whether it exists.
pub async fn lock_shared(conn: &mut PgConnection, id: WorkflowId) -> CoreResult<bool> {
    let found = sqlx::query_scalar!("SELECT id FROM workflows WHERE id = $1 FOR SHARE", id as WorkflowId)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Deletes a workflow no campaign or schedule uses (409 naming the users otherwise).
pub async fn delete(pool: &PgPool, id: WorkflowId) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let exists = sqlx::query_scalar!("SELECT id FROM workflows WHERE id = $1 FOR UPDATE", id as WorkflowId)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(CoreError::not_found(format!("workflow {id}")));
    }
    let campaigns =
        sqlx::query_scalar!("SELECT name FROM campaigns WHERE items @> $1 ORDER BY name", json!([{"workflow_id": id}]))
            .fetch_all(&mut *tx)
            .await?;
    let schedules = sqlx::query_scalar!(
        "SELECT name FROM schedules WHERE target @> $1 ORDER BY name",
        json!({"kind": "workflow", "id": id})
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut users = Vec::new();
    if !campaigns.is_empty() {
        users.push(format!("campaigns {}", campaigns.join(", ")));
    }
    if !schedules.is_empty() {
        users.push(format!("schedules {}", schedules.join(", ")));
    }
    if !users.is_empty() {
        return Err(CoreError::Conflict(format!("workflow {id} is used by {}", users.join(" and "))));
    }
    sqlx::query!("DELETE FROM workflows WHERE id = $1", id as WorkflowId).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_validated_with_their_index_named() {
        let ok = check_step("steps[1]", "ping", Some(&json!({"count": 2})), None, true).unwrap();
        assert_eq!(ok.params["count"], 2);
        assert_eq!(ok.params["host"], "8.8.8.8");
        let e = check_step("steps[1]", "teleport", None, None, false).unwrap_err();
        assert!(e["steps[1].module"].starts_with("unknown module"));
        let e = check_step("steps[2]", "sleep", Some(&json!({})), Some(0), false).unwrap_err();
        assert_eq!(e["steps[2].params.ms"], "is required");
        assert!(e.contains_key("steps[2].timeout_s"));
    }

    #[test]
    fn shared_params_fill_steps_that_take_them() {
        let steps = vec![
            check_step("s", "ping", None, None, false).unwrap(),
            check_step("s", "ping", Some(&json!({"host": "9.9.9.9"})), None, false).unwrap(),
            check_step("s", "sleep", Some(&json!({"ms": 1})), None, false).unwrap(),
        ];
        let shared = json!({"host": "1.1.1.1"}).as_object().cloned().unwrap();
        let out = apply_params(&steps, &shared, "params").unwrap();
        assert_eq!(out[0].params["host"], "1.1.1.1", "a default is overridden");
        assert_eq!(out[1].params["host"], "9.9.9.9", "a step's own value wins");
        let bad = json!({"colour": 1}).as_object().cloned().unwrap();
        assert!(apply_params(&steps, &bad, "target.params").unwrap_err().contains_key("target.params.colour"));
    }
}
