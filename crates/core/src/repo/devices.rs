//! The `devices` table: the registry, and every device write of the run protocol
//! (lease, renewal, release with its breaker, freeing after a recovery), written once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::{
    CoreError, CoreResult,
    breaker::{self, BreakerRow, Effect, Transition},
    events::{EventKind, Subject},
    ids::{DeviceId, HostId, RunId},
    model::{Breaker, BreakerState, Device, DeviceStatus, Driver, Lease, StatusSource},
    pagination::{Cursor, Page},
    repo::events,
    selector::Selector,
};

/// A `devices` row.
struct DeviceRow {
    id: DeviceId,
    serial: String,
    name: String,
    platform: String,
    model: Option<String>,
    pool: String,
    labels: Vec<String>,
    driver: Driver,
    host_id: Option<HostId>,
    status: DeviceStatus,
    status_reason: Option<String>,
    status_source: StatusSource,
    breaker_state: BreakerState,
    breaker_failures: i32,
    breaker_open_until: Option<DateTime<Utc>>,
    breaker_trips: i32,
    lease_run_id: Option<RunId>,
    lease_owner: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    metadata: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Device {
        let _ = r.breaker_trips;
        Device {
            id: r.id,
            serial: r.serial,
            name: r.name,
            platform: r.platform,
            model: r.model,
            pool: r.pool,
            labels: r.labels,
            driver: r.driver,
            host_id: r.host_id,
            status: r.status,
            status_reason: r.status_reason,
            status_source: r.status_source,
            breaker: Breaker {
                state: r.breaker_state,
                consecutive_failures: r.breaker_failures,
                open_until: r.breaker_open_until,
            },
            lease: match (r.lease_run_id, r.lease_owner) {
                (Some(run_id), Some(owner)) => Some(Lease { run_id, owner, expires_at: r.lease_expires_at }),
                _ => None,
            },
            metadata: r.metadata,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A device to register, validated.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Unique serial.
    pub serial: String,
    /// Display name.
    pub name: String,
    /// `android`, ...
    pub platform: String,
    /// Model, if known.
    pub model: Option<String>,
    /// Its pool.
    pub pool: String,
    /// Labels, sorted and unique.
    pub labels: Vec<String>,
    /// How it is driven.
    pub driver: Driver,
    /// Its host agent (`host` driver).
    pub host_id: Option<HostId>,
    /// Initial status.
    pub status: DeviceStatus,
    /// Free-form settings, `metadata.sim` validated.
    pub metadata: Value,
}

/// A partial update of a device: only the fields present change.
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    /// New name.
    pub name: Option<String>,
    /// New platform.
    pub platform: Option<String>,
    /// New model (`Some(None)` clears it).
    pub model: Option<Option<String>>,
    /// New pool.
    pub pool: Option<String>,
    /// New labels.
    pub labels: Option<Vec<String>>,
    /// New status (set by an operator).
    pub status: Option<DeviceStatus>,
    /// The operator's note on the status (`Some(None)` clears it). A new status
    /// without a note clears the old reason.
    pub status_reason: Option<Option<String>>,
    /// New host (`Some(None)` clears it).
    pub host_id: Option<Option<HostId>>,
    /// New metadata (replaces the old).
    pub metadata: Option<Value>,
}

/// Filters of `GET /devices`.
#[derive(Debug, Default, Clone)]
pub struct DeviceFilter {
    /// Only this status.
    pub status: Option<DeviceStatus>,
    /// Only this pool.
    pub pool: Option<String>,
    /// Only devices with this label.
    pub label: Option<String>,
    /// Only devices of this host.
    pub host_id: Option<HostId>,
}

fn host_fk_error(e: sqlx::Error) -> CoreError {
    if let sqlx::Error::Database(db) = &e
        && db.code().as_deref() == Some("23503")
    {
        return CoreError::invalid("host_id", "no host with this id");
    }
    e.into()
}

/// Registers a device (409 when the serial is taken).
pub async fn create(pool: &PgPool, d: &NewDevice) -> CoreResult<Device> {
    let mut tx = pool.begin().await?;
    let device = insert(&mut tx, d)
        .await?
        .ok_or_else(|| CoreError::Conflict(format!("a device with serial {:?} already exists", d.serial)))?;
    tx.commit().await?;
    Ok(device)
}

/// Registers devices whose serial is not yet known (idempotent seeding); returns how
/// many were new.
pub async fn seed(pool: &PgPool, devices: &[NewDevice]) -> CoreResult<usize> {
    let mut tx = pool.begin().await?;
    let mut created = 0;
    for d in devices {
        created += usize::from(insert(&mut tx, d).await?.is_some());
    }
    tx.commit().await?;
    Ok(created)
}

/// Inserts unless the serial exists (then `None`), with its `device.created` event.
async fn insert(conn: &mut PgConnection, d: &NewDevice) -> CoreResult<Option<Device>> {
    let row = sqlx::query_as!(
        DeviceRow,
        "INSERT INTO devices (id, serial, name, platform, model, pool, labels, driver, host_id, status, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (serial) DO NOTHING
         RETURNING *",
        DeviceId::random() as DeviceId,
        d.serial,
        d.name,
        d.platform,
        d.model,
        d.pool,
        &d.labels,
        d.driver as Driver,
        d.host_id as Option<HostId>,
        d.status as DeviceStatus,
        d.metadata,
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(host_fk_error)?;
    let Some(device) = row.map(Device::from) else { return Ok(None) };
    events::append(conn, EventKind::DeviceCreated, Subject::device(device.id), json!({"device": device})).await?;
    Ok(Some(device))
}

/// One device.
pub async fn get(pool: &PgPool, id: DeviceId) -> CoreResult<Device> {
    let row = sqlx::query_as!(DeviceRow, "SELECT * FROM devices WHERE id = $1", id as DeviceId)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("device {id}")))?;
    Ok(row.into())
}

