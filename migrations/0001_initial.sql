-- Switchboard's whole model (SPEC §2). Later migrations add behaviour, not a redesign.
-- Statuses are text with CHECK constraints: readable in psql, strict in the database.

CREATE TABLE hosts (
    id                  uuid PRIMARY KEY,
    name                text NOT NULL UNIQUE,
    url                 text NOT NULL,
    capabilities        jsonb NOT NULL DEFAULT '[]',
    status              text NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'offline')),
    heartbeat_timeout_s integer NOT NULL DEFAULT 60 CHECK (heartbeat_timeout_s > 0),
    last_heartbeat_at   timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id                  uuid PRIMARY KEY,
    serial              text NOT NULL UNIQUE,
    name                text NOT NULL,
    platform            text NOT NULL DEFAULT 'android',
    model               text,
    pool                text NOT NULL DEFAULT 'default',
    labels              text[] NOT NULL DEFAULT '{}',
    driver              text NOT NULL CHECK (driver IN ('sim', 'adb', 'host')),
    host_id             uuid REFERENCES hosts (id) ON DELETE SET NULL,
    status              text NOT NULL DEFAULT 'online'
                        CHECK (status IN ('online', 'offline', 'maintenance', 'retired')),
    -- circuit breaker
    breaker_state       text NOT NULL DEFAULT 'closed' CHECK (breaker_state IN ('closed', 'open', 'half_open')),
    breaker_failures    integer NOT NULL DEFAULT 0,
    breaker_open_until  timestamptz,
    breaker_trips       integer NOT NULL DEFAULT 0,   -- consecutive openings, lengthens the cooldown
    -- lease, held by a running run
    lease_run_id        uuid,
    lease_owner         text,
    lease_expires_at    timestamptz,
    metadata            jsonb NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((lease_run_id IS NULL) = (lease_owner IS NULL))
);
CREATE INDEX devices_pool_idx ON devices (pool);
CREATE INDEX devices_free_idx ON devices (pool) WHERE lease_run_id IS NULL AND status = 'online';
CREATE UNIQUE INDEX devices_lease_run_idx ON devices (lease_run_id) WHERE lease_run_id IS NOT NULL;

CREATE TABLE workflows (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    steps       jsonb NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    description     text NOT NULL DEFAULT '',
    items           jsonb NOT NULL,
    stop_on_failure boolean NOT NULL DEFAULT false,
    max_parallel    integer NOT NULL DEFAULT 10 CHECK (max_parallel > 0),
    version         integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedules (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    target          jsonb NOT NULL,
    cron            text NOT NULL,
    timezone        text NOT NULL DEFAULT 'UTC',
    enabled         boolean NOT NULL DEFAULT true,
    misfire         text NOT NULL DEFAULT 'skip' CHECK (misfire IN ('skip', 'fire_once')),
    overlap         text NOT NULL DEFAULT 'allow' CHECK (overlap IN ('allow', 'skip', 'buffer_one')),
    next_fire_at    timestamptz,
    last_fired_at   timestamptz,
    buffered_for    timestamptz,   -- a tick held back by overlap = buffer_one
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due_idx ON schedules (next_fire_at) WHERE enabled;

CREATE TABLE runs (
    id                  uuid PRIMARY KEY,
    kind                text NOT NULL CHECK (kind IN ('module', 'workflow', 'campaign')),
    target              text NOT NULL,          -- module id, or workflow / campaign id
    definition          jsonb NOT NULL,         -- snapshot of what the run executes
    params              jsonb NOT NULL DEFAULT '{}',
    selector            jsonb,                  -- device selector; null for campaigns
    device_id           uuid REFERENCES devices (id) ON DELETE SET NULL,
    status              text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'errored', 'timed_out', 'cancelled')),
    attempt             integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    max_attempts        integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    priority            smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
    timeout_s           integer NOT NULL CHECK (timeout_s > 0),
    trigger             text NOT NULL DEFAULT 'api' CHECK (trigger IN ('api', 'schedule', 'retry')),
    schedule_id         uuid REFERENCES schedules (id) ON DELETE SET NULL,
    scheduled_for       timestamptz,
    parent_run_id       uuid REFERENCES runs (id) ON DELETE CASCADE,
    retry_of            uuid REFERENCES runs (id) ON DELETE SET NULL,
    idempotency_key     text,
    paused              boolean NOT NULL DEFAULT false,
    cancel_requested    boolean NOT NULL DEFAULT false,
    not_before          timestamptz,            -- durable retry backoff
    lease_owner         text,
    lease_expires_at    timestamptz,
    dispatched_at       timestamptz,            -- last push to the queue
    queued_at           timestamptz NOT NULL DEFAULT now(),
    enqueued_at         timestamptz,            -- first push to the queue (fire lag)
    started_at          timestamptz,
    finished_at         timestamptz,
    result              jsonb,
    error               jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'running') = (lease_owner IS NOT NULL))
);
CREATE UNIQUE INDEX runs_schedule_tick_idx ON runs (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL AND scheduled_for IS NOT NULL AND trigger = 'schedule';
CREATE UNIQUE INDEX runs_idempotency_idx ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_queued_idx ON runs (priority DESC, queued_at, id) WHERE status = 'queued';
CREATE INDEX runs_running_lease_idx ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_created_idx ON runs (created_at DESC, id DESC);
CREATE INDEX runs_device_idx ON runs (device_id, created_at DESC);
CREATE INDEX runs_parent_idx ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_schedule_idx ON runs (schedule_id, created_at DESC) WHERE schedule_id IS NOT NULL;

CREATE TABLE run_steps (
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    module      text NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'passed', 'failed', 'errored', 'timed_out', 'cancelled', 'skipped')),
    attempt     integer NOT NULL DEFAULT 0,
    started_at  timestamptz,
    finished_at timestamptz,
    result      jsonb,
    error       jsonb,
    PRIMARY KEY (run_id, idx)
);

-- Append-only. Written in the same transaction as every state change.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    type        text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    run_id      uuid,
    device_id   uuid,
    schedule_id uuid,
    data        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_run_idx ON events (run_id, id) WHERE run_id IS NOT NULL;
CREATE INDEX events_device_idx ON events (device_id, id) WHERE device_id IS NOT NULL;
CREATE INDEX events_schedule_idx ON events (schedule_id, id) WHERE schedule_id IS NOT NULL;

CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash   text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- Live processes (workers, schedulers, apis), for /health/full and system info.
CREATE TABLE processes (
    id           text PRIMARY KEY,
    role         text NOT NULL CHECK (role IN ('api', 'worker', 'scheduler')),
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    info         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX processes_seen_idx ON processes (role, last_seen_at);
