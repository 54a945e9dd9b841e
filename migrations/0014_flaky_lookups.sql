-- Flaky detection by lookups instead of a scan of the window (issue 12's 50 ms goal).
-- 0013 read every step of the window (~100,000 at 7 days over 1,000,000 runs) and
-- hashed them by (module, params key, device) to find the groups with a failure: 131 ms
-- at p95. Failures are a few per cent of the steps. Now a window's failed steps come
-- from their own small index, and only their (module, params key, device) groups look
-- up their passes, newest first, a handful of index entries each. The API's flaky
-- list comes in pages, and a page decides only the failures after its cursor.
--
-- On the hot path: a failed step costs one more index entry, a passed step one more
-- (the passes lookup), a retry one more. Nothing else is written.

-- A window's failed steps, with what flaky detection and its filters read.
CREATE INDEX run_steps_failed_idx ON run_steps (run_finished_at)
    INCLUDE (module, device_id, params_key, run_kind, schedule_id, run_id, idx)
    WHERE status = 'failed' AND run_finished_at IS NOT NULL;

-- A (module, params key, device)'s passes, newest last: the ten most recent passes of
-- a failure's group in the window are the last entries of one range.
CREATE INDEX run_steps_passes_idx ON run_steps (device_id, module, params_key, run_finished_at)
    INCLUDE (run_id, run_kind, schedule_id)
    WHERE status = 'passed' AND run_finished_at IS NOT NULL;

-- The retries created since a window began, which are all the retries a failure in that
-- window can have: a retry is created after the run it retries has ended (only an
-- ended run can be retried), so its `created_at` is at or after that run's
-- `finished_at`. Retries are rare (a few in a thousand runs), so the chains are
-- followed in a hash of this small set instead of a lookup per failure.
CREATE INDEX runs_retries_created_idx ON runs (created_at) INCLUDE (id, retry_of) WHERE retry_of IS NOT NULL;

-- The added parameters (`newest`, `max_rows`, `after_*`) make new signatures: the old
-- ones go first, so that a call with the old arguments is not ambiguous.
DROP FUNCTION flaky_failures(timestamptz, timestamptz, text, text, uuid, run_kind);
DROP FUNCTION flaky_steps(timestamptz, timestamptz, text, text, uuid, run_kind);

-- The window's failed steps after the one `after_*` names, in the order of the flaky
-- list (newest first, then by run and step); all of them when `after_at` is NULL.
-- Written once for `flaky_steps` and `flaky_failures`; a plain SQL function, inlined,
-- read from `run_steps_failed_idx`.
CREATE FUNCTION failed_steps_after(since timestamptz, until timestamptz, in_pool text, in_label text,
                                   in_schedule uuid, in_kind run_kind, after_at timestamptz, after_run uuid,
                                   after_idx integer)
RETURNS SETOF run_steps LANGUAGE sql STABLE AS $$
    SELECT s.* FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) s
    WHERE s.status = 'failed'
      AND (after_at IS NULL OR s.run_finished_at < after_at
           OR (s.run_finished_at = after_at AND (s.run_id, s.idx) > (after_run, after_idx)))
$$;

-- The passes in [since, until) of one module with one params key on one device, with
-- the schedule and kind filters of the window's steps (pool and label are the
-- device's, which a failure shares with these passes). Written once for `flaky_steps`
-- and `module_figures`; a plain SQL function, inlined, read from `run_steps_passes_idx`.
CREATE FUNCTION window_passes(since timestamptz, until timestamptz, in_schedule uuid, in_kind run_kind,
                              in_device uuid, in_module text, in_params_key bigint)
RETURNS SETOF run_steps LANGUAGE sql STABLE AS $$
    SELECT p.* FROM run_steps p
    WHERE p.device_id = in_device AND p.module = in_module AND p.params_key = in_params_key
      AND p.status = 'passed' AND p.run_finished_at >= since AND p.run_finished_at < until
      AND (in_schedule IS NULL OR p.schedule_id = in_schedule)
      AND (in_kind IS NULL OR p.run_kind = in_kind)
$$;

-- The retries that passed the given failed steps (their runs and step indexes, in two
-- arrays), retries of retries included: (the failed run, its step, the retry). Written
-- once for `flaky_steps` and `module_figures`. The retries created since the window
-- began are all that a failure in it can have (`runs_retries_created_idx` says why),
-- so the chains are followed in a hash of that small set.
CREATE FUNCTION passed_retries(since timestamptz, failed_runs uuid[], failed_idxs integer[])
RETURNS TABLE (root uuid, idx integer, retry uuid)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH RECURSIVE retries AS MATERIALIZED (
        SELECT r.id, r.retry_of FROM runs r WHERE r.retry_of IS NOT NULL AND r.created_at >= since),
      chain (root, idx, id) AS (
        SELECT f.run_id, f.idx, r.id FROM unnest(failed_runs, failed_idxs) AS f(run_id, idx)
        JOIN retries r ON r.retry_of = f.run_id
        UNION
        SELECT c.root, c.idx, r.id FROM chain c JOIN retries r ON r.retry_of = c.id)
    SELECT c.root, c.idx, c.id FROM chain c
    -- A lookup per retry by primary key, whatever the estimate of the chain.
    WHERE (SELECT s.status FROM run_steps s WHERE s.run_id = c.id AND s.idx = c.idx) = 'passed';
