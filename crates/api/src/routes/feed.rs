//! The event feed: `GET /api/v1/events` (a cursor over HTTP, for clients that poll)
//! and `GET /api/v1/ws` (the same feed, live). Both read `repo::feed`, which delivers
//! every event once, in one order, whichever api process a client reaches. See
//! `docs/feed.md`.

use std::{collections::HashMap, time::Duration};

use axum::{
    Json,
    extract::{
        Query, State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
    },
    response::{IntoResponse, Response},
};
use futures::SinkExt;
use serde::Serialize;
use std::sync::{Arc, atomic::Ordering};
use switchboard_core::{
    events::Event,
    ids::EventId,
    queue::Heard,
    repo::feed::{self, Filter, Position, Topic},
};

use tokio::sync::broadcast;

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::QueryParams,
};

/// Events a WebSocket read takes at once.
const WS_BATCH: i64 = 200;

/// How long the close frame may wait to be sent: behind a slow consumer's full buffer
/// it goes out only once the client reads again; past this the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Close code: the client did not keep up (a send waited past the send timeout); it
/// should reconnect with `since` = the last event id it received.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code: no pong within a ping interval.
pub const CLOSE_NO_PONG: u16 = 4001;
/// Close code: the feed could not be read (Postgres unavailable); reconnect later.
pub const CLOSE_UNAVAILABLE: u16 = 1013;

/// A page of the feed; pass `next_cursor` back as `since`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedPage {
    /// Events in feed order.
    pub items: Vec<Event>,
    /// Where to go on from (an event id); `null` while the feed is empty.
    pub next_cursor: Option<String>,
}

/// The filters both feed routes take, as the OpenAPI document shows them (they are
/// read by `filter`).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedFilters {
    /// Comma-separated: runs, devices, schedules, hosts (default all).
    pub topics: Option<String>,
    /// Only this run's events.
    pub run_id: Option<uuid::Uuid>,
    /// Only this campaign run's events and its children's.
    pub campaign_id: Option<uuid::Uuid>,
    /// Only events about this device.
    pub device_id: Option<uuid::Uuid>,
    /// Only events about devices of this pool.
    pub pool: Option<String>,
}

const FILTERS: [&str; 6] = ["since", "topics", "run_id", "campaign_id", "device_id", "pool"];

/// Reads the filters of a feed request.
fn filter(q: &QueryParams) -> ApiResult<Filter> {
    let topics = match q.str("topics") {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<Topic>().map_err(|e| ApiError::invalid("topics", &e)))
            .collect::<ApiResult<_>>()?,
    };
    Ok(Filter {
        topics,
        run_id: q.id("run_id")?,
        campaign_id: q.id("campaign_id")?,
        device_id: q.id("device_id")?,
        pool: q.str("pool").map(str::to_string),
    })
}

/// The place just after the client's `since`; `None` when it gave none.
async fn since(state: &AppState, q: &QueryParams) -> ApiResult<Option<Position>> {
    let Some(id) = q.int("since")? else { return Ok(None) };
    if id == 0 {
        return Ok(Some(Position::default()));
    }
    feed::position_of(&state.engine.pool, EventId(id))
        .await?
        .map(Some)
        .ok_or_else(|| ApiError::invalid("since", "is not the id of an event (give 0 to start from the first)"))
}

