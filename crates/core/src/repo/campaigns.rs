//! The `campaigns` table: campaign definitions. Campaign runs: `repo::campaign_runs`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreError, CoreResult,
    definition::{CampaignItem, ItemAction},
    error::FieldErrors,
    ids::CampaignId,
    pagination::{Cursor, Page},
    repo::{devices, workflows},
};

/// A campaign definition.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Campaign {
    /// Its id.
    pub id: CampaignId,
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// What it runs, in order.
    pub items: Vec<CampaignItem>,
    /// Stop admitting children after the first failure.
    pub stop_on_failure: bool,
    /// Most children running at once.
    pub max_parallel: i32,
    /// Grows with each edit.
    pub version: i32,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

struct CampaignRow {
    id: CampaignId,
    name: String,
    description: String,
    items: Json<Vec<CampaignItem>>,
    stop_on_failure: bool,
    max_parallel: i32,
    version: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<CampaignRow> for Campaign {
    fn from(r: CampaignRow) -> Campaign {
        Campaign {
            id: r.id,
            name: r.name,
            description: r.description,
            items: r.items.0,
            stop_on_failure: r.stop_on_failure,
            max_parallel: r.max_parallel,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Most items a campaign may have.
pub const MAX_ITEMS: usize = 1000;
/// `max_parallel` when a campaign does not say.
pub const DEFAULT_MAX_PARALLEL: i32 = 10;

/// A campaign as written by a client, validated (references checked by `check_refs`).
#[derive(Debug, Clone)]
pub struct CampaignInput {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its items (1 to `MAX_ITEMS`).
    pub items: Vec<CampaignItem>,
    /// Stop admitting children after the first failure.
    pub stop_on_failure: bool,
    /// Most children running at once.
    pub max_parallel: i32,
}

/// Every item must name an existing workflow (its row locked `FOR SHARE` until the
/// caller's transaction ends, so a concurrent delete waits and then sees this
/// campaign) and devices that exist, as a run's selector must: 422 naming the item.
pub async fn check_refs(conn: &mut PgConnection, items: &[CampaignItem]) -> CoreResult<()> {
    let mut errors = FieldErrors::new();
    for (i, item) in items.iter().enumerate() {
        if let ItemAction::Workflow { workflow_id } = item.action
            && !workflows::lock_shared(conn, workflow_id).await?
        {
            errors.insert(format!("items[{i}].workflow_id"), format!("no workflow {workflow_id}"));
        }
        if !devices::any_matching(conn, &item.device).await? {
            errors.insert(format!("items[{i}].device"), "no registered device matches this selector".into());
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(CoreError::invalid_fields(errors)) }
}

/// Creates a campaign (409 when the name is taken).
pub async fn create(pool: &PgPool, c: &CampaignInput) -> CoreResult<Campaign> {
    let mut tx = pool.begin().await?;
    check_refs(&mut tx, &c.items).await?;
    let row = sqlx::query_as!(
        CampaignRow,
        "INSERT INTO campaigns (id, name, description, items, stop_on_failure, max_parallel)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        CampaignId::random() as CampaignId,
        c.name,
        c.description,
        Json(&c.items) as _,
        c.stop_on_failure,
        c.max_parallel,
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "campaign", &c.name))?;
    tx.commit().await?;
    Ok(row.into())
}

/// One campaign.
pub async fn get(pool: &PgPool, id: CampaignId) -> CoreResult<Campaign> {
    let mut conn = pool.acquire().await?;
    find(&mut conn, id).await?.ok_or_else(|| CoreError::not_found(format!("campaign {id}")))
}

/// One campaign, on the caller's connection.
pub async fn find(conn: &mut PgConnection, id: CampaignId) -> CoreResult<Option<Campaign>> {
    let row = sqlx::query_as!(CampaignRow, "SELECT * FROM campaigns WHERE id = $1", id as CampaignId)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(Campaign::from))
}

/// Locks a campaign `FOR SHARE` until the caller's transaction ends (so a concurrent
/// delete waits, then sees the schedule that names it); whether it exists.
pub async fn lock_shared(conn: &mut PgConnection, id: CampaignId) -> CoreResult<bool> {
    let found = sqlx::query_scalar!("SELECT id FROM campaigns WHERE id = $1 FOR SHARE", id as CampaignId)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.is_some())
}

/// Campaigns newest first, one page.
pub async fn list(pool: &PgPool, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Campaign>> {
    let rows = sqlx::query_as!(
        CampaignRow,
        "SELECT * FROM campaigns WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
         ORDER BY created_at DESC, id DESC LIMIT $3",
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(Campaign::from).collect();
    Ok(Page::from_rows(items, limit, |c: &Campaign| Cursor { created_at: c.created_at, id: c.id.0 }))
}

/// Replaces a campaign's definition and bumps its version.
pub async fn update(pool: &PgPool, id: CampaignId, c: &CampaignInput) -> CoreResult<Campaign> {
    let mut tx = pool.begin().await?;
    check_refs(&mut tx, &c.items).await?;
    let row = sqlx::query_as!(
        CampaignRow,
        "UPDATE campaigns SET name = $2, description = $3, items = $4, stop_on_failure = $5, max_parallel = $6,
            version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING *",
        id as CampaignId,
        c.name,
        c.description,
        Json(&c.items) as _,
        c.stop_on_failure,
        c.max_parallel,
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| CoreError::name_taken(e, "campaign", &c.name))?
    .ok_or_else(|| CoreError::not_found(format!("campaign {id}")))?;
    tx.commit().await?;
    Ok(row.into())
}

/// Deletes a campaign no schedule targets (409 otherwise).
pub async fn delete(pool: &PgPool, id: CampaignId) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let exists = sqlx::query_scalar!("SELECT id FROM campaigns WHERE id = $1 FOR UPDATE", id as CampaignId)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(CoreError::not_found(format!("campaign {id}")));
    }
    let schedules = sqlx::query_scalar!(
        "SELECT name FROM schedules WHERE target @> $1 ORDER BY name",
        json!({"kind": "campaign", "id": id})
    )
    .fetch_all(&mut *tx)
    .await?;
    if !schedules.is_empty() {
        return Err(CoreError::Conflict(format!("campaign {id} is used by schedules {}", schedules.join(", "))));
    }
    sqlx::query!("DELETE FROM campaigns WHERE id = $1", id as CampaignId).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}