END
$$;

-- Flaky failed verdicts (docs/dashboard.md), as 0012 defined them: a failed step of a
-- run that ended in [since, until) is flaky when a retry of its run (following
-- `retry_of`, retries of retries included) passed the same step, or when the same
-- module with the same effective params (the params key) passed on the same device in
-- that window, in another run (the ten most recent such passes are listed). The
-- filters apply to the failures and to the passes alike (pool and label are those of
-- the device, which both share). `newest`: decide only the window's newest that many
-- failed steps (NULL: all of them) after the one `after_*` names, in the order newest
-- first, then by run and step (NULL: from the newest).
CREATE FUNCTION flaky_steps(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                            in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                            in_kind run_kind DEFAULT NULL, newest bigint DEFAULT NULL,
                            after_at timestamptz DEFAULT NULL, after_run uuid DEFAULT NULL,
                            after_idx integer DEFAULT NULL)
RETURNS TABLE (run_id uuid, idx integer, module text, device_id uuid, failed_at timestamptz,
               passed_on_retry uuid[], passed_on_same_device uuid[])
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH failed AS MATERIALIZED (
        SELECT s.run_id, s.idx, s.module, s.params_key, s.device_id, s.run_finished_at AS at
        FROM failed_steps_after(since, until, in_pool, in_label, in_schedule, in_kind, after_at, after_run,
                                after_idx) s
        ORDER BY s.run_finished_at DESC, s.run_id, s.idx
        LIMIT newest),
      -- Each (module, params key, device) with a failure looks up its passes once, not
      -- once per failure: the eleven newest, so that ten remain when the failure's own
      -- run is among them. No tie-break is needed after the time: the runs of one
      -- device end one after another, so steps that end together are of one run.
      groups AS MATERIALIZED (
        SELECT f.module, f.device_id,
               array_agg(f.run_id) AS runs, array_agg(f.idx) AS idxs, array_agg(f.at) AS ats,
               ARRAY(SELECT p.run_id
                     FROM window_passes(since, until, in_schedule, in_kind, f.device_id, f.module, f.params_key) p
                     ORDER BY p.run_finished_at DESC LIMIT 11) AS passes
        FROM failed f
        GROUP BY f.module, f.params_key, f.device_id),
      on_device AS MATERIALIZED (
        SELECT u.run_id, u.idx, g.module, g.device_id, u.at,
               COALESCE((array_remove(g.passes, u.run_id))[1:10], '{}') AS passes
        FROM groups g, unnest(g.runs, g.idxs, g.ats) AS u(run_id, idx, at)),
      retried AS (
        SELECT p.root, p.idx, array_agg(p.retry ORDER BY p.retry) AS on_retry
        FROM passed_retries(since, (SELECT array_agg(f.run_id) FROM failed f), (SELECT array_agg(f.idx) FROM failed f)) p
        GROUP BY p.root, p.idx)
    SELECT f.run_id, f.idx, f.module, f.device_id, f.at, COALESCE(r.on_retry, '{}'), f.passes
    FROM on_device f LEFT JOIN retried r ON r.root = f.run_id AND r.idx = f.idx
    WHERE r.on_retry IS NOT NULL OR cardinality(f.passes) > 0;
END
$$;