/// `GET /api/v1/events?since=&topics=&run_id=&campaign_id=&device_id=&pool=&limit=`.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    operation_id = "listEvents",
    tag = "events",
    params(
        ("since" = Option<i64>, Query, minimum = 0, description = "The last event id seen (the previous page's next_cursor); absent or 0: from the first event"),
        FeedFilters,
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "Page size (default 50)"),
    ),
    responses((status = 200, description = "The next events, in feed order", body = FeedPage))
)]
pub async fn events(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<FeedPage>> {
    let allowed: Vec<&str> = FILTERS.iter().copied().chain(["limit"]).collect();
    let q = QueryParams::new(q, &allowed)?;
    let filter = filter(&q)?;
    let after = since(&state, &q).await?.unwrap_or_default();
    let batch = feed::read(&state.engine.pool, after, &filter, q.limit()?).await?;
    let next_cursor = (batch.next.id.0 > 0).then(|| batch.next.id.to_string());
    Ok(Json(FeedPage { items: batch.events.into_iter().map(|(_, e)| e).collect(), next_cursor }))
}

/// `GET /api/v1/ws?since=&topics=&run_id=&campaign_id=&device_id=&pool=`: every event
/// after `since` (without it, from now on), then the live feed; each message is one
/// event as JSON. The token may come as `?token=` (browsers cannot set headers on a
/// WebSocket); the request log never shows query strings.
#[utoipa::path(
    get,
    path = "/api/v1/ws",
    operation_id = "feed",
    tag = "events",
    params(
        ("since" = Option<i64>, Query, minimum = 0, description = "The last event id received; absent: only what comes next"),
        FeedFilters,
        ("token" = Option<String>, Query, description = "The API token, when no Authorization header can be sent"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket feed: text messages, one event each (the Event schema)"),
        (status = 400, description = "Not a WebSocket upgrade", body = crate::error::ErrorBody),
        (status = 426, description = "The connection cannot be upgraded", body = crate::error::ErrorBody),
    )
)]
pub async fn ws(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let allowed: Vec<&str> = FILTERS.iter().copied().chain(["token"]).collect();
    let q = QueryParams::new(q, &allowed)?;
    // The slot is taken here, before the 101, so two upgrades at once cannot both
    // pass the cap; it is given back when the client's task ends (or the upgrade fails
    // and the task never starts).
    let slot = Slot(state.ws_clients.clone());
    if state.ws_clients.fetch_add(1, Ordering::Relaxed) >= state.config.ws_max_clients {
        let mut refused = ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("this api process already serves {} WebSocket clients; retry shortly", state.config.ws_max_clients),
        )
        .into_response();
        refused.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
        return Ok(refused);
    }
    switchboard_core::meters::ws_clients(state.ws_clients.load(Ordering::Relaxed));
    let filter = filter(&q)?;
    let start = match since(&state, &q).await? {
        Some(p) => p,
        None => feed::head(&state.engine.pool).await?,
    };
    // The feed's place at the start, for a client that gave no `since`: if it drops
    // before its first event, it can resume from here without losing what came between.
    let cursor = start.id.to_string();
    let mut resp =
        upgrade.max_message_size(64 * 1024).on_upgrade(move |socket| follow(state, socket, filter, start, slot));
    if let Ok(v) = axum::http::HeaderValue::from_str(&cursor) {
        resp.headers_mut().insert("x-feed-cursor", v);
    }
    Ok(resp)
}

/// What the process-wide reader found after `from`: every event up to `next`, each
/// with its JSON written once for all clients.
#[derive(Debug)]
pub struct Shared {
    /// Where the read started.
    pub from: Position,
    /// Where it ended: every event in `(from, next]` is in `events`.
    pub next: Position,
    /// The events, in feed order.
    pub events: Vec<(Position, Event, Utf8Bytes)>,
}

/// Events the process-wide reader takes at once.
const SHARED_BATCH: i64 = 1000;

