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
use redis::{
    AsyncCommands, Client,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CoreError, CoreResult};

/// What travels through Redis: the run to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunJob {
    pub run_id: Uuid,
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

/// Names of everything this deployment keeps in Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    pub namespace: String,
}

impl Keys {
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

/// Pushes run ids to Redis and wakes workers.
#[derive(Clone)]
pub struct Queue {
    storage: RedisStorage<RunJob>,
    conn: ConnectionManager,
    keys: Keys,
}

impl Queue {
    pub fn new(redis_url: &str, namespace: &str) -> CoreResult<Queue> {
        let conn = connection(redis_url)?;
        let keys = Keys::new(namespace);
        let storage = RedisStorage::new(conn.clone()).with_config(keys.apalis_config(1));
        Ok(Queue { storage, conn, keys })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Pushes one run id and wakes the workers.
    pub async fn push(&self, run_id: Uuid) -> CoreResult<()> {
        self.push_many(&[run_id]).await
    }

    /// Pushes run ids (in order) and wakes the workers once.
    pub async fn push_many(&self, run_ids: &[Uuid]) -> CoreResult<()> {
        if run_ids.is_empty() {
            return Ok(());
        }
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
            .map_err(|e| CoreError::Redis(format!("push failed: {e}")))?;
        self.wake().await;
        Ok(())
    }

    /// Tells workers to poll now. Best effort: the fallback poll covers a lost wake-up.
    pub async fn wake(&self) {
        let mut conn = self.conn.clone();
        let res: redis::RedisResult<i64> = conn.publish(self.keys.wake_channel(), 1).await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "wake-up publish failed");
        }
    }

    /// Round trip to Redis, for health checks.
    pub async fn ping(&self) -> CoreResult<Duration> {
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(start.elapsed())
    }

    /// Jobs waiting in Redis (pending plus scheduled), for system info.
    pub async fn depth(&self) -> CoreResult<u64> {
        let cfg = self.keys.apalis_config(1);
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) = redis::pipe()
            .llen(cfg.active_jobs_list())
            .zcard(cfg.scheduled_jobs_set())
            .query_async(&mut conn)
            .await?;
        Ok(active + scheduled)
    }
}
