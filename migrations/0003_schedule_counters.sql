-- Every scheduler decision is an event and a counter: fired, skipped (overlap), missed.
ALTER TABLE schedules ADD COLUMN fired_count bigint NOT NULL DEFAULT 0;
ALTER TABLE schedules ADD COLUMN skipped_count bigint NOT NULL DEFAULT 0;
ALTER TABLE schedules ADD COLUMN missed_count bigint NOT NULL DEFAULT 0;
CREATE INDEX schedules_buffered_idx ON schedules (id) WHERE buffered_for IS NOT NULL;
CREATE INDEX runs_schedule_active_idx ON runs (schedule_id) WHERE schedule_id IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX runs_fire_lag_idx ON runs (enqueued_at) WHERE trigger = 'schedule' AND scheduled_for IS NOT NULL;
