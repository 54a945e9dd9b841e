//! The `devices` table: registry, leases and breakers.

use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    CoreError, CoreResult,
    input::Fields,
    model::{Breaker, BreakerState, Device, DeviceStatus, Driver, Lease, event_types},
    pagination::{Cursor, Page},
    repo::events::{self, Subject},
};

/// The columns `from_row` reads, of a device aliased `d`. Written once.
macro_rules! device_columns {
    () => {
        "d.id, d.serial, d.name, d.platform, d.model, d.pool, d.labels, d.driver, d.host_id, \
         d.status, d.breaker_state, d.breaker_failures, d.breaker_open_until, d.lease_run_id, d.lease_owner, \
         d.lease_expires_at, d.metadata, d.created_at, d.updated_at"
    };
}
pub(crate) use device_columns;

/// SQL condition: device `d` matches the selector JSON bound as `$SEL`. Kept beside
/// `Selector::matches`, which states the same rule in Rust.
macro_rules! selector_matches {
    ($sel:literal) => {
        concat!(
            "(CASE WHEN ", $sel, " ? 'id' THEN d.id = (", $sel, "->>'id')::uuid ",
            "WHEN ", $sel, " ? 'serial' THEN d.serial = ", $sel, "->>'serial' ",
            "ELSE (NOT (", $sel, " ? 'pool') OR d.pool = ", $sel, "->>'pool') ",
            "AND d.labels @> ARRAY(SELECT jsonb_array_elements_text(COALESCE(", $sel, "->'labels', '[]'::jsonb))) END)"
        )
    };
}
pub(crate) use selector_matches;

