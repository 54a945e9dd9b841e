-- More of the history as its readers see it (see 0010): what Grafana's provisioned
-- dashboards (deploy/grafana) and the dashboard API query, so tables can change
-- without breaking them.

-- The queue now, per pool (`*`: runs not bound to a pool): runs waiting for a device.
CREATE VIEW v_queue AS
SELECT COALESCE(selector ->> 'pool', '*') AS pool, count(*) AS depth,
       GREATEST(extract(epoch FROM now() - min(waiting_since)), 0)::float8 AS oldest_age_s
FROM runs
WHERE status = 'queued' AND NOT held AND kind <> 'campaign'
GROUP BY 1;

-- Devices now.
CREATE VIEW v_devices AS
SELECT id, serial, name, model, pool, labels, driver::text AS driver, status::text AS status,
       breaker_state::text AS breaker_state, breaker_failures, breaker_open_until, host_id
FROM devices;

-- What happened to devices: status changes, breaker openings and closings, runs on them.
CREATE VIEW v_device_events AS
SELECT e.id, e.at, e.type, e.device_id, d.serial, d.name, e.run_id, e.data
FROM events e LEFT JOIN devices d ON d.id = e.device_id
WHERE e.device_id IS NOT NULL;

-- Schedules' decisions: fired (with their lag), skipped, missed (with how many ticks).
CREATE VIEW v_schedule_events AS
SELECT e.id, e.at, e.type, e.schedule_id, s.name AS schedule, e.run_id,
       (e.data ->> 'lag_ms')::float8 AS lag_ms,
       CASE WHEN e.type = 'schedule.missed' THEN COALESCE((e.data ->> 'count')::int, 1) ELSE 0 END AS missed_ticks
FROM events e LEFT JOIN schedules s ON s.id = e.schedule_id
WHERE e.type LIKE 'schedule.%';

-- Flaky failed verdicts (docs/dashboard.md) of the steps of runs that ended in
-- [since, until): a failed step is flaky when a retry of its run (following
-- `retry_of`, retries of retries included) passed the same step, or when the same
-- module with the same effective params passed on the same device in that window
-- (the ten most recent such passes are listed). The one definition: the dashboard API
-- and Grafana both read it.
CREATE FUNCTION flaky_failures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                               in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                               in_kind run_kind DEFAULT NULL)
RETURNS TABLE (run_id uuid, idx integer, module text, params jsonb, device_id uuid, device_serial text,
               failed_at timestamptz, passed_on_retry uuid[], passed_on_same_device uuid[])
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE steps AS MATERIALIZED (
        SELECT h.run_id, h.idx, h.module, h.params, h.step_status, h.device_id, h.device_serial, h.run_finished_at
        FROM v_step_history h
        WHERE h.run_finished_at >= since AND h.run_finished_at < until
          AND (in_pool IS NULL OR h.pool = in_pool) AND (in_label IS NULL OR in_label = ANY (h.labels))
          AND (in_schedule IS NULL OR h.schedule_id = in_schedule)
          AND (in_kind IS NULL OR h.kind = in_kind)),
      failed AS MATERIALIZED (SELECT * FROM steps WHERE step_status = 'failed'),
      chain (root, id) AS (
        SELECT r.retry_of, r.id FROM runs r WHERE r.retry_of IN (SELECT f.run_id FROM failed f)
        UNION
        SELECT c.root, r.id FROM chain c JOIN runs r ON r.retry_of = c.id),
      -- The passes that can make a failure flaky, grouped once: a failure finds its
      -- group by a hash join, never by scanning every step of the window again.
      passed AS MATERIALIZED (
        SELECT p.module, p.params, p.device_id,
               (array_agg(p.run_id ORDER BY p.run_finished_at DESC, p.run_id))[1:11] AS runs
        FROM steps p WHERE p.step_status = 'passed' AND p.device_id IS NOT NULL
        GROUP BY p.module, p.params, p.device_id),
      judged AS (
        SELECT f.*,
          array(SELECT c.id FROM chain c JOIN run_steps s ON s.run_id = c.id
                WHERE c.root = f.run_id AND s.idx = f.idx AND s.status = 'passed' ORDER BY c.id) AS on_retry,
          COALESCE((array(SELECT x FROM unnest(g.runs) x WHERE x <> f.run_id))[1:10], '{}') AS on_device
        FROM failed f LEFT JOIN passed g
          ON g.module = f.module AND g.params = f.params AND g.device_id = f.device_id)
    SELECT j.run_id, j.idx, j.module, j.params, j.device_id, j.device_serial, j.run_finished_at, j.on_retry, j.on_device
    FROM judged j WHERE cardinality(j.on_retry) > 0 OR cardinality(j.on_device) > 0
    ORDER BY j.run_finished_at DESC, j.run_id, j.idx
$$;

-- The dashboard's per-device retry count reads a device's requeues in a window: an
-- index on just those events, instead of every event of the device.
CREATE INDEX events_requeued_device_idx ON events (device_id, at) WHERE type = 'run.requeued';
