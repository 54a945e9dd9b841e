-- Fewer index writes on the hot path (issue 13): the run's dispatch record can be a
-- heap-only update, and leases no longer rewrite the devices' search indexes.

-- The API's dispatch record (`mark_dispatched`: `dispatched_at`, and `enqueued_at` the
-- first time) changes no indexed column, so that Postgres can write it as a
-- heap-only tuple: no new entry in each of the runs' indexes for a row whose keys did
-- not change (issue 13: one such update per run, written while the run waits).
--
-- `runs_fire_lag_idx` indexed `enqueued_at` for scheduled runs, and so made every
-- dispatch record a full update. No query reads it: a schedule's fire lags are read by
-- schedule (`runs_schedule_idx`), and Grafana's fire-lag panel reads the
-- `schedule.fired` events.
DROP INDEX runs_fire_lag_idx;

-- A heap-only update needs room on the row's page. Runs are appended, and their
-- updates come while the row is on one of the last pages: leave a tenth of each page
-- for them (the default packs pages full, so the first update of a row moves it).
ALTER TABLE runs SET (fillfactor = 90);

-- Devices are found by serial, name and label (`GET /search`) through three GIN
-- indexes, and leased and released on every run: every lease or release wrote each of
-- the device's trigrams into those indexes again (the update changes `lease_run_id`,
-- which is indexed, so it is never heap-only). That was a fifth of the hot path's WAL
-- (8,100 -> 6,500 bytes per run without them, docs/performance.md). The searched
-- fields now have a table of their own, kept by a trigger that fires only when an
-- UPDATE sets one of them (a lease never does); `devices` keeps only B-tree indexes.
CREATE TABLE device_search (
    id     uuid PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    serial text NOT NULL,
    name   text NOT NULL,
    labels text[] NOT NULL
);
INSERT INTO device_search (id, serial, name, labels) SELECT id, serial, name, labels FROM devices;
CREATE INDEX device_search_serial_trgm_idx ON device_search USING gin (serial gin_trgm_ops);
CREATE INDEX device_search_name_trgm_idx ON device_search USING gin (name gin_trgm_ops);
CREATE INDEX device_search_labels_idx ON device_search USING gin (labels);
DROP INDEX devices_serial_trgm_idx, devices_name_trgm_idx, devices_labels_idx;

-- A trigger rather than a write in each repository: devices are written by the API,
-- discovery, host agents and the bench's seed, and none of them has to remember it.
CREATE FUNCTION device_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO device_search (id, serial, name, labels) VALUES (NEW.id, NEW.serial, NEW.name, NEW.labels)
    ON CONFLICT (id) DO UPDATE SET serial = EXCLUDED.serial, name = EXCLUDED.name, labels = EXCLUDED.labels
    WHERE (device_search.serial, device_search.name, device_search.labels)
          IS DISTINCT FROM (EXCLUDED.serial, EXCLUDED.name, EXCLUDED.labels);
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_search_sync AFTER INSERT OR UPDATE OF serial, name, labels ON devices
    FOR EACH ROW EXECUTE FUNCTION device_search_sync();
