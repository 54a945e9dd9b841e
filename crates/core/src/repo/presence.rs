//! Carries out `presence` decisions: syncs the devices of a report (adb discovery, a
//! host agent's heartbeat) and takes a silent host's devices offline, each change with
//! its `device.status_changed` event, in the caller's transaction.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::{
    CoreResult,
    events::{EventKind, Subject},
    ids::{DeviceId, HostId},
    model::{DeviceStatus, Driver, StatusSource},
    presence::{self, Presence, Seen},
    repo::events,
};

/// One device as `adb devices -l` (or an agent) lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// The adb serial.
    pub serial: String,
    /// The adb state word: `device`, `unauthorized`, `offline`, ...
    pub state: String,
    /// `model:` (adb replaces non-alphanumerics with `_`).
    #[serde(default)]
    pub model: Option<String>,
    /// `product:`.
    #[serde(default)]
    pub product: Option<String>,
    /// `device:`.
    #[serde(default)]
    pub device: Option<String>,
    /// `usb:`.
    #[serde(default)]
    pub usb: Option<String>,
}

impl Listed {
    fn seen(&self) -> Seen {
        if self.state == "device" { Seen::Ready } else { Seen::NotReady(self.state.clone()) }
    }

    fn metadata(&self) -> Value {
        json!({"adb": {"product": self.product, "device": self.device, "usb": self.usb, "state": self.state}})
    }
}

/// Whose devices a report covers.
#[derive(Debug, Clone)]
pub struct Scope {
    /// `Discovery` or `Host`.
    pub reporter: StatusSource,
    /// The devices' driver (`adb` for discovery, `host` for an agent).
    pub driver: Driver,
    /// The agent's host.
    pub host: Option<HostId>,
    /// Who reports, for reasons: `adb devices`, `host lab-3`.
    pub by: String,
    /// The pool new devices join.
    pub pool: String,
}

/// What a sync did.
#[derive(Debug, Default, Clone, Serialize, utoipa::ToSchema)]
pub struct Synced {
    /// Devices registered now.
    pub created: Vec<DeviceId>,
    /// Devices that came online (new or back): to offer to waiting runs.
    pub online: Vec<DeviceId>,
    /// Devices that went offline.
    pub offline: Vec<DeviceId>,
    /// Listed serials that belong to another kind of device, left alone.
    pub conflicts: Vec<String>,
}

struct Known {
    id: DeviceId,
    serial: String,
    driver: Driver,
    host_id: Option<HostId>,
    status: DeviceStatus,
    status_reason: Option<String>,
    status_source: StatusSource,
}

impl Known {
    fn presence(&self) -> Presence {
        Presence { status: self.status, reason: self.status_reason.clone(), source: self.status_source }
    }
}

/// Syncs one full listing: new serials are registered, listed ones follow what is
/// seen, and the scope's devices that are not listed are `Missing`.
pub async fn sync(conn: &mut PgConnection, scope: &Scope, listing: &[Listed]) -> CoreResult<Synced> {
    let serials: Vec<String> = listing.iter().map(|l| l.serial.clone()).collect();
    let known = sqlx::query_as!(
        Known,
        "SELECT id, serial, driver, host_id, status, status_reason, status_source FROM devices
         WHERE serial = ANY($1) OR (driver = $2 AND ($3::uuid IS NULL OR host_id = $3))",
        // No lock: a sync every few seconds must not make claims (SKIP LOCKED) miss
        // free phones. Each change below is guarded by the status it was decided on.
        &serials,
        scope.driver as Driver,
        scope.host as Option<HostId>,
    )
    .fetch_all(&mut *conn)
    .await?;
    let by_serial: HashMap<&str, &Known> = known.iter().map(|k| (k.serial.as_str(), k)).collect();
    let mut synced = Synced::default();
    for listed in listing {
        match by_serial.get(listed.serial.as_str()) {
            None => register(conn, scope, listed, &mut synced).await?,
            Some(k) if k.driver != scope.driver => synced.conflicts.push(listed.serial.clone()),
            Some(k) => follow(conn, scope, k, &listed.seen(), Some(listed), &mut synced).await?,
        }
    }
    let listed: HashSet<&str> = serials.iter().map(String::as_str).collect();
    for k in known.iter().filter(|k| !listed.contains(k.serial.as_str()) && in_scope(scope, k)) {
        follow(conn, scope, k, &Seen::Missing, None, &mut synced).await?;
    }
    Ok(synced)
}

fn in_scope(scope: &Scope, k: &Known) -> bool {
    k.driver == scope.driver && (scope.host.is_none() || k.host_id == scope.host)
}

