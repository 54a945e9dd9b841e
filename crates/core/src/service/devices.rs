//! Device changes and what they mean for runs: a device that joins, comes back or
//! has its breaker reset is offered to the runs waiting for it; a device deleted or
//! retired ends the runs only it could have served.

use crate::{
    CoreResult,
    ids::DeviceId,
    model::{Device, DeviceStatus},
    repo::{
        devices::{self, DevicePatch, NewDevice},
        runs::{self, parents_of},
    },
    service::Engine,
};

impl Engine {
    /// Registers a device and offers it to waiting runs.
    pub async fn create_device(&self, new: &NewDevice) -> CoreResult<Device> {
        let device = devices::create(&self.pool, new).await?;
        self.offer_device(device.id).await;
        Ok(device)
    }

    /// Changes a device. Retiring it ends the runs only it could serve, in the same
    /// transaction; otherwise it is offered to waiting runs (it may be back online).
    pub async fn update_device(&self, id: DeviceId, patch: &DevicePatch) -> CoreResult<Device> {
        let mut tx = self.pool.begin().await?;
        let device = devices::update(&mut tx, id, patch).await?;
        let ended = if device.status == DeviceStatus::Retired {
            runs::abandon_unservable(&mut tx, id).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.after_ended(&parents_of(&ended)).await;
        self.offer_device(id).await;
        Ok(device)
    }

    /// Deletes a device no run holds (409 otherwise), ending the runs only it could
    /// have served.
    pub async fn delete_device(&self, id: DeviceId) -> CoreResult<()> {
        let mut tx = self.pool.begin().await?;
        devices::lock_for_delete(&mut tx, id).await?;
        let ended = runs::abandon_unservable(&mut tx, id).await?;
        devices::delete(&mut tx, id).await?;
        tx.commit().await?;
        self.after_ended(&parents_of(&ended)).await;
        Ok(())
    }

    /// Closes a device's breaker by hand; waiting runs may use the device at once.
    pub async fn reset_breaker(&self, id: DeviceId) -> CoreResult<Device> {
        let device = devices::reset_breaker(&self.pool, id).await?;
        self.offer_device(id).await;
        Ok(device)
    }

    /// Pushes the queued runs a device could serve now, so new capacity is used at
    /// once. Best effort: the reconciler covers a failure.
    pub async fn offer_device(&self, id: DeviceId) {
        match runs::waiting_for_device(&self.pool, id, 8).await {
            Ok(ids) => {
                self.dispatch(&ids).await;
            }
            Err(e) => tracing::warn!(device_id = %id, error = %e, "could not look for runs waiting for a device"),
        }
    }

    /// Moves on the campaigns whose children just ended.
    pub(crate) async fn after_ended(&self, parents: &[crate::ids::RunId]) {
        for parent in parents {
            if let Err(e) = self.advance_campaign(*parent).await {
                tracing::warn!(campaign_run = %parent, error = %e, "could not advance a campaign; the reconciler will");
            }
        }
    }
}