/// Devices newest first, filtered, one page.
pub async fn list(
    pool: &PgPool,
    filter: &DeviceFilter,
    limit: i64,
    cursor: Option<Cursor>,
) -> CoreResult<Page<Device>> {
    let rows = sqlx::query_as!(
        DeviceRow,
        "SELECT * FROM devices
         WHERE ($1::device_status IS NULL OR status = $1)
           AND ($2::text IS NULL OR pool = $2)
           AND ($3::text IS NULL OR $3 = ANY (labels))
           AND ($4::uuid IS NULL OR host_id = $4)
           AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6))
         ORDER BY created_at DESC, id DESC
         LIMIT $7",
        filter.status as Option<DeviceStatus>,
        filter.pool,
        filter.label,
        filter.host_id as Option<HostId>,
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id),
        limit + 1,
    )
    .fetch_all(pool)
    .await?;
    let items = rows.into_iter().map(Device::from).collect();
    Ok(Page::from_rows(items, limit, |d: &Device| Cursor { created_at: d.created_at, id: d.id.0 }))
}

/// Applies a patch (and its `device.updated` event) in the caller's transaction.
pub async fn update(conn: &mut PgConnection, id: DeviceId, p: &DevicePatch) -> CoreResult<Device> {
    let row = sqlx::query_as!(
        DeviceRow,
        "UPDATE devices SET
            name = COALESCE($2, name),
            platform = COALESCE($3, platform),
            model = CASE WHEN $4 THEN $5 ELSE model END,
            pool = COALESCE($6, pool),
            labels = COALESCE($7, labels),
            status = COALESCE($8, status),
            host_id = CASE WHEN $9 THEN $10 ELSE host_id END,
            metadata = COALESCE($11, metadata),
            status_reason = CASE WHEN $12 THEN $13 WHEN $8::device_status IS NOT NULL THEN NULL
                                 ELSE status_reason END,
            status_source = CASE WHEN $8::device_status IS NOT NULL OR $12 THEN 'operator' ELSE status_source END,
            updated_at = now()
         WHERE id = $1 RETURNING *",
        id as DeviceId,
        p.name,
        p.platform,
        p.model.is_some(),
        p.model.clone().flatten(),
        p.pool,
        p.labels.as_deref(),
        p.status as Option<DeviceStatus>,
        p.host_id.is_some(),
        p.host_id.flatten() as Option<HostId>,
        p.metadata,
        p.status_reason.is_some(),
        p.status_reason.clone().flatten(),
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(host_fk_error)?
    .ok_or_else(|| CoreError::not_found(format!("device {id}")))?;
    let device = Device::from(row);
    events::append(conn, EventKind::DeviceUpdated, Subject::device(id), json!({"device": device})).await?;
    Ok(device)
}

/// Locks a device for deletion: 404 if absent, 409 while a run holds it.
pub async fn lock_for_delete(conn: &mut PgConnection, id: DeviceId) -> CoreResult<()> {
    let lease = sqlx::query_scalar!(
        r#"SELECT lease_run_id AS "lease: RunId" FROM devices WHERE id = $1 FOR UPDATE"#,
        id as DeviceId
    )
    .fetch_optional(&mut *conn)
    .await?;
    match lease {
        None => Err(CoreError::not_found(format!("device {id}"))),
        Some(Some(run)) => Err(CoreError::Conflict(format!("device {id} is running run {run}; cancel it or wait"))),
        Some(None) => Ok(()),
    }
}

/// Deletes a locked device, with its `device.deleted` event.
pub async fn delete(conn: &mut PgConnection, id: DeviceId) -> CoreResult<()> {
    sqlx::query!("DELETE FROM devices WHERE id = $1", id as DeviceId).execute(&mut *conn).await?;
    events::append(conn, EventKind::DeviceDeleted, Subject::device(id), json!({})).await?;
    Ok(())
}

/// Closes a device's breaker by hand (`POST /devices/{id}/breaker/reset`).
pub async fn reset_breaker(pool: &PgPool, id: DeviceId) -> CoreResult<Device> {
    let mut tx = pool.begin().await?;
    let before = sqlx::query_scalar!("SELECT breaker_state FROM devices WHERE id = $1 FOR UPDATE", id as DeviceId)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| CoreError::not_found(format!("device {id}")))?;
    let row = sqlx::query_as!(
        DeviceRow,
        "UPDATE devices SET breaker_state = 'closed', breaker_failures = 0, breaker_trips = 0, breaker_open_until = NULL,
            updated_at = now()
         WHERE id = $1 RETURNING *",
        id as DeviceId
    )
    .fetch_one(&mut *tx)
    .await?;
    if before != BreakerState::Closed {
        let data = json!({"reason": "reset", "was": before});
        crate::meters::breaker_transition(id, "closed");
        events::append(&mut tx, EventKind::DeviceBreakerClosed, Subject::device(id), data).await?;
    }
    tx.commit().await?;
    Ok(row.into())
}