/// The one reader of the feed on this api process: it follows the head, reads what is
/// new once, and hands it to every WebSocket client that is caught up. Clients that
/// are behind, or that fall behind (the channel keeps the last 32 reads), read the
/// database themselves; nothing is held for a slow client. The events table stays the
/// record: a process that dies loses nothing its clients cannot read again with
/// `since`.
///
/// It reads when woken (Redis pub/sub: writers publish after their commits, see
/// `Queue::feed_changed`), and otherwise every `FALLBACK` (every `UNSUBSCRIBED` while
/// it has no subscription), which covers a lost message, a writer that does not
/// publish, and events held behind the line by a transaction that has not ended.
pub async fn share(
    pool: sqlx::PgPool,
    wake: Wake,
    out: broadcast::Sender<Arc<Shared>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let woken = Arc::new(tokio::sync::Notify::new());
    let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(listen(wake, woken.clone(), listening.clone(), stop.clone()));
    let mut at = None;
    loop {
        let (more, held) = match at {
            None => {
                at = feed::head(&pool).await.ok();
                (false, false)
            }
            Some(from) => {
                let read = read_shared(&pool, from, &out).await;
                at = Some(read.next);
                (read.full, read.held)
            }
        };
        if more {
            continue;
        }
        // Committed events held behind the line by an older transaction: look again
        // shortly rather than at the fallback, since that transaction's own commit may
        // not publish (a device edit, a claim's first statements) and a wake-up that
        // came before it was spent on the read that found them held.
        let wait = if held {
            RECHECK
        } else if listening.load(Ordering::Relaxed) {
            FALLBACK
        } else {
            UNSUBSCRIBED
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = woken.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Look again this soon while committed events wait behind the line.
const RECHECK: Duration = Duration::from_millis(10);

/// Read when no wake-up comes.
const FALLBACK: Duration = Duration::from_millis(100);
/// Read while the wake-up subscription is down.
const UNSUBSCRIBED: Duration = Duration::from_millis(25);

/// Where the feed's wake-ups come from: Redis and its channels.
#[derive(Debug, Clone)]
pub struct Wake {
    /// `REDIS_URL`.
    pub redis_url: String,
    /// The channels whose messages mean "events committed".
    pub channels: Vec<String>,
}

/// What one shared read did.
struct SharedRead {
    /// Where the reader stands now.
    next: Position,
    /// The batch was full: read again at once.
    full: bool,
    /// Committed events wait behind the line.
    held: bool,
}

/// One shared read from `from`: hands the batch out. A failed read hands out nothing
/// and stays put.
async fn read_shared(pool: &sqlx::PgPool, from: Position, out: &broadcast::Sender<Arc<Shared>>) -> SharedRead {
    match feed::read(pool, from, &Filter::default(), SHARED_BATCH).await {
        Ok(batch) if batch.next > from => {
            let (full, held) = (batch.events.len() as i64 >= SHARED_BATCH, batch.held);
            let events = batch
                .events
                .into_iter()
                .map(|(p, e)| {
                    let json = serde_json::to_string(&e).unwrap_or_default();
                    (p, e, Utf8Bytes::from(json))
                })
                .collect();
            let _ = out.send(Arc::new(Shared { from, next: batch.next, events }));
            SharedRead { next: batch.next, full, held }
        }
        Ok(batch) => SharedRead { next: from, full: false, held: batch.held },
        Err(e) => {
            tracing::debug!(error = %e, "the shared feed reader could not read");
            SharedRead { next: from, full: false, held: false }
        }
    }
}

/// Turns every message on the wake-up channels into a `woken` notification (many
/// messages during one read become one more read), resubscribing with backoff.
async fn listen(
    wake: Wake,
    woken: Arc<tokio::sync::Notify>,
    listening: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
) {
    let channels: Vec<&str> = wake.channels.iter().map(String::as_str).collect();
    switchboard_core::queue::follow(&wake.redis_url, &channels, &stop, |heard| match heard {
        Heard::Subscribed => listening.store(true, Ordering::Relaxed),
        Heard::Message { .. } => woken.notify_one(),
        Heard::Lost => listening.store(false, Ordering::Relaxed),
    })
    .await;
}

/// One of the process's WebSocket client places; given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.0.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        switchboard_core::meters::ws_clients(left);
    }
}

/// Why a WebSocket ends: a close frame to send, or the peer already gone.
type End = Option<(u16, &'static str)>;

/// One WebSocket client's connection and state.
struct Client {
    socket: WebSocket,
    filter: Filter,
    at: Position,
    send_timeout: Duration,
    ping: tokio::time::Interval,
    pong_due: bool,
}

/// The ping timer: a tick missed while catching up is not made up for in a burst (two
/// ticks back to back would close a live client as if it had not answered).
fn ping_timer(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Serves one WebSocket: catches up from the database, then takes what the shared
/// reader hands out, back to the database whenever it is behind it.
async fn follow(state: AppState, socket: WebSocket, filter: Filter, at: Position, slot: Slot) {
    let ping_every = Duration::from_secs(state.config.ws_ping_s.max(1));
    let mut c = Client {
        socket,
        filter,
        at,
        send_timeout: Duration::from_secs(state.config.ws_send_timeout_s.max(1)),
        ping: ping_timer(ping_every),
        pong_due: false,
    };
    // Subscribed before catching up, so nothing handed out meanwhile is missed.
    let mut shared = state.feed.subscribe();
    let end = loop {
        if let Err(end) = c.catch_up(&state.engine.pool).await {
            break end;
        }
        if let Err(end) = c.live(&mut shared, &state.stop).await {
            break end;
        }
    };
    if let Some((code, why)) = end {
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(why) };
        let _ = tokio::time::timeout(CLOSE_GRACE, c.socket.send(Message::Close(Some(frame)))).await;
    }
    // Counted until its close is sent: the process waits for that at shutdown.
    drop(slot);
}

impl Client {
    /// Reads the database from `at` until a read comes back short (caught up).
    async fn catch_up(&mut self, pool: &sqlx::PgPool) -> Result<(), End> {
        loop {
            let batch = feed::read(pool, self.at, &self.filter, WS_BATCH).await.map_err(|e| {
                tracing::warn!(error = %e, "the feed could not be read; closing a WebSocket");
                Some((CLOSE_UNAVAILABLE, "the feed is unavailable; reconnect with since"))
            })?;
            let texts = batch.events.iter().map(|(_, e)| Utf8Bytes::from(serde_json::to_string(e).unwrap_or_default()));
            self.send_all(texts.collect()).await?;
            self.at = batch.next;
            if (batch.events.len() as i64) < WS_BATCH {
                return Ok(());
            }
        }
    }

    /// Takes the shared reads while they follow on from `at`; returns `Ok` when the
    /// client must read the database again (behind, or a filter only it can apply).
    async fn live(
        &mut self,
        shared: &mut broadcast::Receiver<Arc<Shared>>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), End> {
        // The time spent catching up (not reading the socket) is not held against it.
        self.ping.reset();
        self.pong_due = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Err(Some((1001, "the server is stopping; reconnect with since"))),
                got = shared.recv() => match got {
                    Ok(b) if b.next <= self.at => {}
                    Ok(b) if b.from > self.at || self.filter.needs_database() => return Ok(()),
                    Ok(b) => {
                        let mine = b.events.iter().filter(|(p, e, _)| *p > self.at && self.filter.matches(e) == Some(true));
                        self.send_all(mine.map(|(_, _, json)| json.clone()).collect()).await?;
                        self.at = b.next;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                    Err(broadcast::error::RecvError::Closed) => return Err(Some((1001, "the server is stopping; reconnect with since"))),
                },
                _ = self.ping.tick() => {
                    if self.pong_due {
                        return Err(Some((CLOSE_NO_PONG, "no pong within the ping interval")));
                    }
                    self.pong_due = true;
                    // Bounded like every send: a peer whose buffer stays full is closed,
                    // not waited on for ever.
                    match tokio::time::timeout(self.send_timeout, self.socket.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(None),
                        Err(_) => return Err(Some((CLOSE_SLOW_CONSUMER, "too slow: reconnect with since=<last event id>"))),
                    }
                }
                incoming = self.socket.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(None),
                    // Any frame from the peer shows it is alive.
                    Some(Ok(_)) => self.pong_due = false,
                },
            }
        }
    }

    /// Sends a batch of events, one message each, written out together (one flush, not
    /// one per event: with many clients the per-message write is what costs). A batch
    /// that waits past the send timeout closes a slow consumer (nothing is buffered for
    /// it beyond the batch it is being sent).
    async fn send_all(&mut self, texts: Vec<Utf8Bytes>) -> Result<(), End> {
        if texts.is_empty() {
            return Ok(());
        }
        let socket = &mut self.socket;
        let write = async move {
            for text in texts {
                socket.feed(Message::Text(text)).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(self.send_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(None),
            Err(_) => Err(Some((CLOSE_SLOW_CONSUMER, "too slow: reconnect with since=<last event id>"))),
        }
    }
}
