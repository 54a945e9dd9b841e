-- Idempotency keys, the way payment APIs keep them: scoped to the caller (the token
-- that sent the key), bound to the request they came with (a fingerprint of its path
-- and body: the same key with another request is refused), and expiring (24 h by
-- default), instead of global and forever.
ALTER TABLE runs
    ADD COLUMN idempotency_scope text,
    ADD COLUMN idempotency_fingerprint text,
    ADD COLUMN idempotency_expires_at timestamptz;
UPDATE runs SET idempotency_scope = 'legacy' WHERE idempotency_key IS NOT NULL;
DROP INDEX runs_idempotency_idx;
CREATE UNIQUE INDEX runs_idempotency_idx ON runs (idempotency_scope, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