/// Whether some device matching `selector` could take a run right now.
pub async fn any_claimable(conn: &mut PgConnection, selector: &Selector) -> CoreResult<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM devices d WHERE device_claimable(d) AND selector_matches($1, d)) AS "any!""#,
        selector.to_json()
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Whether any device that may serve runs, now or later (not retired), matches.
pub async fn any_matching(conn: &mut PgConnection, selector: &Selector) -> CoreResult<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM devices d WHERE d.status <> 'retired' AND selector_matches($1, d)) AS "any!""#,
        selector.to_json()
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// The best free device matching `selector`, locked for the caller's transaction:
/// closed breakers before cooled-down open ones, then the longest idle.
pub(crate) async fn pick_claimable(conn: &mut PgConnection, selector: &Selector) -> CoreResult<Option<Device>> {
    let row = sqlx::query_as!(
        DeviceRow,
        "SELECT d.* FROM devices d WHERE device_claimable(d) AND selector_matches($1, d)
         ORDER BY (d.breaker_state = 'closed') DESC, d.updated_at, d.id LIMIT 1 FOR UPDATE SKIP LOCKED",
        selector.to_json()
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(Device::from))
}

/// Locks the device if it is free to take a run now, for a hand-off
/// (`runs::leasing::hand_over`), and switches sorting off for the rest of the
/// transaction, as the hand-off's walk of the queue needs (see `next_candidate` there):
/// `set_config(..., true)` is `SET LOCAL`, here without a round trip of its own.
pub(crate) async fn lock_for_hand_off(conn: &mut PgConnection, id: DeviceId) -> CoreResult<Option<Device>> {
    Ok(lock_many_for_hand_off(conn, &[id]).await?.pop())
}

