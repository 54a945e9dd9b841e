-- The run's facts copied onto its steps (issue 12): when it ended, on which device,
-- its kind and schedule, and a key of the step's params. The per-module figures and
-- flaky detection read a window's steps; before, every step had to be joined to its
-- run to learn when that run ended (1,300,000 steps hashed per request at 1,000,000
-- runs: 0.8 s over 7 days). Now a window is read from `run_steps_window_idx` alone.
--
-- Written with the step by `write_steps` (from the run's row as it stands: a run still
-- queued or running leaves `run_finished_at` NULL), and stamped on the run's earlier
-- steps when it ends (`end_each`), so that every step of an ended run carries them.
-- A run never changes once it has ended, so the copies never go stale. No foreign key
-- on `device_id`, as on events: a deleted device's history stays as it was.
ALTER TABLE run_steps
    ADD COLUMN run_finished_at timestamptz,
    ADD COLUMN device_id uuid,
    ADD COLUMN run_kind run_kind,
    ADD COLUMN schedule_id uuid,
    -- Equal effective params, equal key (jsonb's text form is canonical: keys sorted,
    -- duplicates dropped), so flaky detection groups passes by a bigint instead of
    -- comparing jsonb documents read from the heap. 64 bits: a collision between two
    -- different params of the same module on the same device is negligible.
    ADD COLUMN params_key bigint GENERATED ALWAYS AS (hashtextextended(params::text, 0)) STORED;

UPDATE run_steps s
SET device_id = r.device_id, run_kind = r.kind, schedule_id = r.schedule_id,
    run_finished_at = CASE WHEN r.status NOT IN ('queued', 'running') THEN r.finished_at END
FROM runs r WHERE r.id = s.run_id;

-- A window's steps with everything the per-module figures and flaky detection read,
-- from the index alone. It replaces `run_steps_cover_idx` (0010), which served the
-- per-run lookups this makes unnecessary, so a step still costs one index beside its
-- primary key on the hot path.
DROP INDEX run_steps_cover_idx;
CREATE INDEX run_steps_window_idx ON run_steps (run_finished_at)
    INCLUDE (module, status, device_id, params_key, run_kind, schedule_id, run_id, idx)
    WHERE run_finished_at IS NOT NULL;

-- Durations as float8 from `date_part`: `extract` returns numeric (since Postgres 14),
-- and its arithmetic was half of a 7-day summary (45 -> 25 ms at 1,000,000 runs).
CREATE OR REPLACE VIEW v_run_history AS
SELECT r.id, r.kind, r.status, r.target, r.trigger, r.device_id,
       d.serial AS device_serial, d.name AS device_name, d.model AS device_model,
       -- The device's pool when it ran on one; else the pool its selector asked for.
       COALESCE(d.pool, r.selector ->> 'pool') AS pool,
       COALESCE(d.labels, '{}') AS labels,
       r.schedule_id, r.parent_run_id, r.retry_of, r.params, r.attempt,
       r.created_at, r.queued_at, r.started_at, r.finished_at,
       date_part('epoch', r.finished_at - r.started_at) * 1000 AS duration_ms,
       r.error ->> 'kind' AS error_kind
FROM runs r LEFT JOIN devices d ON d.id = r.device_id
WHERE r.status NOT IN ('queued', 'running');

-- The same columns as before (0010), now read from the step's own facts: a window on
-- `run_finished_at` is an index range of `run_steps`, then one run per step.
CREATE OR REPLACE VIEW v_step_history AS
SELECT s.run_id, s.idx, s.module, s.params, s.status AS step_status, s.attempt AS step_attempt,
       s.started_at, s.finished_at,
       date_part('epoch', s.finished_at - s.started_at) * 1000 AS duration_ms,
       s.run_kind AS kind, r.status AS run_status, r.target, s.device_id, d.serial AS device_serial,
       COALESCE(d.pool, r.selector ->> 'pool') AS pool, COALESCE(d.labels, '{}') AS labels,
       s.schedule_id, r.retry_of, s.run_finished_at
