-- Workflows and campaigns run server-side.
-- A campaign run is `running` while its children run, without a lease of its own.
ALTER TABLE runs DROP CONSTRAINT runs_check;
ALTER TABLE runs ADD CONSTRAINT runs_lease_matches_status
    CHECK (kind = 'campaign' OR (status = 'running') = (lease_owner IS NOT NULL));

-- A campaign's child waits `held` (not claimable) until the campaign admits it, so
-- max_parallel holds across workers and crashes.
ALTER TABLE runs ADD COLUMN held boolean NOT NULL DEFAULT false;
-- The child's item position in its campaign (children start in item order).
ALTER TABLE runs ADD COLUMN parent_index integer;
CREATE INDEX runs_children_order_idx ON runs (parent_run_id, parent_index) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_active_campaigns_idx ON runs (created_at) WHERE kind = 'campaign' AND status = 'running';
