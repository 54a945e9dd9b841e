-- Day rollups of the steps' outcomes, for the per-module figures (issue 12's 50 ms
-- goal). `module_figures` counted a window's steps one by one: ~100,000 index entries
-- hashed at 7 days over 1,000,000 runs, 37 ms at best. A day that has ended never
-- changes (a run's steps are written with it and never after it ended), so each whole
-- day is counted once, by the scheduler, into one row per (module, params key, device,
-- schedule, kind) with that day's counts and its first and last pass. A window is then
-- its whole days' rows plus its two ragged ends counted live: together one day of
-- steps at most, whatever the window's length.
--
-- Nothing on the hot path: the rollup is written by the scheduler after the day has
-- ended, and read only by `module_figures`. Until a day is rolled up, it is counted
-- live, so the figures never depend on the rollup being current, only their speed.

-- One row per (day, module, params key, device, schedule, kind) that had a step of a
-- run that ended that day (UTC days: `date_bin` from the epoch, whatever the session's
-- time zone), and one per (week, ...) once the week's seven days are rolled up: long
-- windows read whole weeks, a few times fewer rows than their days.
CREATE TABLE step_days (
    -- 1: a day; 7: a week (Monday to Sunday, UTC), the sum of its days' rows.
    days        smallint NOT NULL CHECK (days IN (1, 7)),
    -- The first day it counts.
    day         timestamptz NOT NULL,
    module      text NOT NULL,
    params_key  bigint NOT NULL,
    device_id   uuid,
    schedule_id uuid,
    run_kind    run_kind NOT NULL,
    passed      integer NOT NULL,
    failed      integer NOT NULL,
    errored     integer NOT NULL,
    timed_out   integer NOT NULL,
    -- When the day's first and last pass of the group ended (NULL: none passed).
    first_pass  timestamptz,
    last_pass   timestamptz
);
-- Rows are appended a day at a time, so a window's days are a few adjacent pages.
CREATE INDEX step_days_day_idx ON step_days (days, day);

-- Where weeks begin: 2001-01-01 was a Monday.
CREATE FUNCTION week_origin() RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT timestamptz '2001-01-01 00:00:00+00'
$$;

-- How far the rollup has come: every day before `through` is in `step_days` (NULL:
-- none yet). One row, locked by the roller, so that two schedulers never roll one
-- day twice.
CREATE TABLE step_rollup (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    through timestamptz
);
INSERT INTO step_rollup DEFAULT VALUES;

-- The outcomes of the steps of the runs that ended in [since, until), with the
-- window's filters: a row per step, with the key `step_days` keeps, a 1 under its
-- status, and when it ended if it passed. Written once for the rollup (which sums a
-- day of them per key) and for the ragged ends of `module_figures` (which sums them
-- with the rollup's rows, in one aggregate); a plain SQL function, inlined, read from
-- `run_steps_window_idx`.
CREATE FUNCTION step_outcomes(since timestamptz, until timestamptz, in_pool text, in_label text, in_schedule uuid,
                              in_kind run_kind)
RETURNS TABLE (module text, params_key bigint, device_id uuid, schedule_id uuid, run_kind run_kind, passed integer,
               failed integer, errored integer, timed_out integer, passed_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.module, s.params_key, s.device_id, s.schedule_id, s.run_kind,
           (s.status = 'passed')::int, (s.status = 'failed')::int, (s.status = 'errored')::int,
           (s.status = 'timed_out')::int,
           CASE WHEN s.status = 'passed' THEN s.run_finished_at END
    FROM window_steps(since, until, in_pool, in_label, in_schedule, in_kind) s
$$;

-- The rolled-up days (`span` 1) or weeks (`span` 7) that begin in [since, until), with
-- the window's filters, as `window_steps` applies them (pool and label are the
-- device's as it is now).
CREATE FUNCTION rolled_days(span smallint, since timestamptz, until timestamptz, in_pool text, in_label text,
                            in_schedule uuid, in_kind run_kind)
RETURNS SETOF step_days LANGUAGE sql STABLE AS $$
    SELECT d.* FROM step_days d
    WHERE d.days = span AND d.day >= since AND d.day < until
      AND (in_pool IS NULL OR d.device_id IN (SELECT v.id FROM devices v WHERE v.pool = in_pool))
      AND (in_label IS NULL OR d.device_id IN (SELECT v.id FROM devices v WHERE in_label = ANY (v.labels)))
      AND (in_schedule IS NULL OR d.schedule_id = in_schedule)
      AND (in_kind IS NULL OR d.run_kind = in_kind)
$$;

-- Rolls up the next day that can no longer change, and returns it (NULL: none is
-- ready; the rollup is current). The scheduler calls it until it returns NULL.
--
-- A day can change until every run that may end in it has committed. A run's end is
-- stamped with `clock_timestamp()` inside its transaction, so it is never earlier than
-- that transaction's start: once no transaction that began before the day's end is
-- still open, every step that will ever carry a time of that day is committed, and the
-- INSERT below (a statement, hence a snapshot, taken after that check) sees them all.
-- `pg_stat_activity` shows the sessions of the roles this one may see: Switchboard's
-- processes share one role, so it sees them all.
CREATE FUNCTION roll_step_day() RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    d timestamptz;
BEGIN
    SELECT r.through INTO d FROM step_rollup r FOR UPDATE;
    IF d IS NULL THEN
        -- The first day with history (`run_steps_window_idx` answers at once), or today.
        SELECT date_bin('1 day', min(s.run_finished_at), 'epoch') INTO d FROM run_steps s
        WHERE s.run_finished_at IS NOT NULL;
        d := COALESCE(d, date_bin('1 day', now(), 'epoch'));
        UPDATE step_rollup SET through = d;
    END IF;
    IF d + interval '1 day' > clock_timestamp()
       OR EXISTS (SELECT FROM pg_stat_activity a
                  WHERE a.datname = current_database() AND a.backend_type = 'client backend'
                    AND a.pid <> pg_backend_pid()
                    AND a.xact_start < d + interval '1 day') THEN
        RETURN NULL;
    END IF;
    INSERT INTO step_days (days, day, module, params_key, device_id, schedule_id, run_kind, passed, failed,
                           errored, timed_out, first_pass, last_pass)
    SELECT 1, d, o.module, o.params_key, o.device_id, o.schedule_id, o.run_kind, sum(o.passed), sum(o.failed),
           sum(o.errored), sum(o.timed_out), min(o.passed_at), max(o.passed_at)
    FROM step_outcomes(d, d + interval '1 day', NULL, NULL, NULL, NULL) o
    GROUP BY o.module, o.params_key, o.device_id, o.schedule_id, o.run_kind;
    -- The week's last day: the week, from its days' rows (a week the rollup began in
    -- the middle of has no steps before that day, which was the first with any).
    IF date_bin('7 days', d + interval '1 day', week_origin()) = d + interval '1 day' THEN
        INSERT INTO step_days (days, day, module, params_key, device_id, schedule_id, run_kind, passed, failed,
                               errored, timed_out, first_pass, last_pass)
        SELECT 7, d - interval '6 days', w.module, w.params_key, w.device_id, w.schedule_id, w.run_kind,
               sum(w.passed), sum(w.failed), sum(w.errored), sum(w.timed_out), min(w.first_pass), max(w.last_pass)
        FROM step_days w
        WHERE w.days = 1 AND w.day >= d - interval '6 days' AND w.day <= d
        GROUP BY w.module, w.params_key, w.device_id, w.schedule_id, w.run_kind;
    END IF;
    UPDATE step_rollup SET through = d + interval '1 day';
    RETURN d;
END
$$;

-- `module_figures` as 0014 defined it, with the window's whole days read from
-- `step_days` where they are rolled up, and its whole weeks as weeks. At 7 days that is
-- six days of rows (a row stands for every step of its group that day) and one day of
-- steps at the two ends; at 30 days, three or four weeks and the days around them.
-- Windows shorter than a day are all ends: counted live, as before.
CREATE OR REPLACE FUNCTION module_figures(since timestamptz, until timestamptz, in_pool text DEFAULT NULL,
                                          in_label text DEFAULT NULL, in_schedule uuid DEFAULT NULL,
                                          in_kind run_kind DEFAULT NULL)
RETURNS TABLE (module text, passed bigint, failed bigint, errored bigint, timed_out bigint, flaky bigint)
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_custom_plan SET jit = off AS $$
#variable_conflict use_column
DECLARE
    -- The window is read as [since, rolled_from) live, [rolled_from, rolled_to) from
    -- the rollup, [rolled_to, until) live.
    rolled_from timestamptz := since;
    rolled_to timestamptz;
    weeks_from timestamptz;
    weeks_to timestamptz;
BEGIN
    -- The first whole day of the window (none before `until`: all of it is live).
    IF isfinite(since) THEN
        rolled_from := date_bin('1 day', since, 'epoch');
        IF rolled_from < since THEN
            rolled_from := rolled_from + interval '1 day';
        END IF;
    END IF;
    rolled_from := least(rolled_from, until);
    -- The last whole day of the window that is rolled up (none: all of it is live).
    SELECT r.through INTO rolled_to FROM step_rollup r;
    IF rolled_to IS NULL THEN
        rolled_to := rolled_from;
    ELSIF isfinite(until) THEN
        rolled_to := least(rolled_to, date_bin('1 day', until, 'epoch'));
    END IF;
    rolled_to := greatest(rolled_to, rolled_from);
    -- Of those, the whole weeks, read as weeks (none: days only).
    IF isfinite(rolled_from) AND isfinite(rolled_to) THEN
        weeks_from := date_bin('7 days', rolled_from, week_origin());
        IF weeks_from < rolled_from THEN
            weeks_from := weeks_from + interval '7 days';
        END IF;
        weeks_to := date_bin('7 days', rolled_to, week_origin());
    END IF;
    IF weeks_from IS NULL OR weeks_to <= weeks_from THEN
        weeks_from := rolled_to;
        weeks_to := rolled_to;
    END IF;
    RETURN QUERY
    WITH parts AS (
        SELECT d.module, d.params_key, d.device_id, d.passed, d.failed, d.errored, d.timed_out, d.first_pass,
               d.last_pass
        FROM rolled_days(1::smallint, rolled_from, weeks_from, in_pool, in_label, in_schedule, in_kind) d
        UNION ALL
        SELECT d.module, d.params_key, d.device_id, d.passed, d.failed, d.errored, d.timed_out, d.first_pass,
               d.last_pass
        FROM rolled_days(7::smallint, weeks_from, weeks_to, in_pool, in_label, in_schedule, in_kind) d
        UNION ALL
        SELECT d.module, d.params_key, d.device_id, d.passed, d.failed, d.errored, d.timed_out, d.first_pass,
               d.last_pass
        FROM rolled_days(1::smallint, weeks_to, rolled_to, in_pool, in_label, in_schedule, in_kind) d
        UNION ALL
        SELECT o.module, o.params_key, o.device_id, o.passed, o.failed, o.errored, o.timed_out, o.passed_at,
               o.passed_at
        FROM step_outcomes(since, rolled_from, in_pool, in_label, in_schedule, in_kind) o
        UNION ALL
        SELECT o.module, o.params_key, o.device_id, o.passed, o.failed, o.errored, o.timed_out, o.passed_at,
               o.passed_at
        FROM step_outcomes(rolled_to, until, in_pool, in_label, in_schedule, in_kind) o),
      g AS MATERIALIZED (
        SELECT p.module, p.params_key, p.device_id, sum(p.passed) AS passed, sum(p.failed) AS failed,
               sum(p.errored) AS errored, sum(p.timed_out) AS timed_out, min(p.first_pass) AS first_pass,
               max(p.last_pass) AS last_pass
        FROM parts p
        GROUP BY p.module, p.params_key, p.device_id),
      -- From here as 0014: a group whose passes ended at two different times passed in
      -- two runs, so each of its failures passed in another run. The failures of the
      -- groups that their passes do not settle (materialized, so that only these few
      -- are looked at one by one below) ...
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