FROM run_steps s JOIN runs r ON r.id = s.run_id LEFT JOIN devices d ON d.id = s.device_id
WHERE s.run_finished_at IS NOT NULL;

-- Why these functions are PL/pgSQL with `plan_cache_mode = force_custom_plan`: the API
-- calls them through prepared statements, and a generic plan knows neither the window
-- (`since` is a parameter) nor which optional filters are NULL. It guessed ~70 rows
-- for a 7-day window of ~100,000 steps and joined them by nested loops (34 s). A custom
-- plan per call sees the values, folds away the absent filters, estimates the window
-- from the index, and hashes; planning costs a millisecond or two. JIT is off for them
-- as for the API's connections (db.rs): Grafana calls them too, and at 7 days the JIT
-- spent 43 ms compiling a query that then ran in 70 ms. `work_mem` lets a 7-day
-- window's groups hash in memory instead of sorting on disk.

-- The steps of the runs that ended in [since, until), filtered as every dashboard
-- figure is: pool and label are those of the device the step ran on (a step always
-- ran on one), schedule and kind the run's. Written once for `module_figures` and
-- `flaky_steps`; a plain SQL function, so the planner inlines it into their queries,
-- folds away the absent filters, and still reads `run_steps_window_idx` alone.
CREATE FUNCTION window_steps(since timestamptz, until timestamptz, in_pool text, in_label text, in_schedule uuid,
                             in_kind run_kind)
RETURNS SETOF run_steps LANGUAGE sql STABLE AS $$
    SELECT s.* FROM run_steps s
    WHERE s.run_finished_at >= since AND s.run_finished_at < until
      AND (in_pool IS NULL OR s.device_id IN (SELECT d.id FROM devices d WHERE d.pool = in_pool))
      AND (in_label IS NULL OR s.device_id IN (SELECT d.id FROM devices d WHERE in_label = ANY (d.labels)))
      AND (in_schedule IS NULL OR s.schedule_id = in_schedule)
      AND (in_kind IS NULL OR s.run_kind = in_kind)
$$;

-- Flaky failed verdicts (docs/dashboard.md) of the steps of runs that ended in
-- [since, until), as 0012 defined them, read from the steps' own facts: a failed step
-- is flaky when a retry of its run (following `retry_of`, retries of retries included)
-- passed the same step, or when the same module with the same effective params (the
-- params key) passed on the same device in that window, in another run (the ten most
-- recent such passes are listed). Pool and label are the device's (a step always ran
-- on one). The one definition: `flaky_failures` and `module_figures` read it.
CREATE OR REPLACE FUNCTION flaky_steps(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                                       in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                                       in_kind run_kind DEFAULT NULL)
RETURNS TABLE (run_id uuid, idx integer, module text, device_id uuid, failed_at timestamptz,
               passed_on_retry uuid[], passed_on_same_device uuid[])
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off SET work_mem = '64MB' AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    -- The window's passed and failed steps grouped by (module, params key, device) in
    -- one hash aggregate over `run_steps_window_idx`, keeping the groups with a failure.
    WITH RECURSIVE groups AS (
        SELECT s.module, s.device_id,
               array_agg(s.run_id) FILTER (WHERE s.status = 'passed') AS pass_runs,
               array_agg(s.run_finished_at) FILTER (WHERE s.status = 'passed') AS pass_at,
               array_agg(s.run_id) FILTER (WHERE s.status = 'failed') AS fail_runs,
               array_agg(s.idx) FILTER (WHERE s.status = 'failed') AS fail_idx,
               array_agg(s.run_finished_at) FILTER (WHERE s.status = 'failed') AS fail_at
        FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) s
        WHERE s.status IN ('passed', 'failed')
        GROUP BY s.module, s.params_key, s.device_id
        HAVING count(*) FILTER (WHERE s.status = 'failed') > 0),
      -- Each group's passes, newest first, sorted once per group (not per failure).
      recent AS MATERIALIZED (
        SELECT g.*, (SELECT array_agg(p.r ORDER BY p.t DESC, p.r) FROM unnest(g.pass_runs, g.pass_at) p(r, t)) AS passes
        FROM groups g),
      failed AS MATERIALIZED (
        SELECT f.run_id, f.idx, g.module, g.device_id, f.at,
               COALESCE((array_remove(g.passes[1:11], f.run_id))[1:10], '{}') AS on_device
        FROM recent g, unnest(g.fail_runs, g.fail_idx, g.fail_at) AS f(run_id, idx, at)),
      -- Retries of each failed run, retries of retries included, with the failed step.
      chain (root, idx, id) AS (
        SELECT f.run_id, f.idx, r.id FROM failed f JOIN runs r ON r.retry_of = f.run_id
        UNION
        SELECT c.root, c.idx, r.id FROM chain c JOIN runs r ON r.retry_of = c.id),
      retried AS (
        SELECT c.root, c.idx, array_agg(c.id ORDER BY c.id) AS on_retry
        FROM chain c
        -- A lookup per retry by primary key, whatever the estimate of the chain.
        WHERE (SELECT s.status FROM run_steps s WHERE s.run_id = c.id AND s.idx = c.idx) = 'passed'
        GROUP BY c.root, c.idx)
    SELECT f.run_id, f.idx, f.module, f.device_id, f.at, COALESCE(r.on_retry, '{}'), f.on_device
    FROM failed f LEFT JOIN retried r ON r.root = f.run_id AND r.idx = f.idx
    WHERE r.on_retry IS NOT NULL OR cardinality(f.on_device) > 0;
