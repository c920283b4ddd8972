-- name: delete_expired_key
-- Frees an expired key for reuse before the claim below tries to insert it again.
DELETE FROM iiq.idempotency_keys
WHERE org_id = $1 AND key = $2 AND expires_at <= now();

-- name: claim_key
-- Returns no row when the key exists. A concurrent transaction that inserted the same key
-- makes this statement wait until that transaction commits (then: no row) or rolls back
-- (then: this insert goes ahead).
INSERT INTO iiq.idempotency_keys (org_id, key, request_hash, created_at, expires_at)
VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))
ON CONFLICT (org_id, key) DO NOTHING
RETURNING org_id;

-- name: get_key
SELECT request_hash, experiment_id, created_at, expires_at
FROM iiq.idempotency_keys
WHERE org_id = $1 AND key = $2;

-- name: set_key_experiment
UPDATE iiq.idempotency_keys SET experiment_id = $3 WHERE org_id = $1 AND key = $2;

-- name: purge_expired_keys
-- Deletes up to $2 of the org's expired keys. SKIP LOCKED leaves rows that another
-- transaction is deleting or reclaiming to that transaction instead of waiting for it.
DELETE FROM iiq.idempotency_keys
WHERE (org_id, key) IN (
    SELECT org_id, key FROM iiq.idempotency_keys
    WHERE org_id = $1 AND expires_at <= now()
    LIMIT $2
    FOR UPDATE SKIP LOCKED
);