/// `lock_for_hand_off` for the devices of a finish batch, in one statement: those free
/// to take a run now, locked (`SKIP LOCKED`, as one by one), with sorting switched off
/// for the rest of the transaction.
pub(crate) async fn lock_many_for_hand_off(conn: &mut PgConnection, ids: &[DeviceId]) -> CoreResult<Vec<Device>> {
    let rows = sqlx::query_as!(
        DeviceRow,
        "SELECT d.* FROM devices d
         WHERE d.id = ANY ($1) AND device_claimable(d) AND set_config('enable_sort', 'off', true) = 'off'
         FOR UPDATE SKIP LOCKED",
        ids as &[DeviceId]
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(Device::from).collect())
}

/// The breaker a locked, claimable device gets with its lease, and whether the run is
/// its probe: a run that touches the device (`may_probe`) turns a cooled-down open
/// breaker half-open. (A half-open device is not claimable, so only `open` turns.)
pub(crate) fn leased_breaker(device: &Device, may_probe: bool) -> (BreakerState, bool) {
    if may_probe && device.breaker.state == BreakerState::Open {
        (BreakerState::HalfOpen, true)
    } else {
        (device.breaker.state, false)
    }
}

/// Extends the lease of the device `run` holds for `owner`.
pub(crate) async fn renew_lease(conn: &mut PgConnection, run: RunId, owner: &str, ttl: Duration) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE devices SET lease_expires_at = now() + make_interval(secs => $3) WHERE lease_run_id = $1 AND lease_owner = $2",
        run as RunId,
        owner,
        ttl.as_secs_f64(),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Breaker settings a releasing worker applies.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    /// Consecutive infrastructure errors that open the breaker.
    pub threshold: i32,
    /// Cooldown of a first opening (seconds); it doubles with each re-opening.
    pub cooldown_s: i64,
}

/// A leased device's breaker as its releaser read it, unlocked, in the transaction that
/// locked the run, with that transaction's clock (`now()`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeenBreaker {
    /// The breaker columns read.
    pub row: BreakerRow,
    /// The transaction's clock.
    pub now: DateTime<Utc>,
}

/// A device to free at a finish: the run that held it, what the attempt says about
/// it, and its breaker as the finish read it (`release_each`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Release {
    /// The device.
    pub device: DeviceId,
    /// The run whose lease it holds.
    pub run: RunId,
    /// What the attempt says about the device.
    pub effect: Effect,
    /// Its breaker as read with the run's lock, if the device is still leased to it.
    pub seen: Option<SeenBreaker>,
}

