//! Group commit, written once: requests that arrive while earlier ones are being
//! written are written together, by one call of a batch writer. The API's starts
//! (`service::batch`) and a worker's outcomes (`runs::finish_many`) use it.
//!
//! No request waits for a batch to fill. Up to `lanes` writes are in flight at once; a
//! request that arrives while a lane is free is written at once (after at most
//! `window`, 0 by default, for others to join). Only what arrives while every lane is
//! busy waits, and goes in the next write: the busier the process, the bigger the
//! batches, and an idle one adds no delay.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{CoreError, CoreResult};

/// How a group gathers.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// What it writes, for logs and errors ("starts", "outcomes").
    pub what: &'static str,
    /// Writes in flight at once.
    pub lanes: usize,
    /// The most requests per write.
    pub max: usize,
    /// How long a request waits for others once a lane is free.
    pub window: Duration,
}

struct Pending<I, O> {
    item: I,
    reply: oneshot::Sender<CoreResult<O>>,
}

/// The sending side of a group; cheap to clone. The gathering task ends when every
/// clone is dropped.
pub struct Group<I, O> {
    tx: mpsc::UnboundedSender<Pending<I, O>>,
    what: &'static str,
}

impl<I, O> Clone for Group<I, O> {
    fn clone(&self) -> Self {
        Group { tx: self.tx.clone(), what: self.what }
    }
}

impl<I, O> Group<I, O>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    /// Starts the gathering task. `write` writes a batch and returns one output per
    /// request, in order; should it fail, each request of that batch is written alone,
    /// so that one request's fault is only its own.
    pub fn spawn<W, F>(settings: GroupSettings, write: W) -> Group<I, O>
    where
        W: Fn(Arc<Vec<I>>) -> F + Send + Sync + 'static,
        F: Future<Output = CoreResult<Vec<O>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(gather(settings, Arc::new(write), rx));
        Group { tx, what: settings.what }
    }

    /// Writes `item` with whatever arrives with it; its own output.
    pub async fn submit(&self, item: I) -> CoreResult<O> {
        let (reply, answer) = oneshot::channel();
        let stopped = || CoreError::Unavailable(format!("the writer of {} has stopped", self.what));
        self.tx.send(Pending { item, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn gather<I, O, W, F>(s: GroupSettings, write: Arc<W>, mut rx: mpsc::UnboundedReceiver<Pending<I, O>>)
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
    W: Fn(Arc<Vec<I>>) -> F + Send + Sync + 'static,
    F: Future<Output = CoreResult<Vec<O>>> + Send + 'static,
{
    let lanes = Arc::new(Semaphore::new(s.lanes.max(1)));
    while let Some(first) = rx.recv().await {
        // Waiting for a lane is where a busy process's requests gather.
        let Ok(lane) = lanes.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + s.window;
        while batch.len() < s.max.max(1) {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) if s.window.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    _ => break,
                },
            }
        }
        let write = write.clone();
        tokio::spawn(async move {
            write_batch(s.what, &*write, batch).await;
            drop(lane);
        });
    }
}

async fn write_batch<I, O, W, F>(what: &str, write: &W, batch: Vec<Pending<I, O>>)
where
    I: Clone,
    W: Fn(Arc<Vec<I>>) -> F,
    F: Future<Output = CoreResult<Vec<O>>>,
{
    let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().map(|p| (p.item, p.reply)).unzip();
    let items = Arc::new(items);
    let n = items.len();
    match write(items.clone()).await {
        Ok(outputs) if outputs.len() == n => {
            replies.into_iter().zip(outputs).for_each(|(reply, o)| drop(reply.send(Ok(o))));
        }
        Ok(_) => {
            let e = format!("the writer of {what} answered a batch of {n} with another number of results");
            replies.into_iter().for_each(|reply| drop(reply.send(Err(CoreError::Internal(e.clone())))));
        }
        Err(e) if n == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(count = n, error = %e, "could not write {what} together; writing each alone");
            for (item, reply) in items.iter().zip(replies) {
                let one = write(Arc::new(vec![item.clone()])).await;
                let _ = reply.send(one.and_then(|mut o| {
                    o.pop().ok_or_else(|| CoreError::Internal(format!("the writer of {what} answered nothing")))
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn settings(lanes: usize) -> GroupSettings {
        GroupSettings { what: "numbers", lanes, max: 100, window: Duration::ZERO }
    }

    /// A writer that doubles its inputs, records each batch's size, takes 20 ms, and
    /// fails any batch of several that holds a 13.
    fn doubler(sizes: Arc<Mutex<Vec<usize>>>) -> Group<u32, u32> {
        Group::spawn(settings(1), move |items: Arc<Vec<u32>>| {
            let sizes = sizes.clone();
            async move {
                sizes.lock().unwrap().push(items.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
                if items.len() > 1 && items.contains(&13) {
                    return Err(CoreError::Internal("13 in a batch".into()));
                }
                Ok(items.iter().map(|i| i * 2).collect())
            }
        })
    }

    #[tokio::test]
    async fn what_arrives_while_a_write_runs_is_written_together_each_with_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let group = doubler(sizes.clone());
        let first = tokio::spawn({
            let group = group.clone();
            async move { group.submit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let answers = futures::future::join_all((1..10).map(|i| group.submit(i))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(answers, (1..10).map(|i| i * 2).collect::<Vec<_>>());
        // The first is written alone at once; the other nine gathered behind it.
        assert_eq!(*sizes.lock().unwrap(), vec![1, 9]);
    }

    #[tokio::test]
    async fn a_failed_batch_is_written_again_one_by_one() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let group = doubler(sizes.clone());
        let answers = futures::future::join_all([1, 12, 13, 14].map(|i| group.submit(i))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, vec![2, 24, 26, 28]);
        // Together first, then each alone.
        assert_eq!(*sizes.lock().unwrap(), vec![4, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn an_idle_group_writes_at_once_with_free_lanes() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let group = Group::spawn(settings(4), {
            let sizes = sizes.clone();
            move |items: Arc<Vec<u32>>| {
                sizes.lock().unwrap().push(items.len());
                async move { Ok(items.to_vec()) }
            }
        });
        for i in 0..3 {
            assert_eq!(group.submit(i).await.unwrap(), i);
        }
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1, 1]);
    }
}