pub(crate) fn from_row(r: &PgRow) -> Result<Device, sqlx::Error> {
    let parse = |col: &str, s: String| -> Result<_, sqlx::Error> {
        Err(sqlx::Error::Decode(format!("bad {col}: {s}").into()))
    };
    let driver: String = r.try_get("driver")?;
    let status: String = r.try_get("status")?;
    let breaker: String = r.try_get("breaker_state")?;
    let lease_run_id: Option<Uuid> = r.try_get("lease_run_id")?;
    let lease_owner: Option<String> = r.try_get("lease_owner")?;
    Ok(Device {
        id: r.try_get("id")?,
        serial: r.try_get("serial")?,
        name: r.try_get("name")?,
        platform: r.try_get("platform")?,
        model: r.try_get("model")?,
        pool: r.try_get("pool")?,
        labels: r.try_get("labels")?,
        driver: match driver.parse::<Driver>() {
            Ok(d) => d,
            Err(_) => return parse("driver", driver),
        },
        host_id: r.try_get("host_id")?,
        status: match status.parse::<DeviceStatus>() {
            Ok(s) => s,
            Err(_) => return parse("status", status),
        },
        breaker: Breaker {
            state: match breaker.parse::<BreakerState>() {
                Ok(s) => s,
                Err(_) => return parse("breaker_state", breaker),
            },
            consecutive_failures: r.try_get("breaker_failures")?,
            open_until: r.try_get("breaker_open_until")?,
        },
        lease: match (lease_run_id, lease_owner) {
            (Some(run_id), Some(owner)) => Some(Lease { run_id, owner, expires_at: r.try_get("lease_expires_at")? }),
            _ => None,
        },
        metadata: r.try_get("metadata")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// A device to register, validated.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub serial: String,
    pub name: String,
    pub platform: String,
    pub model: Option<String>,
    pub pool: String,
    pub labels: Vec<String>,
    pub driver: Driver,
    pub host_id: Option<Uuid>,
    pub status: DeviceStatus,
    pub metadata: Value,
}

const DEVICE_FIELDS: &[&str] =
    &["serial", "name", "platform", "model", "pool", "labels", "driver", "host_id", "status", "metadata"];

impl NewDevice {
    /// Reads a POST body. `serial` and `driver` are required; `name` defaults to the serial.
    pub fn parse(body: &Value) -> CoreResult<NewDevice> {
        let mut f = Fields::new(body, DEVICE_FIELDS)?;
        let serial = f.string("serial", 128);
        let name = f.opt_string("name", 200);
        let platform = f.opt_string("platform", 64).unwrap_or_else(|| "android".into());
        let model = f.opt_string("model", 200);
        let pool = f.opt_string("pool", 128).unwrap_or_else(|| "default".into());
        let labels = f.opt_string_set("labels").unwrap_or_default();
        let driver = if f.has("driver") { f.opt_enum::<Driver>("driver") } else { None };
        if !f.has("driver") {
            f.errors.insert("driver".into(), format!("is required (one of {})", Driver::ALL.join(", ")));
        }
        let host_id = f.opt_uuid("host_id");
        let status = f.opt_enum::<DeviceStatus>("status").unwrap_or(DeviceStatus::Online);
        let metadata = f.opt_object("metadata").unwrap_or_else(|| json!({}));
        if let Err(e) = validate_sim_metadata(&metadata) {
            f.errors.insert(e.0, e.1);
        }
        if driver == Some(Driver::Host) && host_id.is_none() && !f.errors.contains_key("host_id") {
            f.errors.insert("host_id".into(), "is required for driver host".into());
        }
        f.finish()?;
        let serial = serial.expect("checked");
        Ok(NewDevice {
            name: name.unwrap_or_else(|| serial.clone()),
            serial,
            platform,
            model,
            pool,
            labels,
            driver: driver.expect("checked"),
            host_id,
            status,
            metadata,
        })
    }
}

/// `metadata.sim`, if present, must hold sensible numbers: the sim driver trusts it.
fn validate_sim_metadata(metadata: &Value) -> Result<(), (String, String)> {
    let Some(sim) = metadata.get("sim") else { return Ok(()) };
    let Some(sim) = sim.as_object() else {
        return Err(("metadata.sim".into(), "must be an object".into()));
    };
    for (key, value) in sim {
        let path = format!("metadata.sim.{key}");
        match key.as_str() {
            "latency_ms" => {
                if !value.as_f64().is_some_and(|x| (0.0..=3_600_000.0).contains(&x)) {
                    return Err((path, "must be a number of milliseconds between 0 and 3600000".into()));
                }
            }
            "fail_rate" | "error_rate" => {
                if !value.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)) {
                    return Err((path, "must be a probability between 0 and 1".into()));
                }
            }
            "seed" => {
                if value.as_u64().is_none() {
                    return Err((path, "must be a non-negative integer".into()));
                }
            }
            _ => return Err((path, "unknown sim setting (expected latency_ms, fail_rate, error_rate or seed)".into())),
        }
    }
    Ok(())
}

/// A partial update of a device (PATCH): only the fields present change.
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    pub name: Option<String>,
    pub platform: Option<String>,
    pub model: Option<Option<String>>,
    pub pool: Option<String>,
    pub labels: Option<Vec<String>>,
    pub status: Option<DeviceStatus>,
    pub host_id: Option<Option<Uuid>>,
    pub metadata: Option<Value>,
}

impl DevicePatch {
    pub fn parse(body: &Value) -> CoreResult<DevicePatch> {
        let allowed = &["name", "platform", "model", "pool", "labels", "status", "host_id", "metadata"];
        let mut f = Fields::new(body, allowed)?;
        let patch = DevicePatch {
            name: f.opt_string("name", 200),
            platform: f.opt_string("platform", 64),
            model: if f.has("model") { Some(f.opt_string("model", 200)) } else { None },
            pool: f.opt_string("pool", 128),
            labels: f.opt_string_set("labels"),
            status: f.opt_enum("status"),
            host_id: if f.has("host_id") { Some(f.opt_uuid("host_id")) } else { None },
            metadata: f.opt_object("metadata"),
        };
        for key in ["name", "platform", "pool", "labels", "status", "metadata"] {
            if f.has(key) && f.raw(key).is_none() && !f.errors.contains_key(key) {
                f.errors.insert(key.into(), "cannot be null".into());
            }
        }
        if let Some(m) = &patch.metadata
            && let Err(e) = validate_sim_metadata(m)
        {
            f.errors.insert(e.0, e.1);
        }
        f.finish()?;
        Ok(patch)
    }
}

