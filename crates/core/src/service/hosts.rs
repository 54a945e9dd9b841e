//! Hosts and device presence: agents register and heartbeat with the devices they
//! see, silent hosts go offline with their devices, and adb discovery reports what a
//! worker's adb lists. A device that comes back is offered to the runs waiting for it;
//! one that goes away keeps its queued runs waiting (they are not failed).

use crate::{
    CoreResult,
    ids::{DeviceId, HostId},
    model::{Driver, Host, StatusSource},
    repo::{
        hosts::{self, NewHost},
        presence::{self, Listed, Scope, Synced},
    },
    service::Engine,
};

/// What a heartbeat (or a registration) answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostReport {
    /// The host after it.
    pub host: Host,
    /// What the device report changed.
    pub devices: Synced,
}

fn host_scope(host: &Host) -> Scope {
    Scope {
        reporter: StatusSource::Host,
        driver: Driver::Host,
        host: Some(host.id),
        by: format!("host {}", host.name),
        pool: host.pool.clone(),
    }
}

impl Engine {
    /// Registers a host agent (or registers it again, for the holder of its secret)
    /// with the devices it sees. The secret is returned for a new host only.
    pub async fn register_host(
        &self,
        new: &NewHost,
        presented: Option<&str>,
        devices: Option<&[Listed]>,
    ) -> CoreResult<(HostReport, Option<String>)> {
        let mut tx = self.pool.begin().await?;
        let (host, secret) = hosts::register(&mut tx, new, presented).await?;
        let synced = match devices {
            Some(d) => presence::sync(&mut tx, &host_scope(&host), d).await?,
            None => Synced::default(),
        };
        tx.commit().await?;
        self.offer_all(&synced.online).await;
        Ok((HostReport { host, devices: synced }, secret))
    }

    /// A heartbeat: the host is alive, and its devices are as listed (when listed).
    pub async fn host_heartbeat(
        &self,
        id: HostId,
        secret: &str,
        agent_version: Option<&str>,
        devices: Option<&[Listed]>,
    ) -> CoreResult<HostReport> {
        let mut tx = self.pool.begin().await?;
        let before = hosts::authenticate(&mut tx, id, secret).await?;
        let host = hosts::beat(&mut tx, &before, agent_version).await?;
        // No device list (the agent's adb failed): liveness only, devices as they were.
        let synced = match devices {
            Some(d) => presence::sync(&mut tx, &host_scope(&host), d).await?,
            None => Synced::default(),
        };
        tx.commit().await?;
        self.offer_all(&synced.online).await;
        Ok(HostReport { host, devices: synced })
    }

    /// Takes offline the hosts silent past their timeout, with their devices.
    pub async fn sweep_hosts(&self) -> CoreResult<Vec<Host>> {
        let mut tx = self.pool.begin().await?;
        let silent = hosts::mark_silent(&mut tx).await?;
        for host in &silent {
            let why = host.status_reason.as_deref().unwrap_or("no heartbeat");
            presence::host_down(&mut tx, host.id, &format!("host {} is offline: {why}", host.name)).await?;
        }
        tx.commit().await?;
        for host in &silent {
            tracing::warn!(host = %host.name, host_id = %host.id, reason = ?host.status_reason, "host offline");
        }
        Ok(silent)
    }

    /// Deletes a host; its devices go offline (their rows stay, for their history).
    pub async fn delete_host(&self, id: HostId) -> CoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let host = hosts::lock(&mut tx, id).await?;
        presence::host_down(&mut tx, id, &format!("host {} was deleted", host.name)).await?;
        hosts::delete(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Syncs what this worker's `adb devices -l` lists: new phones join `pool`.
    pub async fn sync_adb_devices(&self, listing: &[Listed], pool: &str) -> CoreResult<Synced> {
        let scope = Scope {
            reporter: StatusSource::Discovery,
            driver: Driver::Adb,
            host: None,
            by: "adb devices".into(),
            pool: pool.to_string(),
        };
        let mut tx = self.pool.begin().await?;
        let synced = presence::sync(&mut tx, &scope, listing).await?;
        tx.commit().await?;
        self.offer_all(&synced.online).await;
        Ok(synced)
    }

    async fn offer_all(&self, devices: &[DeviceId]) {
        for id in devices {
            self.offer_device(*id).await;
        }
    }
}
