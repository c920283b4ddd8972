-- Tenancy, experiments, events and quota, each tenant table under forced row-level security.
--
-- The service connects as (or switches to) iiq_service, which is neither superuser nor
-- BYPASSRLS, because superusers and roles with BYPASSRLS skip every policy. API transactions
-- set app.org_id with set_config(..., true); runner-side transactions set app.rls_bypass the
-- same transaction-local way. An unset org reads as '' after a transaction, hence NULLIF:
-- no org set means no rows (fail closed).

CREATE SCHEMA IF NOT EXISTS iiq;

DO $$
BEGIN
    -- Roles are shared by every database of the cluster, so another database may have made it.
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'iiq_service') THEN
        CREATE ROLE iiq_service NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    -- A non-superuser owner must be a member to SET ROLE iiq_service on its connections.
    -- Granting again to a member without ADMIN OPTION fails, so members are left alone.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'iiq_service', 'MEMBER') THEN
        EXECUTE format('GRANT iiq_service TO %I', current_user);
    END IF;
END
$$;

CREATE FUNCTION iiq.current_org() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('app.org_id', true), '')::uuid $$;

CREATE FUNCTION iiq.rls_bypassed() RETURNS boolean
    LANGUAGE sql STABLE
    AS $$ SELECT coalesce(current_setting('app.rls_bypass', true), '') = 'true' $$;

CREATE TABLE iiq.orgs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE iiq.api_keys (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    -- The public part of the key, used to find the row; the secret part is only hashed.
    prefix      text NOT NULL UNIQUE,
    key_hash    bytea NOT NULL,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_org ON iiq.api_keys (org_id, created_at);

CREATE TABLE iiq.experiments (
    id                    uuid PRIMARY KEY,
    org_id                uuid NOT NULL REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    tool_id               text NOT NULL,
    target                jsonb NOT NULL,
    input_config          jsonb NOT NULL,
    goal                  text CHECK (goal IN ('throughput', 'latency', 'cost', 'memory')),
    status                text NOT NULL CHECK (
                              status IN ('pending', 'queued', 'running', 'completed',
                                         'failed', 'cancelled', 'timed_out')),
    estimated_gpu_hours   double precision NOT NULL
                          CHECK (estimated_gpu_hours >= 0 AND estimated_gpu_hours <> 'NaN'),
    actual_gpu_hours      double precision CHECK (actual_gpu_hours >= 0),
    -- GPUs the run holds while it runs: 0 for tools that hold none.
    gpu_count             integer NOT NULL CHECK (gpu_count >= 0),
    timeout_seconds       double precision NOT NULL CHECK (timeout_seconds > 0),
    results_summary       jsonb,
    error_message         text,
    created_by            text,
    job_id                bigint,
    last_event_seq        integer NOT NULL DEFAULT 0,
    cancel_requested_at   timestamptz,
    -- Refreshed by the worker process running the experiment; a stale one means the worker is lost.
    heartbeat_at          timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    queued_at             timestamptz,
    started_at            timestamptz,
    finished_at           timestamptz
);
CREATE INDEX experiments_org_created ON iiq.experiments (org_id, created_at DESC, id DESC);
CREATE INDEX experiments_org_active ON iiq.experiments (org_id)
    WHERE status IN ('pending', 'queued', 'running');
CREATE INDEX experiments_running ON iiq.experiments (started_at) WHERE status = 'running';

CREATE TABLE iiq.experiment_events (
    org_id         uuid NOT NULL,
    experiment_id  uuid NOT NULL REFERENCES iiq.experiments (id) ON DELETE CASCADE,
    -- 1, 2, 3, ... per experiment, assigned under the experiment's row lock (commit order).
    seq            integer NOT NULL,
    event_type     text NOT NULL,
    stage          text,
    payload        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (experiment_id, seq)
);
CREATE INDEX experiment_events_org ON iiq.experiment_events (org_id, experiment_id, seq);

CREATE TABLE iiq.experiment_quota (
    org_id             uuid PRIMARY KEY REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    -- 'NaN' sorts above every number in Postgres, so `>= 0` alone would admit it.
    monthly_gpu_hours  double precision NOT NULL CHECK (monthly_gpu_hours >= 0 AND monthly_gpu_hours <> 'NaN'),
    max_concurrent     integer NOT NULL CHECK (max_concurrent > 0),
    used_gpu_hours     double precision NOT NULL DEFAULT 0
                           CHECK (used_gpu_hours >= 0 AND used_gpu_hours <> 'NaN'),
    month_resets_at    timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE iiq.orgs ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.orgs FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.orgs
    USING (id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (id = iiq.current_org() OR iiq.rls_bypassed());

ALTER TABLE iiq.api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.api_keys
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

ALTER TABLE iiq.experiments ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.experiments FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.experiments
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

ALTER TABLE iiq.experiment_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.experiment_events FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.experiment_events
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

ALTER TABLE iiq.experiment_quota ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.experiment_quota FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.experiment_quota
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

GRANT USAGE ON SCHEMA iiq TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.current_org(), iiq.rls_bypassed() TO iiq_service;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON iiq.orgs, iiq.api_keys, iiq.experiments, iiq.experiment_events, iiq.experiment_quota
    TO iiq_service;