-- The flaky failures, newest first (then by run and step), with what a reader wants
-- beside them: the step's params and the device's serial (`GET /dashboard/flaky`,
-- Grafana's flaky panel). `max_rows`: at most that many (NULL: all). `after_*`: only
-- those after this failure in that order (the API's cursor).
--
-- A page does not need the whole window decided. It decides the failures after the
-- cursor in slices, newest first: twice as many as asked, then (while too few of
-- them were flaky) the next slice, twice as large, after the last failure of the one
-- before; each slice's flaky failures are returned as it is decided. Every failure is
-- decided once, and every failure between the cursor and the last one decided was
-- decided, so the page is exact. At 7 days over 1,000,000 runs a page of 50 takes
-- ~10 ms, all ~3,900 flaky failures ~75 ms (docs/performance.md).
CREATE FUNCTION flaky_failures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                               in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                               in_kind run_kind DEFAULT NULL, max_rows bigint DEFAULT NULL,
                               after_at timestamptz DEFAULT NULL, after_run uuid DEFAULT NULL,
                               after_idx integer DEFAULT NULL)
RETURNS TABLE (run_id uuid, idx integer, module text, params jsonb, device_id uuid, device_serial text,
               failed_at timestamptz, passed_on_retry uuid[], passed_on_same_device uuid[])
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
DECLARE
    wanted bigint := max_rows;
    slice bigint := max_rows * 2;
    returned bigint;
    last_at timestamptz := after_at;
    last_run uuid := after_run;
    last_idx integer := after_idx;
BEGIN
    LOOP
        RETURN QUERY
        SELECT f.run_id, f.idx, f.module, s.params, f.device_id, d.serial, f.failed_at, f.passed_on_retry,
               f.passed_on_same_device
        FROM flaky_steps(since, until, in_pool, in_label, in_schedule, in_kind, slice, last_at, last_run, last_idx) f
        JOIN run_steps s ON s.run_id = f.run_id AND s.idx = f.idx
        LEFT JOIN devices d ON d.id = f.device_id
        ORDER BY f.failed_at DESC, f.run_id, f.idx
        LIMIT wanted;
        -- All of them (no limit), or the page is full.
        EXIT WHEN max_rows IS NULL;
        GET DIAGNOSTICS returned = ROW_COUNT;
        wanted := wanted - returned;
        EXIT WHEN wanted <= 0;
        -- The last failure of this slice; none: fewer were left, and all are decided.
        SELECT s.run_finished_at, s.run_id, s.idx INTO last_at, last_run, last_idx
        FROM failed_steps_after(since, until, in_pool, in_label, in_schedule, in_kind, last_at, last_run,
                                last_idx) s
        ORDER BY s.run_finished_at DESC, s.run_id, s.idx
        OFFSET slice - 1 LIMIT 1;
        EXIT WHEN NOT FOUND;
        slice := slice * 2;
    END LOOP;
END
$$;

-- Per module, its steps of the runs that ended in [since, until) by status, and how
-- many of its failures were flaky (`GET /dashboard/modules`), in one read of the
-- window's steps (`run_steps_window_idx`) instead of that read plus `flaky_steps`: the
-- counts by status come per (module, params key, device), with the first and last time
-- a step of the group passed. A group whose passes ended at two different times passed
-- in two runs (a run's steps end with it), so each of its failures passed in another
-- run: flaky, as `flaky_steps` decides. Only the failures of the other groups (no
-- pass, or passes that ended together) are looked at one by one, by the same rules.
-- `flaky_steps` lists; this counts; the dashboard test checks that they agree.
CREATE OR REPLACE FUNCTION module_figures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                                          in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                                          in_kind run_kind DEFAULT NULL)
RETURNS TABLE (module text, passed bigint, failed bigint, errored bigint, timed_out bigint, flaky bigint)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH g AS MATERIALIZED (
        SELECT s.module, s.params_key, s.device_id,
               count(*) FILTER (WHERE s.status = 'passed') AS passed,
               count(*) FILTER (WHERE s.status = 'failed') AS failed,
               count(*) FILTER (WHERE s.status = 'errored') AS errored,
               count(*) FILTER (WHERE s.status = 'timed_out') AS timed_out,
               min(s.run_finished_at) FILTER (WHERE s.status = 'passed') AS first_pass,
               max(s.run_finished_at) FILTER (WHERE s.status = 'passed') AS last_pass
        FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) s
        GROUP BY s.module, s.params_key, s.device_id),
      -- The failures of the groups that their passes do not settle (materialized, so
      -- that only these few are looked at one by one below) ...
      undecided AS MATERIALIZED (
        SELECT f.run_id, f.idx, f.module, f.params_key, f.device_id
        FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) f
        JOIN g ON g.module = f.module AND g.params_key = f.params_key AND g.device_id = f.device_id
        WHERE f.status = 'failed' AND g.failed > 0 AND (g.first_pass IS NULL OR g.first_pass = g.last_pass)),
      -- ... of which those that did not pass on their device in another run ...
      unsettled AS MATERIALIZED (
        SELECT f.run_id, f.idx, f.module FROM undecided f
        WHERE NOT EXISTS (
            SELECT FROM window_passes(since, until, in_schedule, in_kind, f.device_id, f.module, f.params_key) p
            WHERE p.run_id <> f.run_id)),
      by_retry AS MATERIALIZED (
        SELECT DISTINCT p.root, p.idx
        FROM passed_retries(since, (SELECT array_agg(u.run_id) FROM unsettled u),
                            (SELECT array_agg(u.idx) FROM unsettled u)) p),
      -- ... and whose retries did not pass the step either: not flaky.
      not_flaky AS (
        SELECT u.module, count(*) AS n FROM unsettled u
        WHERE NOT EXISTS (SELECT FROM by_retry b WHERE b.root = u.run_id AND b.idx = u.idx)
        GROUP BY u.module),
      m AS (
        SELECT g.module, sum(g.passed)::bigint AS passed, sum(g.failed)::bigint AS failed,
               sum(g.errored)::bigint AS errored, sum(g.timed_out)::bigint AS timed_out
        FROM g GROUP BY g.module)
    SELECT m.module, m.passed, m.failed, m.errored, m.timed_out, m.failed - COALESCE(n.n, 0)
    FROM m LEFT JOIN not_flaky n ON n.module = m.module
    ORDER BY m.module;
END
$$;
