-- Authentication runs before the caller's org is known, so reading the key row needs row-level
-- security bypassed. The function-level SET bypasses it for the function's own duration only,
-- which makes the lookup one statement, without a transaction of its own around it.
CREATE FUNCTION iiq.find_api_key(key_prefix text)
    RETURNS TABLE (id uuid, org_id uuid, key_hash bytea, name text, revoked_at timestamptz)
    LANGUAGE sql STABLE
    SET app.rls_bypass = 'true'
    AS $$ SELECT id, org_id, key_hash, name, revoked_at FROM iiq.api_keys WHERE prefix = key_prefix $$;

GRANT EXECUTE ON FUNCTION iiq.find_api_key(text) TO iiq_service;
