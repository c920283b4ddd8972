-- Stream tokens: short-lived credentials for one experiment's event stream, for browsers.
--
-- A browser's EventSource cannot send an Authorization header, so it passes a stream token in
-- the URL instead of an API key. Only the SHA-256 hash of a token is stored. The token is found
-- by that hash before the org is known, as API keys are found by their prefix, so the lookup
-- runs with app.rls_bypass set; issuing and cleanup run under the caller's org.

CREATE TABLE iiq.stream_tokens (
    -- The hash is the lookup key; the token carries 256 random bits, so hashes do not collide.
    token_hash     bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    org_id         uuid NOT NULL REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    experiment_id  uuid NOT NULL REFERENCES iiq.experiments (id) ON DELETE CASCADE,
    -- The API key that issued the token; revoking the key invalidates its tokens.
    key_id         uuid NOT NULL REFERENCES iiq.api_keys (id) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX stream_tokens_org_expires ON iiq.stream_tokens (org_id, expires_at);

ALTER TABLE iiq.stream_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.stream_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.stream_tokens
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

GRANT SELECT, INSERT, DELETE ON iiq.stream_tokens TO iiq_service;
