-- The event feed (GET /api/v1/events, the WebSocket). Event ids are drawn from a
-- sequence before commit and transactions commit out of order, so "id > last seen"
-- can skip an event committed late with a smaller id. Each event now records the id
-- of the transaction that wrote it, and readers only read events of transactions
-- older than the oldest one still in flight (pg_snapshot_xmin of their snapshot), in
-- (tx, id) order: below that line nothing can still appear, so a reader that moves
-- along it never skips and never repeats. See docs/feed.md.
ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_feed_idx ON events (tx, id);
