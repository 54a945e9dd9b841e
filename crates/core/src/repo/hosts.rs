//! The `hosts` table: registration (with its per-host secret), heartbeats, liveness
//! and deletion of remote host agents.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool, types::Json};

use crate::{
    CoreError, CoreResult,
    events::{EventKind, Subject},
    ids::HostId,
    model::{Host, HostStatus},
    pagination::{Cursor, Page},
    repo::events,
};

/// A `hosts` row (the secret never leaves this module but through `Endpoint`).
struct HostRow {
    id: HostId,
    name: String,
    url: String,
    capabilities: Json<Vec<String>>,
    status: HostStatus,
    heartbeat_timeout_s: i32,
    last_heartbeat_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    secret: String,
    pool: String,
    status_reason: Option<String>,
    agent_version: Option<String>,
}

impl HostRow {
    fn split(self) -> (Host, String) {
        let host = Host {
            id: self.id,
            name: self.name,
            url: self.url,
            capabilities: self.capabilities.0,
            pool: self.pool,
            status: self.status,
            status_reason: self.status_reason,
            heartbeat_timeout_s: self.heartbeat_timeout_s,
            last_heartbeat_at: self.last_heartbeat_at,
            agent_version: self.agent_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        };
        (host, self.secret)
    }
}

/// A host agent registering, validated.
#[derive(Debug, Clone)]
pub struct NewHost {
    /// Unique name.
    pub name: String,
    /// Where the agent listens.
    pub url: String,
    /// What it offers.
    pub capabilities: Vec<String>,
    /// The pool its new devices join.
    pub pool: String,
    /// Silent this long, it goes offline.
    pub heartbeat_timeout_s: i32,
    /// The agent's version.
    pub agent_version: Option<String>,
}

/// Where and how a worker reaches a host's agent.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The host.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its agent's base URL.
    pub url: String,
    /// The shared secret the agent expects.
    pub secret: String,
    /// Whether its heartbeats arrive.
    pub status: HostStatus,
}

