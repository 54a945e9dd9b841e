//! The event feed: every event, once, in one order that every reader on every api
//! process shares, across restarts.
//!
//! Event ids are drawn from a sequence before commit, and transactions commit out of
//! order: a reader paging by `id > last` can pass an id whose transaction has not
//! committed yet, and skip that event for good when it does. So each event records the
//! id of the transaction that wrote it (`tx`, an `xid8`), and a reader only reads
//! events of transactions older than the oldest still in flight
//! (`pg_snapshot_xmin(pg_current_snapshot())`), in `(tx, id)` order. Every transaction
//! below that line has ended, so no event can still appear below it: a reader moving
//! along it sees each event exactly once, and all readers see the same order. The
//! order is that of transaction ids (when each writer began writing), not of commits;
//! an event waits for every transaction that began writing before its own to end
//! (the writers here are short). Clients hold a plain event id as their cursor; the
//! feed finds its place from that event's `tx`.

use sqlx::PgPool;

use crate::{
    CoreResult,
    events::Event,
    ids::{DeviceId, EventId, RunId},
};

/// A place in the feed: the `(tx, id)` of the last event read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The writing transaction (`xid8` as an integer).
    pub tx: i64,
    /// The event.
    pub id: EventId,
}

impl Default for Position {
    /// Before the first event.
    fn default() -> Position {
        Position { tx: 0, id: EventId(0) }
    }
}

/// The kinds of events, by the first part of their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// `run.*`
    Runs,
    /// `device.*`
    Devices,
    /// `schedule.*`
    Schedules,
    /// `host.*`
    Hosts,
}

impl Topic {
    /// Every topic.
    pub const ALL: [Topic; 4] = [Topic::Runs, Topic::Devices, Topic::Schedules, Topic::Hosts];

    /// As named in `topics=` (`runs`).
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Runs => "runs",
            Topic::Devices => "devices",
            Topic::Schedules => "schedules",
            Topic::Hosts => "hosts",
        }
    }

    /// The event-name prefix of its events (`run`).
    fn prefix(self) -> &'static str {
        match self {
            Topic::Runs => "run",
            Topic::Devices => "device",
            Topic::Schedules => "schedule",
            Topic::Hosts => "host",
        }
    }
}

impl std::str::FromStr for Topic {
    type Err = String;
    fn from_str(s: &str) -> Result<Topic, String> {
        Topic::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown topic {s:?} (expected {})", Topic::ALL.map(Topic::as_str).join(", ")))
    }
}

/// Which events a reader wants; empty parts take everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these topics (all when empty).
    pub topics: Vec<Topic>,
    /// Only this run's events.
    pub run_id: Option<RunId>,
    /// Only the events of this campaign run and of its children.
    pub campaign_id: Option<RunId>,
    /// Only events about this device (its runs' too).
    pub device_id: Option<DeviceId>,
    /// Only events about devices of this pool (their runs' too).
    pub pool: Option<String>,
}

impl Filter {
    /// Whether judging an event takes the database (a campaign or pool filter).
    pub fn needs_database(&self) -> bool {
        self.campaign_id.is_some() || self.pool.is_some()
    }

    /// Whether an event passes, when the event alone can tell (`None` with a campaign or
    /// pool filter: those need the database).
    pub fn matches(&self, e: &Event) -> Option<bool> {
        if self.needs_database() {
            return None;
        }
        let prefix = e.kind.as_str().split('.').next().unwrap_or("");
        let topic = self.topics.is_empty() || self.topics.iter().any(|t| t.prefix() == prefix);
        let run = self.run_id.is_none_or(|r| e.run_id == Some(r));
        let device = self.device_id.is_none_or(|d| e.device_id == Some(d));
        Some(topic && run && device)
    }
}

