//! The queue adapter: Redis (apalis) as a fast, losable delivery channel for run ids.
//!
//! A job carries the run id and nothing Postgres does not already hold. Every key lives
//! under `SWITCHBOARD_NAMESPACE`. apalis-redis only fetches when its worker polls, and a
//! push lands in its `scheduled` set without waking anyone, so after each push we also
//! PUBLISH on `{namespace}:wake`; workers subscribe and poll at once (see
//! `worker::wake`). A lost publish only costs the fallback poll interval.
//!
//! Every delivery gets a fresh task id: apalis' push uses HSETNX on the task id, so a
//! second push of the same id (a re-dispatch after the first was consumed) would be
//! silently dropped.

use std::time::{Duration, Instant};

use apalis::prelude::TaskSink;
use apalis_redis::{Config, RedisStorage};
use futures::StreamExt;
use redis::{
    AsyncCommands, Client,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{CoreError, CoreResult, ids::RunId};

/// What travels through Redis: the run to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunJob {
    /// The run.
    pub run_id: RunId,
}

/// Redis response timeout. redis-rs defaults to 500 ms, and one timed-out response
/// marks an apalis worker dead (DEPENDENCIES.md item 8).
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection manager with our timeouts; connects lazily so a process can start (and
/// answer 503) while Redis is down.
pub fn connection(redis_url: &str) -> CoreResult<ConnectionManager> {
    let client = Client::open(redis_url).map_err(|e| CoreError::BadRequest(format!("invalid REDIS_URL: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// apalis' own list of every queue it has seen, outside any namespace: one member per
/// deployment (`{namespace}:runs:workers`). A deployment removed for good (a test's,
/// a bench's) takes its member out with `Keys::queue_list_member`.
pub const APALIS_QUEUE_LIST: &str = "core:apalis:queues:list";

/// Names of everything this deployment keeps in Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The prefix of every key (`SWITCHBOARD_NAMESPACE`).
    pub namespace: String,
}

impl Keys {
    /// The keys of a namespace.
    pub fn new(namespace: &str) -> Keys {
        Keys { namespace: namespace.to_string() }
    }
    /// The apalis queue of runs; apalis derives its keys (`{queue}:active`, ...) from it.
    pub fn runs_queue(&self) -> String {
        format!("{}:runs", self.namespace)
    }
    /// Pub/sub channel that wakes workers after a push.
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.namespace)
    }
    /// Pub/sub channel of control messages to workers (`cancel:<run id>`).
    pub fn control_channel(&self) -> String {
        format!("{}:control", self.namespace)
    }
    /// Pub/sub channel that wakes the api's feed readers after events commit.
    pub fn feed_channel(&self) -> String {
        format!("{}:feed", self.namespace)
    }
    /// This deployment's member of `APALIS_QUEUE_LIST`.
    pub fn queue_list_member(&self) -> String {
        format!("{}:workers", self.runs_queue())
    }
    /// Pattern matching every key of this namespace.
    pub fn pattern(&self) -> String {
        format!("{}:*", self.namespace)
    }

    /// apalis configuration for the runs queue. Heartbeats every 5 s and orphans after
    /// 30 s: apalis' own orphan recovery is only a backstop for our Postgres leases.
    pub fn apalis_config(&self, batch_size: usize) -> Config {
        Config::default()
            .queue(self.runs_queue())
            .batch_size(batch_size.max(1))
            .heartbeat_interval(Duration::from_secs(5))
            .missed_heartbeats(6)
            .emit_events(false)
            .idempotency_ttl(None)
    }
}

/// Most SCAN pages one trim pass reads (a page is `batch` keys of the whole Redis,
/// shared with other namespaces); a larger keyspace is covered over several passes.
const MAX_SCAN_PAGES: usize = 200;

/// Due scheduled jobs moved per script call by `Queue::promote_due` (far below Lua's
/// `unpack` limit of about 8,000).
pub const PROMOTE_CHUNK: u64 = 1000;
/// Chunks one `promote_due` call moves at most (the rest on its next call).
const MAX_PROMOTE_CHUNKS: usize = 200;

/// `fetch_next.lua`'s first step, bounded: due jobs from the scheduled set (KEYS[1])
/// to the active list (KEYS[2]), at most ARGV[2] of them, signalling (KEYS[3]) as the
/// fetch does.
const PROMOTE_DUE: &str = r#"
local ids = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1], "LIMIT", 0, tonumber(ARGV[2]))
if #ids > 0 then
    redis.call("rpush", KEYS[2], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return #ids
"#;

/// Pushes run ids to Redis and wakes workers.
#[derive(Clone)]
pub struct Queue {
    storage: RedisStorage<RunJob>,
    conn: ConnectionManager,
    keys: Keys,
    /// Where the trimmer's SCAN of stale worker metadata resumes.
    scan_cursor: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Coalesces feed wake-ups: `feed_changed` never waits on Redis.
    feed: std::sync::Arc<FeedWake>,
}

/// The feed wake-up publisher of one process: many calls while one publish is in
/// flight become one more publish, so the rate of PUBLISHes is bounded by Redis round
/// trips, not by the rate of commits.
#[derive(Default)]
struct FeedWake {
    pending: tokio::sync::Notify,
    started: std::sync::OnceLock<()>,
}

impl Queue {
    /// A queue on `redis_url` under `namespace` (connects lazily).
    pub fn new(redis_url: &str, namespace: &str) -> CoreResult<Queue> {
        let conn = connection(redis_url)?;
        let keys = Keys::new(namespace);
        let storage = RedisStorage::new(conn.clone()).with_config(keys.apalis_config(1));
        Ok(Queue { storage, conn, keys, scan_cursor: Default::default(), feed: Default::default() })
    }

    /// The names of its keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Its Redis connection.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Pushes one run id and wakes the workers.
    pub async fn push(&self, run_id: RunId) -> CoreResult<()> {
        self.push_many(&[run_id]).await
    }

    /// Moves the jobs of apalis' `scheduled` set that are due onto its active list,
    /// [`PROMOTE_CHUNK`] at a time, until fewer than that are left; returns how many.
    ///
    /// Why: apalis-redis 1.0's fetch (`fetch_next.lua`) moves *every* due scheduled job
    /// with one Lua `unpack`, which fails beyond about 8,000 ids ("too many results to
    /// unpack"). Every push lands in that set, so once more than that pile up between
    /// two fetches (workers busy or down while a big batch or the reconciler pushes),
    /// every poll fails, the consumer dies at each restart, and the queue stalls for good.
    /// Workers call this before each consumer start and every second: the fetch then
    /// never finds more than a chunk's worth to move. The same move, in the same atomic
    /// way, so running it beside apalis changes nothing else.
    pub async fn promote_due(&self) -> CoreResult<u64> {
        let cfg = self.keys.apalis_config(1);
        let script = redis::Script::new(PROMOTE_DUE);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut conn = self.conn.clone();
        let mut total = 0;
        for _ in 0..MAX_PROMOTE_CHUNKS {
            let moved: u64 = script
                .key(cfg.scheduled_jobs_set())
                .key(cfg.active_jobs_list())
                .key(cfg.signal_list())
                .arg(now)
                .arg(PROMOTE_CHUNK)
                .invoke_async(&mut conn)
                .await?;
            total += moved;
            if moved < PROMOTE_CHUNK {
                break;
            }
        }
        Ok(total)
    }

    /// Pushes run ids (in order) and wakes the workers once.
    pub async fn push_many(&self, run_ids: &[RunId]) -> CoreResult<()> {
        if run_ids.is_empty() {
            return Ok(());
        }
        match self.push_once(run_ids).await {
            // A connection that broke earlier fails its first command and reconnects
            // behind it: one quick second try saves the delivery.
            Err(CoreError::Redis(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                self.push_once(run_ids).await?;
            }
            other => other?,
        }
        self.wake().await;
        Ok(())
    }

    async fn push_once(&self, run_ids: &[RunId]) -> CoreResult<()> {
        let mut storage = self.storage.clone();
        let jobs = run_ids.iter().map(|id| RunJob { run_id: *id }).collect::<Vec<_>>();
        let push = async {
            if jobs.len() == 1 {
                storage.push(jobs.into_iter().next().expect("one job")).await
            } else {
                storage.push_bulk(jobs).await
            }
        };
        tokio::time::timeout(REDIS_RESPONSE_TIMEOUT, push)
            .await
            .map_err(|_| CoreError::Unavailable("redis push timed out".into()))?
            .map_err(|e| CoreError::Redis(format!("push failed: {e}")))
    }

    /// Tells workers to poll now. Best effort: the fallback poll covers a lost wake-up.
    pub async fn wake(&self) {
        let mut conn = self.conn.clone();
        let res: redis::RedisResult<i64> = conn.publish(self.keys.wake_channel(), 1).await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "wake-up publish failed");
        }
    }

    /// Says that events just committed, so the api's feed readers look now rather than
    /// at their fallback poll. Call after the commit (a reader woken before it would
    /// find nothing); returns at once. Best effort, like every wake-up: the table is
    /// the record, and a lost message costs the fallback interval.
    pub fn feed_changed(&self) {
        let feed = self.feed.clone();
        feed.started.get_or_init(|| {
            let (feed, mut conn, channel) = (self.feed.clone(), self.conn.clone(), self.keys.feed_channel());
            tokio::spawn(async move {
                loop {
                    // A `notify_one` with nobody waiting keeps its permit: none is lost.
                    feed.pending.notified().await;
                    let res: redis::RedisResult<i64> = conn.publish(&channel, 1).await;
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "feed wake-up publish failed");
                    }
                }
            });
        });
        feed.pending.notify_one();
    }

    /// Asks whichever worker runs `run_id` to check it now (it was cancelled). Best
    /// effort: the lease heartbeat notices within a third of the lease TTL anyway.
    pub async fn signal_cancel(&self, run_id: RunId) {
        let mut conn = self.conn.clone();
        let res: redis::RedisResult<i64> = conn.publish(self.keys.control_channel(), format!("cancel:{run_id}")).await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "cancel signal publish failed");
        }
    }

    /// Round trip to Redis, for health checks.
    pub async fn ping(&self) -> CoreResult<Duration> {
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(start.elapsed())
    }

    /// Removes what apalis keeps of finished deliveries (the `done` and `dead` sets, their
    /// data-hash fields and meta hashes) and of workers gone for `worker_gone`, in
    /// batches of `batch` so Redis is never blocked for long. Postgres holds the history;
    /// Redis only ever needs what is still to be delivered. Returns the entries removed.
    pub async fn trim(&self, batch: usize, max_batches: usize, worker_gone: Duration) -> CoreResult<usize> {
        let cfg = self.keys.apalis_config(1);
        let mut conn = self.conn.clone();
        let mut removed = 0;
        for set in [cfg.done_jobs_set(), cfg.dead_jobs_set()] {
            for _ in 0..max_batches {
                let ids: Vec<String> = redis::cmd("SPOP").arg(&set).arg(batch).query_async(&mut conn).await?;
                if ids.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                pipe.cmd("HDEL").arg(cfg.job_data_hash()).arg(&ids).ignore();
                let metas: Vec<String> = ids.iter().map(|id| format!("{}:{id}", cfg.job_meta_hash())).collect();
                pipe.cmd("DEL").arg(&metas).ignore();
                let _: () = pipe.query_async(&mut conn).await?;
                removed += ids.len();
                if ids.len() < batch {
                    break;
                }
            }
        }
        // Workers that stopped heartbeating long ago, with nothing in flight.
        let cutoff = chrono::Utc::now().timestamp() - worker_gone.as_secs() as i64;
        let gone: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(cfg.workers_set())
            .arg(0)
            .arg(cutoff)
            .arg("LIMIT")
            .arg(0)
            .arg(batch)
            .query_async(&mut conn)
            .await?;
        for name in gone {
            let inflight = format!("{}:{name}", cfg.inflight_jobs_set());
            let busy: u64 = redis::cmd("SCARD").arg(&inflight).query_async(&mut conn).await?;
            if busy == 0 {
                let _: () = redis::pipe()
                    .cmd("ZREM")
                    .arg(cfg.workers_set())
                    .arg(&name)
                    .ignore()
                    .cmd("DEL")
                    .arg(format!("{}:workers:metadata:{name}", self.keys.runs_queue()))
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                removed += 1;
            }
        }
        removed += self.trim_unregistered(batch).await?;
        Ok(removed)
    }

    /// Deletes the metadata of workers no longer registered at all (apalis never
    /// deletes it). SCAN walks the whole keyspace of a shared Redis a page at a time,
    /// so every page is read (up to `MAX_SCAN_PAGES` a pass), not just the first.
    async fn trim_unregistered(&self, batch: usize) -> CoreResult<usize> {
        let cfg = self.keys.apalis_config(1);
        let mut conn = self.conn.clone();
        let prefix = format!("{}:workers:metadata:", self.keys.runs_queue());
        let pattern = format!("{prefix}*");
        let mut cursor = self.scan_cursor.load(std::sync::atomic::Ordering::Relaxed);
        let mut removed = 0usize;
        for _ in 0..MAX_SCAN_PAGES {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(batch)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                let name = key.trim_start_matches(&prefix).to_string();
                let score: Option<f64> =
                    redis::cmd("ZSCORE").arg(cfg.workers_set()).arg(&name).query_async(&mut conn).await?;
                if score.is_none() {
                    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
                    removed += 1;
                }
            }
            cursor = next;
            if next == 0 {
                break;
            }
        }
        self.scan_cursor.store(cursor, std::sync::atomic::Ordering::Relaxed);
        Ok(removed)
    }

    /// Jobs waiting in Redis (pending plus scheduled), for system info.
    pub async fn depth(&self) -> CoreResult<u64> {
        let cfg = self.keys.apalis_config(1);
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) =
            redis::pipe().llen(cfg.active_jobs_list()).zcard(cfg.scheduled_jobs_set()).query_async(&mut conn).await?;
        Ok(active + scheduled)
    }
}

