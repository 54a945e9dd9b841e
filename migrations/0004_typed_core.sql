-- A typed core (issue 8).
--
-- Statuses and kinds become Postgres enum types. A misspelt status in a query is then
-- an error when the statement is prepared (at compile time, for the query! macros),
-- instead of a condition that silently matches nothing.
CREATE TYPE run_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'errored', 'timed_out', 'cancelled');
CREATE TYPE run_kind AS ENUM ('module', 'workflow', 'campaign');
CREATE TYPE run_trigger AS ENUM ('api', 'schedule', 'retry');
CREATE TYPE step_status AS ENUM ('pending', 'running', 'passed', 'failed', 'errored', 'timed_out', 'cancelled', 'skipped');
CREATE TYPE device_status AS ENUM ('online', 'offline', 'maintenance', 'retired');
CREATE TYPE device_driver AS ENUM ('sim', 'adb', 'host');
CREATE TYPE breaker_state AS ENUM ('closed', 'open', 'half_open');
CREATE TYPE host_status AS ENUM ('online', 'offline');
CREATE TYPE schedule_misfire AS ENUM ('skip', 'fire_once');
CREATE TYPE schedule_overlap AS ENUM ('allow', 'skip', 'buffer_one');
CREATE TYPE token_role AS ENUM ('viewer', 'operator', 'admin');
CREATE TYPE process_role AS ENUM ('api', 'worker', 'scheduler');

-- Indexes and constraints whose predicates compare these columns with text are
-- dropped first and made again on the enum columns.
DROP INDEX devices_free_idx;
DROP INDEX runs_schedule_tick_idx;
DROP INDEX runs_queued_idx;
DROP INDEX runs_running_lease_idx;
DROP INDEX runs_active_campaigns_idx;
DROP INDEX runs_schedule_active_idx;
DROP INDEX runs_fire_lag_idx;
ALTER TABLE runs DROP CONSTRAINT runs_lease_matches_status;
ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_kind_check;
ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_status_check;
ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_trigger_check;
ALTER TABLE run_steps DROP CONSTRAINT IF EXISTS run_steps_status_check;
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_driver_check;
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_status_check;
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_breaker_state_check;
ALTER TABLE hosts DROP CONSTRAINT IF EXISTS hosts_status_check;
ALTER TABLE schedules DROP CONSTRAINT IF EXISTS schedules_misfire_check;
ALTER TABLE schedules DROP CONSTRAINT IF EXISTS schedules_overlap_check;
ALTER TABLE api_tokens DROP CONSTRAINT IF EXISTS api_tokens_role_check;
ALTER TABLE processes DROP CONSTRAINT IF EXISTS processes_role_check;

ALTER TABLE runs
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE run_status USING status::run_status,
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN kind TYPE run_kind USING kind::run_kind,
    ALTER COLUMN trigger DROP DEFAULT,
    ALTER COLUMN trigger TYPE run_trigger USING trigger::run_trigger,
    ALTER COLUMN trigger SET DEFAULT 'api';
ALTER TABLE run_steps
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE step_status USING status::step_status,
    ALTER COLUMN status SET DEFAULT 'pending';
ALTER TABLE devices
    ALTER COLUMN driver TYPE device_driver USING driver::device_driver,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE device_status USING status::device_status,
    ALTER COLUMN status SET DEFAULT 'online',
    ALTER COLUMN breaker_state DROP DEFAULT,
    ALTER COLUMN breaker_state TYPE breaker_state USING breaker_state::breaker_state,
    ALTER COLUMN breaker_state SET DEFAULT 'closed';
ALTER TABLE hosts
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE host_status USING status::host_status,
    ALTER COLUMN status SET DEFAULT 'online';
ALTER TABLE schedules
    ALTER COLUMN misfire DROP DEFAULT,
    ALTER COLUMN misfire TYPE schedule_misfire USING misfire::schedule_misfire,
    ALTER COLUMN misfire SET DEFAULT 'skip',
    ALTER COLUMN overlap DROP DEFAULT,
    ALTER COLUMN overlap TYPE schedule_overlap USING overlap::schedule_overlap,
    ALTER COLUMN overlap SET DEFAULT 'allow';
ALTER TABLE api_tokens ALTER COLUMN role TYPE token_role USING role::token_role;
ALTER TABLE processes ALTER COLUMN role TYPE process_role USING role::process_role;

ALTER TABLE runs ADD CONSTRAINT runs_lease_matches_status
    CHECK (kind = 'campaign' OR (status = 'running') = (lease_owner IS NOT NULL));
CREATE INDEX devices_free_idx ON devices (pool) WHERE lease_run_id IS NULL AND status = 'online';
CREATE UNIQUE INDEX runs_schedule_tick_idx ON runs (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL AND scheduled_for IS NOT NULL AND trigger = 'schedule';
CREATE INDEX runs_queued_idx ON runs (priority DESC, queued_at, id) WHERE status = 'queued';
CREATE INDEX runs_running_lease_idx ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_active_campaigns_idx ON runs (created_at) WHERE kind = 'campaign' AND status = 'running';
CREATE INDEX runs_schedule_active_idx ON runs (schedule_id) WHERE schedule_id IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX runs_fire_lag_idx ON runs (enqueued_at) WHERE trigger = 'schedule' AND scheduled_for IS NOT NULL;

-- How long a run may wait in the queue for a device, when it says (otherwise the
-- reconciler's SWITCHBOARD_MAX_QUEUE_WAIT_S applies), counted from `waiting_since`:
-- when the run last entered the queue (created, admitted by its campaign, requeued
-- after an attempt, resumed while queued). `queued_at` keeps the run's age, which
-- orders the queue.
ALTER TABLE runs ADD COLUMN max_queue_wait_s integer CHECK (max_queue_wait_s > 0);
ALTER TABLE runs ADD COLUMN waiting_since timestamptz NOT NULL DEFAULT now();

-- The two device rules every claim, hand-off and re-dispatch applies, written once.
-- Kept beside `Selector::matches` and `claimable` in crates/core, which state them in
-- Rust for unit tests.

-- Device `d` may take a run now: online, not leased, breaker closed or cooled down.
CREATE FUNCTION device_claimable(d devices) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT d.status = 'online' AND d.lease_run_id IS NULL
       AND (d.breaker_state = 'closed' OR (d.breaker_state = 'open' AND d.breaker_open_until <= now()))
$$;

-- Device `d` matches a stored selector: {"id"}, {"serial"} or {"pool"?, "labels"?}.
-- Nothing in it can raise an error (ids are compared as text, not cast): one damaged
-- stored selector must not break every query that matches runs to devices.
CREATE FUNCTION selector_matches(sel jsonb, d devices) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN sel ? 'id' THEN d.id::text = sel ->> 'id'
        WHEN sel ? 'serial' THEN d.serial = sel ->> 'serial'
        ELSE (NOT (sel ? 'pool') OR d.pool = sel ->> 'pool')
             AND to_jsonb(d.labels) @> COALESCE(sel -> 'labels', '[]'::jsonb)
    END
$$;