/// Frees the devices the finishing runs held for `owner` and applies each one's
/// `effect` to its breaker (`breaker::next` decides; this writes), with an event when
/// a breaker opens or closes.
///
/// Each decision is made on the breaker `seen` with the run's lock and written only if
/// the row still says so, all in one statement: the device row is the lease holder's
/// to change, so only an operator's reset or edit meanwhile makes a write miss, and
/// then a locked read decides again for that device (`release`).
pub(crate) async fn release_each(
    conn: &mut PgConnection,
    owner: &str,
    policy: BreakerPolicy,
    items: &[Release],
) -> CoreResult<()> {
    let decided: Vec<(&Release, SeenBreaker, BreakerRow, Option<Transition>)> = items
        .iter()
        .filter_map(|r| {
            let seen = r.seen?;
            let (next, transition) = breaker::next(seen.row, r.effect, policy.threshold, policy.cooldown_s, seen.now);
            Some((r, seen, next, transition))
        })
        .collect();
    let writes: Vec<ReleaseWrite<'_>> = decided
        .iter()
        .map(|(r, seen, next, _)| ReleaseWrite { id: r.device, run: r.run, expected: Some(&seen.row), next })
        .collect();
    let written = write_releases(conn, owner, &writes).await?;
    for (r, _, next, transition) in &decided {
        if written.contains(&r.device) {
            record_transition(conn, r.device, r.run, next, *transition).await?;
        }
    }
    // Not seen with the run's lock, or changed since: decided again under the row lock.
    for r in items.iter().filter(|r| !written.contains(&r.device)) {
        release(conn, r.device, r.run, owner, r.effect, policy).await?;
    }
    Ok(())
}

/// `release_each`'s locked path for one device: its breaker read under the row lock,
/// decided on and written.
async fn release(
    conn: &mut PgConnection,
    id: DeviceId,
    run: RunId,
    owner: &str,
    effect: Effect,
    policy: BreakerPolicy,
) -> CoreResult<()> {
    let row = sqlx::query!(
        r#"SELECT breaker_state, breaker_failures, breaker_trips, breaker_open_until, now() AS "now!"
           FROM devices WHERE id = $1 AND lease_run_id = $2 AND lease_owner = $3 FOR UPDATE"#,
        id as DeviceId,
        run as RunId,
        owner,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let current = BreakerRow {
        state: row.breaker_state,
        failures: row.breaker_failures,
        trips: row.breaker_trips,
        open_until: row.breaker_open_until,
    };
    let (next, transition) = breaker::next(current, effect, policy.threshold, policy.cooldown_s, row.now);
    let write = ReleaseWrite { id, run, expected: None, next: &next };
    write_releases(conn, owner, &[write]).await?;
    record_transition(conn, id, run, &next, transition).await
}

/// One device's release: its lease to clear, and the breaker `next` to write, only if
/// the breaker is still `expected` (when given).
struct ReleaseWrite<'a> {
    id: DeviceId,
    run: RunId,
    expected: Option<&'a BreakerRow>,
    next: &'a BreakerRow,
}