/// What a pub/sub follower hears (`follow`).
#[derive(Debug)]
pub enum Heard {
    /// Subscribed (again): whatever was published while away was missed.
    Subscribed,
    /// A message on `channel`.
    Message {
        /// Its channel.
        channel: String,
        /// Its payload.
        payload: String,
    },
    /// The subscription was lost; resubscribing with backoff.
    Lost,
}

/// Follows `channels` until `stop`, resubscribing with capped exponential backoff
/// (100 ms to 5 s) whenever the connection fails, and tells `on` what it hears. Every
/// wake-up of ours (workers', the feed's) is best effort on top of this: a message
/// lost while away costs a fallback poll, and `Subscribed` lets the caller look at once.
pub async fn follow(redis_url: &str, channels: &[&str], stop: &CancellationToken, mut on: impl FnMut(Heard)) {
    let mut delay = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match subscribe(redis_url, channels).await {
            Ok(mut pubsub) => {
                delay = Duration::from_millis(100);
                on(Heard::Subscribed);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        msg = messages.next() => match msg {
                            Some(msg) => on(Heard::Message {
                                channel: msg.get_channel_name().to_string(),
                                payload: msg.get_payload::<String>().unwrap_or_default(),
                            }),
                            None => break,
                        },
                    }
                }
                on(Heard::Lost);
                tracing::warn!(channels = ?channels, "pub/sub subscription lost; resubscribing");
            }
            Err(e) => tracing::warn!(channels = ?channels, error = %e, "cannot subscribe; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A pub/sub connection subscribed to `channels` (connect bounded by 3 s).
pub async fn subscribe(redis_url: &str, channels: &[&str]) -> redis::RedisResult<redis::aio::PubSub> {
    let client = redis::Client::open(redis_url)?;
    let mut pubsub =
        tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub()).await.map_err(|_| {
            redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))
        })??;
    for channel in channels {
        pubsub.subscribe(*channel).await?;
    }
    Ok(pubsub)
}
