-- Experiment templates, the template and config hash on each experiment, and idempotency keys
-- for creates. Both new tables follow 001's pattern: forced row-level security on org_id.

CREATE TABLE iiq.experiment_templates (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tool_id       text NOT NULL,
    target        jsonb NOT NULL,
    input_config  jsonb NOT NULL,
    goal          text CHECK (goal IN ('throughput', 'latency', 'cost', 'memory')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT experiment_templates_org_name UNIQUE (org_id, name)
);
CREATE INDEX experiment_templates_org_created ON iiq.experiment_templates (org_id, created_at DESC, id DESC);

-- No foreign key on template_id: an experiment keeps the id of the template it came from after
-- that template is deleted, and deleting a template never writes to experiment rows.
-- config_hash is NULL for experiments created before this migration.
ALTER TABLE iiq.experiments
    ADD COLUMN template_id  uuid,
    ADD COLUMN config_hash  text;

CREATE TABLE iiq.idempotency_keys (
    org_id        uuid NOT NULL REFERENCES iiq.orgs (id) ON DELETE CASCADE,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    -- SHA-256 of the route and the canonical JSON of the request body.
    request_hash  text NOT NULL,
    -- Set later in the transaction that inserts the key, so a committed key always has one.
    experiment_id uuid REFERENCES iiq.experiments (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (org_id, key)
);
CREATE INDEX idempotency_keys_org_expires ON iiq.idempotency_keys (org_id, expires_at);

ALTER TABLE iiq.experiment_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.experiment_templates FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.experiment_templates
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

ALTER TABLE iiq.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE iiq.idempotency_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON iiq.idempotency_keys
    USING (org_id = iiq.current_org() OR iiq.rls_bypassed())
    WITH CHECK (org_id = iiq.current_org() OR iiq.rls_bypassed());

GRANT SELECT, INSERT, UPDATE, DELETE ON iiq.experiment_templates, iiq.idempotency_keys TO iiq_service;