/// Clears the leases the runs hold for `owner` and writes their devices' breakers, in
/// one statement. Returns the devices written.
async fn write_releases(
    conn: &mut PgConnection,
    owner: &str,
    writes: &[ReleaseWrite<'_>],
) -> CoreResult<std::collections::HashSet<DeviceId>> {
    if writes.is_empty() {
        return Ok(Default::default());
    }
    let expected = |f: &dyn Fn(&BreakerRow) -> i32| writes.iter().map(|w| w.expected.map(f)).collect::<Vec<_>>();
    let done = sqlx::query_scalar!(
        r#"UPDATE devices d SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
              breaker_state = x.state::breaker_state, breaker_failures = x.failures, breaker_trips = x.trips,
              breaker_open_until = x.open_until, updated_at = now()
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::int4[], $6::timestamptz[], $7::text[],
                       $8::int4[], $9::int4[], $10::timestamptz[])
                AS x(id, run, state, failures, trips, open_until, was_state, was_failures, was_trips, was_open_until)
           WHERE d.id = x.id AND d.lease_run_id = x.run AND d.lease_owner = $11
             AND (x.was_state IS NULL OR (d.breaker_state = x.was_state::breaker_state
                  AND d.breaker_failures = x.was_failures AND d.breaker_trips = x.was_trips
                  AND d.breaker_open_until IS NOT DISTINCT FROM x.was_open_until))
           RETURNING d.id AS "id: DeviceId""#,
        &writes.iter().map(|w| w.id.0).collect::<Vec<_>>(),
        &writes.iter().map(|w| w.run.0).collect::<Vec<_>>(),
        &writes.iter().map(|w| w.next.state.to_string()).collect::<Vec<_>>(),
        &writes.iter().map(|w| w.next.failures).collect::<Vec<_>>(),
        &writes.iter().map(|w| w.next.trips).collect::<Vec<_>>(),
        &writes.iter().map(|w| w.next.open_until).collect::<Vec<_>>() as _,
        &writes.iter().map(|w| w.expected.map(|e| e.state.to_string())).collect::<Vec<_>>() as _,
        &expected(&|e| e.failures) as _,
        &expected(&|e| e.trips) as _,
        &writes.iter().map(|w| w.expected.and_then(|e| e.open_until)).collect::<Vec<_>>() as _,
        owner,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(done.into_iter().collect())
}

/// The event and meter of a breaker that opened or closed on release.
async fn record_transition(
    conn: &mut PgConnection,
    id: DeviceId,
    run: RunId,
    next: &BreakerRow,
    transition: Option<Transition>,
) -> CoreResult<()> {
    let Some(t) = transition else { return Ok(()) };
    let (kind, state) = match t {
        Transition::Opened => (EventKind::DeviceBreakerOpened, "open"),
        Transition::Closed => (EventKind::DeviceBreakerClosed, "closed"),
    };
    crate::meters::breaker_transition(id, state);
    let data = json!({"consecutive_failures": next.failures, "open_until": next.open_until, "trips": next.trips});
    events::append(conn, kind, Subject { device_id: Some(id), run_id: Some(run), ..Default::default() }, data).await?;
    Ok(())
}

/// Frees the device of a run recovered from a dead worker. A dead worker says nothing
/// about the device, so the breaker is untouched, except that a probe that died is
/// retried at once (back to open, cooled down).
pub(crate) async fn free_after_recovery(conn: &mut PgConnection, run: RunId) -> CoreResult<()> {
    sqlx::query!(
        "UPDATE devices SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL,
            breaker_state = CASE WHEN breaker_state = 'half_open' THEN 'open' ELSE breaker_state END,
            breaker_open_until = CASE WHEN breaker_state = 'half_open' THEN now() ELSE breaker_open_until END,
            updated_at = now()
         WHERE lease_run_id = $1",
        run as RunId
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Frees expired leases whose run is not running any more (should not happen: belt
/// and braces for the recovery).
pub(crate) async fn free_orphan_leases(conn: &mut PgConnection) -> CoreResult<u64> {
    let r = sqlx::query!(
        "UPDATE devices d SET lease_run_id = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE d.lease_run_id IS NOT NULL AND d.lease_expires_at < now()
           AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = d.lease_run_id AND r.status = 'running')"
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}

/// Validates `metadata.sim` (the sim driver trusts it): each problem named by its path.
pub fn check_sim_metadata(metadata: &Value) -> Result<(), (String, String)> {
    let Some(sim) = metadata.get("sim") else { return Ok(()) };
    let Some(sim) = sim.as_object() else {
        return Err(("metadata.sim".into(), "must be an object".into()));
    };
    for (key, value) in sim {
        let path = format!("metadata.sim.{key}");
        let problem = match key.as_str() {
            "latency_ms" if !value.as_f64().is_some_and(|x| (0.0..=3_600_000.0).contains(&x)) => {
                "must be a number of milliseconds between 0 and 3600000"
            }
            "fail_rate" | "error_rate" if !value.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)) => {
                "must be a probability between 0 and 1"
            }
            "seed" if value.as_u64().is_none() => "must be a non-negative integer",
            "latency_ms" | "fail_rate" | "error_rate" | "seed" => continue,
            _ => "unknown sim setting (expected latency_ms, fail_rate, error_rate or seed)",
        };
        return Err((path, problem.into()));
    }
    Ok(())
}
