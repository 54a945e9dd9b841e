//! adb discovery: with `SWITCHBOARD_ADB_DISCOVER=true`, a worker registers the phones
//! its `adb devices -l` lists and keeps the registry following it (new phones join
//! `SWITCHBOARD_ADB_POOL`; vanished and unauthorized ones go `offline` with a reason and
//! come back when seen again; their queued runs wait).
//!
//! Run it on one worker per adb server: two workers listing different phones would
//! each take the other's offline.

use std::time::Duration;

use switchboard_core::service::Engine;
use tokio_util::sync::CancellationToken;

use crate::drivers::adb::AdbDriver;

/// Lists and syncs every `interval` until `stop`.
pub async fn run(engine: Engine, adb: AdbDriver, pool: String, interval: Duration, stop: CancellationToken) {
    tracing::info!(pool = %pool, interval_s = interval.as_secs(), "adb discovery on");
    loop {
        once(&engine, &adb, &pool, &stop).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One pass. When adb itself fails (missing, its server down) nothing is changed: an
/// empty answer must not take every phone offline.
pub async fn once(engine: &Engine, adb: &AdbDriver, pool: &str, stop: &CancellationToken) {
    let listing = match adb.list_devices(adb.call_timeout(), stop).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "adb discovery: adb devices failed; the registry is left as it is");
            return;
        }
    };
    match engine.sync_adb_devices(&listing, pool).await {
        Ok(s) if s.created.is_empty() && s.online.is_empty() && s.offline.is_empty() => {}
        Ok(s) => tracing::info!(created = s.created.len(), online = s.online.len(), offline = s.offline.len(),
            conflicts = ?s.conflicts, "adb discovery: the registry follows adb devices"),
        Err(e) => tracing::warn!(error = %e, "adb discovery: could not sync the registry"),
    }
}
