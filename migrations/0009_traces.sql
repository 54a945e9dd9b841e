-- The W3C trace context (`traceparent`) of the request or tick that created a run.
-- It lives with the run, not with the Redis job, so that a run delivered again after a
-- Redis loss (or recovered after a worker died) still joins the trace it began in.
ALTER TABLE runs ADD COLUMN traceparent text;