/// A fresh host secret: 244 random bits from the OS generator (two v4 UUIDs).
pub fn new_secret() -> String {
    format!("sbh_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Compares secrets in constant time.
pub fn secret_matches(expected: &str, presented: &str) -> bool {
    expected.len() == presented.len()
        && expected.bytes().zip(presented.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Registers a host. A new name gets a new secret (returned, shown once). A known name
/// registers again (new url, capabilities, back online) only for the caller that
/// presents its secret; anyone else gets 409.
pub async fn register(
    conn: &mut PgConnection,
    new: &NewHost,
    presented: Option<&str>,
) -> CoreResult<(Host, Option<String>)> {
    let secret = new_secret();
    let inserted = sqlx::query_as!(
        HostRow,
        "INSERT INTO hosts (id, name, url, capabilities, pool, heartbeat_timeout_s, agent_version, secret,
                            status, last_heartbeat_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'online', now())
         ON CONFLICT (name) DO NOTHING RETURNING *",
        HostId::random() as HostId,
        new.name,
        new.url,
        Json(&new.capabilities) as _,
        new.pool,
        new.heartbeat_timeout_s,
        new.agent_version,
        secret,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = inserted {
        let (host, _) = row.split();
        events::append(conn, EventKind::HostRegistered, Subject::host(host.id, None), json!({"host": host})).await?;
        return Ok((host, Some(secret)));
    }
    let existing = sqlx::query_as!(HostRow, "SELECT * FROM hosts WHERE name = $1 FOR UPDATE", new.name)
        .fetch_one(&mut *conn)
        .await?;
    if !presented.is_some_and(|p| secret_matches(&existing.secret, p)) {
        return Err(CoreError::Conflict(format!(
            "a host named {:?} is already registered; register again with its secret (header X-Host-Secret) \
             or delete it first",
            new.name
        )));
    }
    let row = sqlx::query_as!(
        HostRow,
        "UPDATE hosts SET url = $2, capabilities = $3, pool = $4, heartbeat_timeout_s = $5, agent_version = $6,
                          status = 'online', status_reason = NULL, last_heartbeat_at = now(), updated_at = now()
         WHERE id = $1 RETURNING *",
        existing.id as HostId,
        new.url,
        Json(&new.capabilities) as _,
        new.pool,
        new.heartbeat_timeout_s,
        new.agent_version,
    )
    .fetch_one(&mut *conn)
    .await?;
    let (host, _) = row.split();
    let data = json!({"host": host, "again": true});
    events::append(conn, EventKind::HostRegistered, Subject::host(host.id, None), data).await?;
    Ok((host, None))
}

/// Locks a host for its heartbeat, checking the secret: 404 for an unknown id, 401
/// for a wrong secret.
pub async fn authenticate(conn: &mut PgConnection, id: HostId, presented: &str) -> CoreResult<Host> {
    let row = locked_row(conn, id).await?;
    if !secret_matches(&row.secret, presented) {
        return Err(CoreError::Unauthorized(format!("wrong secret for host {id}")));
    }
    Ok(row.split().0)
}

/// Records a heartbeat of a locked host: online, silent no more. Its `host.online`
/// event when it was offline.
pub async fn beat(conn: &mut PgConnection, before: &Host, agent_version: Option<&str>) -> CoreResult<Host> {
    let row = sqlx::query_as!(
        HostRow,
        "UPDATE hosts SET status = 'online', status_reason = NULL, last_heartbeat_at = now(),
                          agent_version = COALESCE($2, agent_version), updated_at = now()
         WHERE id = $1 RETURNING *",
        before.id as HostId,
        agent_version,
    )
    .fetch_one(&mut *conn)
    .await?;
    let (host, _) = row.split();
    if before.status == HostStatus::Offline {
        let data = json!({"previous_reason": before.status_reason});
        events::append(conn, EventKind::HostOnline, Subject::host(host.id, None), data).await?;
    }
    Ok(host)
}

/// Takes offline every online host silent past its timeout, with its `host.offline`
/// event; returns them.
pub async fn mark_silent(conn: &mut PgConnection) -> CoreResult<Vec<Host>> {
    let rows = sqlx::query_as!(
        HostRow,
        "UPDATE hosts SET status = 'offline', updated_at = now(),
                status_reason = format('no heartbeat for %s s (its timeout is %s s)',
                    floor(extract(epoch FROM now() - last_heartbeat_at))::bigint, heartbeat_timeout_s)
         WHERE status = 'online'
           AND (last_heartbeat_at IS NULL OR last_heartbeat_at < now() - make_interval(secs => heartbeat_timeout_s))
         RETURNING *",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut hosts = Vec::with_capacity(rows.len());
    for row in rows {
        let (host, _) = row.split();
        let data = json!({"reason": host.status_reason, "last_heartbeat_at": host.last_heartbeat_at});
        events::append(conn, EventKind::HostOffline, Subject::host(host.id, None), data).await?;
        hosts.push(host);
    }
    Ok(hosts)
}

/// A host's row (404 if absent).
async fn row(pool: &PgPool, id: HostId) -> CoreResult<HostRow> {
    sqlx::query_as!(HostRow, "SELECT * FROM hosts WHERE id = $1", id as HostId)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("host {id}")))
}

/// A host's row, locked for the caller's transaction (404 if absent).
async fn locked_row(conn: &mut PgConnection, id: HostId) -> CoreResult<HostRow> {
    sqlx::query_as!(HostRow, "SELECT * FROM hosts WHERE id = $1 FOR UPDATE", id as HostId)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("host {id}")))
}

/// One host.
pub async fn get(pool: &PgPool, id: HostId) -> CoreResult<Host> {
    Ok(row(pool, id).await?.split().0)
}

/// Hosts newest first, optionally of one status, one page.
pub async fn list(
    pool: &PgPool,
    status: Option<HostStatus>,
    limit: i64,
    cursor: Option<Cursor>,
) -> CoreResult<Page<Host>> {
    let rows = sqlx::query_as!(
        HostRow,
        "SELECT * FROM hosts
         WHERE ($1::host_status IS NULL OR status = $1)
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
         ORDER BY created_at DESC, id DESC
         LIMIT $4",
        status as Option<HostStatus>,
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(|r| r.split().0).collect();
    Ok(Page::from_rows(items, limit, |h: &Host| Cursor { created_at: h.created_at, id: h.id.0 }))
}

/// Deletes a host, with its `host.deleted` event (its devices keep their rows; the
/// caller takes them offline first).
pub async fn delete(conn: &mut PgConnection, id: HostId) -> CoreResult<()> {
    let done = sqlx::query!("DELETE FROM hosts WHERE id = $1", id as HostId).execute(&mut *conn).await?;
    if done.rows_affected() == 0 {
        return Err(CoreError::not_found(format!("host {id}")));
    }
    events::append(conn, EventKind::HostDeleted, Subject::host(id, None), json!({})).await?;
    Ok(())
}

/// Locks a host (404 if absent).
pub async fn lock(conn: &mut PgConnection, id: HostId) -> CoreResult<Host> {
    Ok(locked_row(conn, id).await?.split().0)
}

/// How a worker reaches a host's agent.
pub async fn endpoint(pool: &PgPool, id: HostId) -> CoreResult<Endpoint> {
    let row = row(pool, id).await?;
    Ok(Endpoint { id: row.id, name: row.name, url: row.url, secret: row.secret, status: row.status })
}