/// Filters of `GET /devices`.
#[derive(Debug, Default, Clone)]
pub struct DeviceFilter {
    pub status: Option<DeviceStatus>,
    pub pool: Option<String>,
    pub label: Option<String>,
    pub host_id: Option<Uuid>,
}

pub async fn create(pool: &PgPool, d: &NewDevice) -> CoreResult<Device> {
    let mut tx = pool.begin().await?;
    let device = insert(&mut tx, d).await?.ok_or_else(|| {
        CoreError::Conflict(format!("a device with serial {:?} already exists", d.serial))
    })?;
    events::append(&mut tx, event_types::DEVICE_CREATED, Subject::device(device.id), json!({"device": device})).await?;
    tx.commit().await?;
    Ok(device)
}

/// Inserts unless the serial exists (then `None`).
async fn insert(conn: &mut PgConnection, d: &NewDevice) -> CoreResult<Option<Device>> {
    let row = sqlx::query(concat!(
        "WITH d AS (
            INSERT INTO devices (id, serial, name, platform, model, pool, labels, driver, host_id, status, metadata)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (serial) DO NOTHING
            RETURNING *) SELECT ",
        device_columns!(),
        " FROM d"
    ))
        .bind(Uuid::new_v4())
        .bind(&d.serial)
        .bind(&d.name)
        .bind(&d.platform)
        .bind(&d.model)
        .bind(&d.pool)
        .bind(&d.labels)
        .bind(d.driver.as_str())
        .bind(d.host_id)
        .bind(d.status.as_str())
        .bind(&d.metadata)
        .fetch_optional(&mut *conn)
        .await
        .map_err(host_fk_error)?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

fn host_fk_error(e: sqlx::Error) -> CoreError {
    if let sqlx::Error::Database(db) = &e
        && db.code().as_deref() == Some("23503")
    {
        return CoreError::invalid("host_id", "no host with this id");
    }
    e.into()
}

/// Registers devices whose serial is not yet known (idempotent seeding); returns how
/// many were new.
pub async fn seed(pool: &PgPool, devices: &[NewDevice]) -> CoreResult<usize> {
    let mut tx = pool.begin().await?;
    let mut created = 0;
    for d in devices {
        if let Some(device) = insert(&mut tx, d).await? {
            events::append(&mut tx, event_types::DEVICE_CREATED, Subject::device(device.id), json!({"device": device}))
                .await?;
            created += 1;
        }
    }
    tx.commit().await?;
    Ok(created)
}

pub async fn get(pool: &PgPool, id: Uuid) -> CoreResult<Device> {
    let row = sqlx::query(concat!("SELECT ", device_columns!(), " FROM devices d WHERE d.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("device {id}")))?;
    Ok(from_row(&row)?)
}

pub async fn list(pool: &PgPool, filter: &DeviceFilter, limit: i64, cursor: Option<Cursor>) -> CoreResult<Page<Device>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        device_columns!(),
        "
         FROM devices d
         WHERE ($1::text IS NULL OR d.status = $1)
           AND ($2::text IS NULL OR d.pool = $2)
           AND ($3::text IS NULL OR $3 = ANY (d.labels))
           AND ($4::uuid IS NULL OR d.host_id = $4)
           AND ($5::timestamptz IS NULL OR (d.created_at, d.id) < ($5, $6))
         ORDER BY d.created_at DESC, d.id DESC
         LIMIT $7"
    ))
    .bind(filter.status.map(|s| s.as_str()))
    .bind(&filter.pool)
    .bind(&filter.label)
    .bind(filter.host_id)
    .bind(cursor.map(|c| c.created_at))
    .bind(cursor.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(items, limit, |d| Cursor { created_at: d.created_at, id: d.id }))
}

