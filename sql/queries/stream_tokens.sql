-- name: insert_stream_token
INSERT INTO iiq.stream_tokens (token_hash, org_id, experiment_id, key_id, expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
RETURNING expires_at;

-- name: delete_expired_stream_tokens
DELETE FROM iiq.stream_tokens WHERE org_id = $1 AND expires_at <= now();

-- name: find_stream_token
-- Runs before the org is known, with app.rls_bypass set. The join adds the issuing key's name and revocation.
SELECT t.org_id, t.experiment_id, t.key_id, t.expires_at, t.expires_at <= now() AS expired,
       k.name AS key_name, k.revoked_at
FROM iiq.stream_tokens t
JOIN iiq.api_keys k ON k.id = t.key_id
WHERE t.token_hash = $1;
