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
    response::Response,
};
use serde::Serialize;
use switchboard_core::{
    events::Event,
    ids::EventId,
    repo::feed::{self, Filter, Position, Topic},
};
use tokio::sync::watch;

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
        ("topics" = Option<String>, Query, description = "Comma-separated: runs, devices, schedules, hosts (default all)"),
        ("run_id" = Option<uuid::Uuid>, Query, description = "Only this run's events"),
        ("campaign_id" = Option<uuid::Uuid>, Query, description = "Only this campaign run's events and its children's"),
        ("device_id" = Option<uuid::Uuid>, Query, description = "Only events about this device"),
        ("pool" = Option<String>, Query, description = "Only events about devices of this pool"),
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
        ("topics" = Option<String>, Query, description = "Comma-separated: runs, devices, schedules, hosts (default all)"),
        ("run_id" = Option<uuid::Uuid>, Query),
        ("campaign_id" = Option<uuid::Uuid>, Query),
        ("device_id" = Option<uuid::Uuid>, Query),
        ("pool" = Option<String>, Query),
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
    let filter = filter(&q)?;
    let start = match since(&state, &q).await? {
        Some(p) => p,
        None => feed::head(&state.engine.pool).await?,
    };
    Ok(upgrade.on_upgrade(move |socket| follow(state, socket, filter, start)))
}

/// Serves one WebSocket: reads the feed from `at` on, sends each event, waits for the
/// head to move, pings.
async fn follow(state: AppState, mut socket: WebSocket, filter: Filter, mut at: Position) {
    let ping_every = Duration::from_secs(state.config.ws_ping_s.max(1));
    let send_timeout = Duration::from_secs(state.config.ws_send_timeout_s.max(1));
    let mut moved = state.feed_head.subscribe();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut pong_due = false;
    state.ws_clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let reason = loop {
        match feed::read(&state.engine.pool, at, &filter, WS_BATCH).await {
            Err(e) => {
                tracing::warn!(error = %e, "the feed could not be read; closing a WebSocket");
                break (CLOSE_UNAVAILABLE, "the feed is unavailable; reconnect with since");
            }
            Ok(batch) => {
                let full = batch.events.len() as i64 >= WS_BATCH;
                if let Err(reason) = send_all(&mut socket, &batch.events, send_timeout).await {
                    break reason;
                }
                at = batch.next;
                if full {
                    continue;
                }
            }
        }
        match wait(&mut socket, &mut moved, &mut ping, &mut pong_due, at).await {
            Ok(()) => {}
            Err(Some(reason)) => break reason,
            Err(None) => {
                state.ws_clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    };
    state.ws_clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let (code, why) = reason;
    let frame = CloseFrame { code, reason: Utf8Bytes::from_static(why) };
    let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
}

/// Sends events in order; a send that waits past `timeout` closes a slow consumer
/// (nothing is buffered for it beyond one batch).
async fn send_all(
    socket: &mut WebSocket,
    events: &[(Position, Event)],
    timeout: Duration,
) -> Result<(), (u16, &'static str)> {
    for (_, event) in events {
        let text = serde_json::to_string(event).unwrap_or_default();
        match tokio::time::timeout(timeout, socket.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err((1001, "")),
            Err(_) => return Err((CLOSE_SLOW_CONSUMER, "too slow: reconnect with since=<last event id>")),
        }
    }
    Ok(())
}

/// Waits until the feed's head passes `at`, answering the client meanwhile: pings on
/// time, closes a peer that did not pong, and returns `Err(None)` when it went away.
async fn wait(
    socket: &mut WebSocket,
    moved: &mut watch::Receiver<Position>,
    ping: &mut tokio::time::Interval,
    pong_due: &mut bool,
    at: Position,
) -> Result<(), Option<(u16, &'static str)>> {
    loop {
        if *moved.borrow_and_update() > at {
            return Ok(());
        }
        tokio::select! {
            changed = moved.changed() => {
                if changed.is_err() {
                    return Err(Some((1001, "the server is stopping")));
                }
            }
            _ = ping.tick() => {
                if *pong_due {
                    return Err(Some((CLOSE_NO_PONG, "no pong within the ping interval")));
                }
                *pong_due = true;
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return Err(None);
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(None),
                Some(Ok(Message::Pong(_))) => *pong_due = false,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Follows the feed's head for this process (one cheap index read every 100 ms), so
/// WebSocket readers wake when there is something new instead of each polling. The
/// events table stays the record: this only wakes.
pub async fn watch_head(
    pool: sqlx::PgPool,
    head: std::sync::Arc<watch::Sender<Position>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Ok(p) = feed::head(&pool).await {
            head.send_if_modified(|h| {
                let newer = p > *h;
                if newer {
                    *h = p;
                }
                newer
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
