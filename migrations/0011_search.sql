-- Search (GET /api/v1/search): names matched by trigrams, so a substring or a near
-- miss ("pixl") is found through an index, whatever the table's size. pg_trgm is a
-- trusted extension (Postgres 13+): the migrating user needs only CREATE on the
-- database.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE INDEX devices_serial_trgm_idx ON devices USING gin (serial gin_trgm_ops);
CREATE INDEX devices_name_trgm_idx ON devices USING gin (name gin_trgm_ops);
CREATE INDEX devices_labels_idx ON devices USING gin (labels);
CREATE INDEX workflows_name_trgm_idx ON workflows USING gin (name gin_trgm_ops);
CREATE INDEX campaigns_name_trgm_idx ON campaigns USING gin (name gin_trgm_ops);
CREATE INDEX schedules_name_trgm_idx ON schedules USING gin (name gin_trgm_ops);
CREATE INDEX hosts_name_trgm_idx ON hosts USING gin (name gin_trgm_ops);
-- A run found by the Idempotency-Key a client sent (whatever token sent it).
CREATE INDEX runs_idempotency_key_idx ON runs (idempotency_key) WHERE idempotency_key IS NOT NULL;
