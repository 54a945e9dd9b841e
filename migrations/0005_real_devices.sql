-- Real devices (issue 9): why a device is offline and who said so, per-host secrets,
-- and the captures (log excerpts) modules store with their run.

-- Who set a device's status last. Discovery and host liveness only move devices whose
-- status they set themselves (or that are online): a device an operator put in
-- maintenance stays there whatever adb or an agent reports.
CREATE TYPE device_status_source AS ENUM ('operator', 'discovery', 'host');
ALTER TABLE devices
    ADD COLUMN status_reason text,
    ADD COLUMN status_source device_status_source NOT NULL DEFAULT 'operator';

-- The per-host secret is shared by both directions (agent -> api heartbeats, worker ->
-- agent executions), so it is kept in clear: the worker must present it. It is never
-- shown again after registration.
ALTER TABLE hosts
    ADD COLUMN secret text NOT NULL DEFAULT gen_random_uuid()::text,
    ADD COLUMN pool text NOT NULL DEFAULT 'default',
    ADD COLUMN status_reason text,
    ADD COLUMN agent_version text;
ALTER TABLE hosts ALTER COLUMN secret DROP DEFAULT;

CREATE TABLE run_captures (
    id           uuid PRIMARY KEY,
    run_id       uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index   integer NOT NULL,
    attempt      integer NOT NULL,
    name         text NOT NULL,
    content_type text NOT NULL,
    size_bytes   integer NOT NULL CHECK (size_bytes >= 0),
    truncated    boolean NOT NULL,
    data         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX run_captures_run_idx ON run_captures (run_id, created_at);

ALTER TABLE events ADD COLUMN host_id uuid;
-- The host a run's attempt ran through (its device's host when claimed): kept as
-- history, so no foreign key.
ALTER TABLE runs ADD COLUMN host_id uuid;
CREATE INDEX events_host_idx ON events (host_id, id) WHERE host_id IS NOT NULL;