pub async fn update(pool: &PgPool, id: Uuid, p: &DevicePatch) -> CoreResult<Device> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(concat!(
        "WITH d AS (
            UPDATE devices SET
                name = COALESCE($2, name),
                platform = COALESCE($3, platform),
                model = CASE WHEN $4 THEN $5 ELSE model END,
                pool = COALESCE($6, pool),
                labels = COALESCE($7, labels),
                status = COALESCE($8, status),
                host_id = CASE WHEN $9 THEN $10 ELSE host_id END,
                metadata = COALESCE($11, metadata),
                updated_at = now()
            WHERE id = $1 RETURNING *) SELECT ",
        device_columns!(),
        " FROM d"
    ))
    .bind(id)
    .bind(&p.name)
    .bind(&p.platform)
    .bind(p.model.is_some())
    .bind(p.model.clone().flatten())
    .bind(&p.pool)
    .bind(&p.labels)
    .bind(p.status.map(|s| s.as_str()))
    .bind(p.host_id.is_some())
    .bind(p.host_id.flatten())
    .bind(&p.metadata)
    .fetch_optional(&mut *tx)
    .await
    .map_err(host_fk_error)?
    .ok_or_else(|| CoreError::not_found(format!("device {id}")))?;
    let device = from_row(&row)?;
    events::append(&mut tx, event_types::DEVICE_UPDATED, Subject::device(id), json!({"device": device})).await?;
    tx.commit().await?;
    Ok(device)
}

/// Deletes a device that no run holds (409 while leased).
pub async fn delete(pool: &PgPool, id: Uuid) -> CoreResult<()> {
    let mut tx = pool.begin().await?;
    let lease: Option<Option<Uuid>> = sqlx::query_scalar("SELECT lease_run_id FROM devices WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    match lease {
        None => return Err(CoreError::not_found(format!("device {id}"))),
        Some(Some(run)) => {
            return Err(CoreError::Conflict(format!("device {id} is running run {run}; cancel it or wait")));
        }
        Some(None) => {}
    }
    sqlx::query("DELETE FROM devices WHERE id = $1").bind(id).execute(&mut *tx).await?;
    events::append(&mut tx, event_types::DEVICE_DELETED, Subject::device(id), json!({})).await?;
    tx.commit().await?;
    Ok(())
}

/// Whether some device matching `selector` could take a run right now.
pub async fn any_claimable(conn: &mut PgConnection, selector: &Value) -> CoreResult<bool> {
    let sql = concat!(
        "SELECT EXISTS (SELECT 1 FROM devices d WHERE d.status = 'online' AND d.lease_run_id IS NULL ",
        "AND (d.breaker_state = 'closed' OR (d.breaker_state = 'open' AND d.breaker_open_until <= now())) AND ",
        selector_matches!("$1::jsonb"),
        ")"
    );
    Ok(sqlx::query_scalar(sql).bind(selector).fetch_one(&mut *conn).await?)
}

/// Whether any device at all (in any state) matches `selector`.
pub async fn any_matching(pool: &PgPool, selector: &Value) -> CoreResult<bool> {
    let sql = concat!("SELECT EXISTS (SELECT 1 FROM devices d WHERE d.status <> 'retired' AND ", selector_matches!("$1::jsonb"), ")");
    Ok(sqlx::query_scalar(sql).bind(selector).fetch_one(pool).await?)
}

/// Closes a device's breaker by hand (`POST /devices/{id}/breaker/reset`).
pub async fn reset_breaker(pool: &PgPool, id: Uuid) -> CoreResult<Device> {
    let mut tx = pool.begin().await?;
    let before: Option<String> = sqlx::query_scalar("SELECT breaker_state FROM devices WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(before) = before else { return Err(CoreError::not_found(format!("device {id}"))) };
    let row = sqlx::query(concat!(
        "WITH d AS (UPDATE devices SET breaker_state = 'closed', breaker_failures = 0, breaker_trips = 0,
                breaker_open_until = NULL, updated_at = now() WHERE id = $1 RETURNING *) SELECT ",
        device_columns!(),
        " FROM d"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let device = from_row(&row)?;
    if before != "closed" {
        events::append(&mut tx, "device.breaker_closed", Subject::device(id), json!({"reason": "reset", "was": before})).await?;
    }
    tx.commit().await?;
    Ok(device)
}
