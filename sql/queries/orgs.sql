-- name: insert_org
INSERT INTO iiq.orgs (id, name) VALUES ($1, $2) RETURNING *;

-- name: get_org
SELECT * FROM iiq.orgs WHERE id = $1;

-- name: insert_api_key
INSERT INTO iiq.api_keys (id, org_id, prefix, key_hash, name)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, org_id, prefix, name, created_at, revoked_at;

-- name: find_api_key
SELECT id, org_id, key_hash, name, revoked_at FROM iiq.find_api_key($1);

-- name: revoke_api_key
UPDATE iiq.api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1
RETURNING id, org_id, prefix, name, created_at, revoked_at;