/// Where a client's cursor puts it: just after event `id`. `None` when there is no
/// such event.
pub async fn position_of(pool: &PgPool, id: EventId) -> CoreResult<Option<Position>> {
    let tx = sqlx::query_scalar!(r#"SELECT tx::text::int8 AS "tx!" FROM events WHERE id = $1"#, id as EventId)
        .fetch_optional(pool)
        .await?;
    Ok(tx.map(|tx| Position { tx, id }))
}

/// The end of what can be read now (the last event below the in-flight line), where a
/// reader that wants only what comes next starts.
pub async fn head(pool: &PgPool) -> CoreResult<Position> {
    let row = sqlx::query!(
        r#"SELECT tx::text::int8 AS "tx!", id AS "id!: EventId" FROM events
           WHERE tx < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY tx DESC, id DESC LIMIT 1"#
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Position { tx: r.tx, id: r.id }).unwrap_or_default())
}

/// What one read found: the events after the reader's place that it wants (up to the
/// limit, in feed order), and where it now stands. Its place moves past events it did
/// not want too, so a narrow filter does not read the same stretch again.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The events, in feed order.
    pub events: Vec<(Position, Event)>,
    /// The reader's new place.
    pub next: Position,
    /// Whether committed events wait above the line for an older transaction to end:
    /// a reader that wants them soon reads again shortly.
    pub held: bool,
}

/// Reads after `after`, below the in-flight line, what `filter` wants (at most `limit`).
pub async fn read(pool: &PgPool, after: Position, filter: &Filter, limit: i64) -> CoreResult<Batch> {
    let topics: Option<Vec<String>> =
        (!filter.topics.is_empty()).then(|| filter.topics.iter().map(|t| t.prefix().to_string()).collect());
    // One statement, so the line, the events and the head are read from one snapshot.
    let rows = sqlx::query!(
        r#"WITH line AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
           found AS (
             SELECT e.id, e.type, e.at, e.run_id, e.device_id, e.schedule_id, e.host_id, e.data, e.tx
             FROM events e, line
             WHERE (e.tx, e.id) > ($1::text::xid8, $2) AND e.tx < line.xmin
               AND ($3::text[] IS NULL OR split_part(e.type, '.', 1) = ANY ($3))
               AND ($4::uuid IS NULL OR e.run_id = $4)
               AND ($5::uuid IS NULL OR e.run_id = $5 OR e.run_id IN (SELECT id FROM runs WHERE parent_run_id = $5))
               AND ($6::uuid IS NULL OR e.device_id = $6)
               AND ($7::text IS NULL OR e.device_id IN (SELECT id FROM devices WHERE pool = $7))
             ORDER BY e.tx, e.id LIMIT $8),
           head AS (
             SELECT e.tx, e.id FROM events e WHERE e.tx < (SELECT xmin FROM line) ORDER BY e.tx DESC, e.id DESC LIMIT 1),
           -- A committed event at or above the line: held back by an older transaction
           -- still in flight, so readable as soon as that one ends.
           -- The line as a scalar subquery, so that it bounds the index scan: joined, or
           -- in an EXISTS, it was a filter, and a read walked every event (42-93 ms at
           -- 300,000 events).
           held AS (
             SELECT e.tx FROM events e WHERE e.tx >= (SELECT xmin FROM line) ORDER BY e.tx, e.id LIMIT 1)
           SELECT f.id AS "id?: EventId", f.type AS "kind?", f.at AS "at?", f.run_id AS "run_id?: RunId",
                  f.device_id AS "device_id?: DeviceId", f.schedule_id AS "schedule_id?: crate::ids::ScheduleId",
                  f.host_id AS "host_id?: crate::ids::HostId", f.data AS "data?", f.tx::text::int8 AS "tx?",
                  h.tx::text::int8 AS "head_tx?", h.id AS "head_id?: EventId", EXISTS (SELECT 1 FROM held) AS "held!"
           FROM (SELECT) k LEFT JOIN head h ON true LEFT JOIN found f ON true
           ORDER BY f.tx, f.id"#,
        after.tx.to_string(),
        after.id as EventId,
        topics.as_deref(),
        filter.run_id as Option<RunId>,
        filter.campaign_id as Option<RunId>,
        filter.device_id as Option<DeviceId>,
        filter.pool,
        limit,
    )
    .fetch_all(pool)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    let (mut head, mut held) = (None, false);
    for r in rows {
        held = r.held;
        head = r.head_tx.zip(r.head_id).map(|(tx, id)| Position { tx, id });
        let (Some(id), Some(kind), Some(at), Some(data), Some(tx)) = (r.id, r.kind, r.at, r.data, r.tx) else {
            continue;
        };
        let event = Event {
            id,
            kind,
            at,
            run_id: r.run_id,
            device_id: r.device_id,
            schedule_id: r.schedule_id,
            host_id: r.host_id,
            data,
        };
        events.push((Position { tx, id }, event));
    }
    Ok(Batch { next: next_place(after, &events, head, limit), events, held })
}