END
$$;

-- The flaky failures with what a reader wants beside them: the step's params and the
-- device's serial, newest first (`GET /dashboard/flaky`, Grafana's flaky panel).
CREATE OR REPLACE FUNCTION flaky_failures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                                          in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                                          in_kind run_kind DEFAULT NULL)
RETURNS TABLE (run_id uuid, idx integer, module text, params jsonb, device_id uuid, device_serial text,
               failed_at timestamptz, passed_on_retry uuid[], passed_on_same_device uuid[])
LANGUAGE sql STABLE AS $$
    SELECT f.run_id, f.idx, f.module, s.params, f.device_id, d.serial, f.failed_at, f.passed_on_retry,
           f.passed_on_same_device
    FROM flaky_steps(since, until, in_pool, in_label, in_schedule, in_kind) f
    JOIN run_steps s ON s.run_id = f.run_id AND s.idx = f.idx
    LEFT JOIN devices d ON d.id = f.device_id
    ORDER BY f.failed_at DESC, f.run_id, f.idx
$$;

-- Per module, its steps of the runs that ended in [since, until) by status, and its
-- flaky failures: `GET /dashboard/modules`. The steps come from `run_steps_window_idx`
-- alone (`window_steps`).
CREATE FUNCTION module_figures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                               in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                               in_kind run_kind DEFAULT NULL)
RETURNS TABLE (module text, passed bigint, failed bigint, errored bigint, timed_out bigint, flaky bigint)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH m AS (
        SELECT s.module,
               count(*) FILTER (WHERE s.status = 'passed') AS passed,
               count(*) FILTER (WHERE s.status = 'failed') AS failed,
               count(*) FILTER (WHERE s.status = 'errored') AS errored,
               count(*) FILTER (WHERE s.status = 'timed_out') AS timed_out
        FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) s
        GROUP BY s.module),
      fl AS (
        SELECT x.module, count(*) AS flaky
        FROM flaky_steps(since, until, in_pool, in_label, in_schedule, in_kind) x
        GROUP BY x.module)
    SELECT m.module, m.passed, m.failed, m.errored, m.timed_out, COALESCE(fl.flaky, 0)
    FROM m LEFT JOIN fl ON fl.module = m.module
    ORDER BY m.module;
END
$$;
