//! Wake-ups: apalis-redis only fetches when polled, and its push does not signal
//! workers, so the queue adapter PUBLISHes on `{namespace}:wake` after every push and
//! this subscriber turns each message into an immediate poll of every local apalis
//! worker. The fallback poll interval covers lost messages and Redis outages.

use std::sync::{Arc, Mutex};

use futures::channel::mpsc;
use switchboard_core::{
    ids::RunId,
    queue::{Heard, follow},
};
use tokio_util::sync::CancellationToken;

/// Called with the run id of each `cancel:<run id>` control message.
pub type CancelHook = Arc<dyn Fn(RunId) + Send + Sync>;

/// Fans wake-ups out to the apalis workers of this process, and control messages to
/// the executor.
#[derive(Clone, Default)]
pub struct WakeHub {
    senders: Arc<Mutex<Vec<mpsc::Sender<()>>>>,
    on_cancel: Arc<Mutex<Option<CancelHook>>>,
}

impl WakeHub {
    /// A stream that yields once per wake-up (coalesced), for one apalis worker.
    pub fn subscribe(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        if let Ok(mut senders) = self.senders.lock() {
            senders.push(tx);
        }
        rx
    }

    pub fn wake_all(&self) {
        if let Ok(mut senders) = self.senders.lock() {
            // A full channel already has a wake-up pending; a closed one is dropped.
            senders.retain_mut(|tx| match tx.try_send(()) {
                Ok(()) => true,
                Err(e) => !e.is_disconnected(),
            });
        }
    }

    pub fn on_cancel(&self, hook: CancelHook) {
        if let Ok(mut h) = self.on_cancel.lock() {
            *h = Some(hook);
        }
    }

    fn control(&self, payload: &str) {
        if let Some(id) = payload.strip_prefix("cancel:").and_then(|s| s.parse::<RunId>().ok()) {
            let hook = self.on_cancel.lock().ok().and_then(|h| h.clone());
            if let Some(hook) = hook {
                hook(id);
            }
        }
    }

    /// Listens on the wake and control channels until `stop`, reconnecting with backoff.
    pub async fn listen(self, redis_url: String, channel: String, control: String, stop: CancellationToken) {
        follow(&redis_url, &[&channel, &control], &stop, |heard| match heard {
            // Whatever was pushed while we were away is fetched now.
            Heard::Subscribed => self.wake_all(),
            Heard::Message { channel, payload } if channel == control => self.control(&payload),
            Heard::Message { .. } => self.wake_all(),
            Heard::Lost => {}
        })
        .await;
    }
}
