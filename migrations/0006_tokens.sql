-- API tokens (issue 10): an optional expiry. Only a SHA-256 of each secret is kept
-- (`token_hash`, unique): the secrets are 256 random bits, so a slow password hash
-- would buy nothing.
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