/// Takes the devices of a host that went silent (or was deleted) offline.
pub async fn host_down(conn: &mut PgConnection, host: HostId, reason: &str) -> CoreResult<Vec<DeviceId>> {
    let known = sqlx::query_as!(
        Known,
        "SELECT id, serial, driver, host_id, status, status_reason, status_source FROM devices
         WHERE host_id = $1",
        host as HostId,
    )
    .fetch_all(&mut *conn)
    .await?;
    let scope = Scope {
        reporter: StatusSource::Host,
        driver: Driver::Host,
        host: Some(host),
        by: String::new(),
        pool: String::new(),
    };
    let mut synced = Synced::default();
    for k in &known {
        follow(conn, &scope, k, &Seen::HostDown(reason.to_string()), None, &mut synced).await?;
    }
    Ok(synced.offline)
}

/// Applies what is seen of a known device (and moves it to the reporting host).
async fn follow(
    conn: &mut PgConnection,
    scope: &Scope,
    k: &Known,
    seen: &Seen,
    listed: Option<&Listed>,
    synced: &mut Synced,
) -> CoreResult<()> {
    if let Some(l) = listed {
        // What adb says of the phone fills in what the registry does not know yet, and a
        // phone moved to another agent's USB port follows it.
        sqlx::query!(
            "UPDATE devices SET model = COALESCE(model, $2), host_id = COALESCE($3, host_id),
                    metadata = metadata || $4, updated_at = now()
             WHERE id = $1 AND (model IS NULL OR host_id IS DISTINCT FROM COALESCE($3, host_id)
                                OR NOT metadata @> $4)",
            k.id as DeviceId,
            l.model.as_deref().map(display_model),
            scope.host as Option<HostId>,
            l.metadata(),
        )
        .execute(&mut *conn)
        .await?;
    }
    let Some(next) = presence::next(&k.presence(), seen, scope.reporter, &scope.by) else { return Ok(()) };
    // Only if nobody changed the status since it was read (an operator's PATCH wins).
    let done = sqlx::query!(
        "UPDATE devices SET status = $2, status_reason = $3, status_source = $4, updated_at = now()
         WHERE id = $1 AND status = $5 AND status_source = $6",
        k.id as DeviceId,
        next.status as DeviceStatus,
        next.reason,
        next.source as StatusSource,
        k.status as DeviceStatus,
        k.status_source as StatusSource,
    )
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(());
    }
    let data = json!({"status": next.status, "previous": k.status, "reason": next.reason, "source": next.source});
    let subject = Subject { device_id: Some(k.id), host_id: scope.host.or(k.host_id), ..Default::default() };
    events::append(conn, EventKind::DeviceStatusChanged, subject, data).await?;
    match next.status {
        DeviceStatus::Online => synced.online.push(k.id),
        _ => synced.offline.push(k.id),
    }
    Ok(())
}

/// Registers a device a report found.
async fn register(conn: &mut PgConnection, scope: &Scope, l: &Listed, synced: &mut Synced) -> CoreResult<()> {
    let now = Presence { status: DeviceStatus::Online, reason: None, source: scope.reporter };
    let p = presence::next(&now, &l.seen(), scope.reporter, &scope.by).unwrap_or(now);
    let model = l.model.as_deref().map(display_model);
    let name = model.clone().map(|m| format!("{m} ({})", l.serial)).unwrap_or_else(|| l.serial.clone());
    // Another reporter may register the same serial at the same moment: the loser
    // leaves it to its next report.
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO devices (id, serial, name, platform, model, pool, driver, host_id, status, status_reason,
                              status_source, metadata)
           VALUES ($1, $2, $3, 'android', $4, $5, $6, $7, $8, $9, $10, $11)
           ON CONFLICT (serial) DO NOTHING RETURNING id AS "id: DeviceId""#,
        DeviceId::random() as DeviceId,
        l.serial,
        name,
        model,
        scope.pool,
        scope.driver as Driver,
        scope.host as Option<HostId>,
        p.status as DeviceStatus,
        p.reason,
        p.source as StatusSource,
        l.metadata(),
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = inserted else { return Ok(()) };
    let data = json!({"serial": l.serial, "status": p.status, "reason": p.reason, "source": p.source, "by": scope.by});
    let subject = Subject { device_id: Some(id), host_id: scope.host, ..Default::default() };
    events::append(conn, EventKind::DeviceCreated, subject, data).await?;
    synced.created.push(id);
    if p.status == DeviceStatus::Online {
        synced.online.push(id);
    }
    Ok(())
}

/// adb's `model:` has every non-alphanumeric replaced with `_` (`Pixel_6a`): show it
/// with spaces.
fn display_model(m: &str) -> String {
    m.replace('_', " ")
}