/// Where a reader stands after a read: past its last event when the read was full
/// (more may follow), else at the head (everything below the line has been read).
fn next_place(after: Position, events: &[(Position, Event)], head: Option<Position>, limit: i64) -> Position {
    let last = events.last().map(|(p, _)| *p);
    if events.len() as i64 >= limit {
        return last.unwrap_or(after).max(after);
    }
    [Some(after), last, head].into_iter().flatten().max().unwrap_or(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    fn at(tx: i64, id: i64) -> Position {
        Position { tx, id: EventId(id) }
    }

    fn event(p: Position) -> (Position, Event) {
        let e = Event {
            id: p.id,
            kind: EventKind::DeviceUpdated,
            at: chrono::Utc::now(),
            run_id: None,
            device_id: None,
            schedule_id: None,
            host_id: None,
            data: serde_json::json!({}),
        };
        (p, e)
    }

    #[test]
    fn the_place_after_a_read() {
        let from = at(10, 5);
        // (events read, head, limit) -> place
        let cases = [
            // Nothing new at all: stay.
            (vec![], None, 10, from),
            // Nothing wanted below a head further on: move to the head, not to read it again.
            (vec![], Some(at(12, 9)), 10, at(12, 9)),
            // A short read: everything below the line was read; the head.
            (vec![at(11, 7)], Some(at(12, 9)), 10, at(12, 9)),
            // A full read: more may follow; just past the last event.
            (vec![at(11, 7), at(11, 8)], Some(at(12, 9)), 2, at(11, 8)),
            // A head behind the reader (another process's view): never move back.
            (vec![], Some(at(9, 99)), 10, from),
        ];
        for (read, head, limit, want) in cases {
            let events: Vec<_> = read.iter().copied().map(event).collect();
            assert_eq!(next_place(from, &events, head, limit), want, "{read:?} {head:?} {limit}");
        }
    }

    #[test]
    fn positions_order_by_transaction_then_id() {
        // An event of an older transaction comes first even with a larger id.
        assert!(at(10, 50) < at(11, 7));
        assert!(at(11, 7) < at(11, 8));
    }

    #[test]
    fn filters_the_event_alone_can_answer() {
        let (_, mut e) = event(at(1, 1));
        let run = RunId::random();
        e.kind = EventKind::RunFinished;
        e.run_id = Some(run);
        let f = |filter: Filter| filter.matches(&e);
        assert_eq!(f(Filter::default()), Some(true));
        assert_eq!(f(Filter { topics: vec![Topic::Runs], ..Filter::default() }), Some(true));
        assert_eq!(f(Filter { topics: vec![Topic::Devices, Topic::Hosts], ..Filter::default() }), Some(false));
        assert_eq!(f(Filter { run_id: Some(run), ..Filter::default() }), Some(true));
        assert_eq!(f(Filter { run_id: Some(RunId::random()), ..Filter::default() }), Some(false));
        assert_eq!(f(Filter { device_id: Some(DeviceId::random()), ..Filter::default() }), Some(false));
        assert_eq!(f(Filter { pool: Some("lab".into()), ..Filter::default() }), None);
        assert_eq!(f(Filter { campaign_id: Some(run), ..Filter::default() }), None);
    }

    #[test]
    fn topics_read_and_refuse() {
        assert_eq!("hosts".parse::<Topic>(), Ok(Topic::Hosts));
        assert!("run".parse::<Topic>().unwrap_err().contains("runs, devices, schedules, hosts"));
    }
}
