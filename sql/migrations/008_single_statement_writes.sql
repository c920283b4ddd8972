-- The two busiest writes as functions that set their own row-level scope. Sent alone, outside
-- an explicit transaction, each call is its own transaction: one round trip instead of three
-- (BEGIN with the scope, the statement, COMMIT), and Postgres commits, releasing the row locks
-- the statement took, before it replies. Inside a transaction they work the same way.
--
-- Each sets the scope only when the caller has set none, so a call inside a transaction scoped
-- to another org fails the tables' row-level security checks instead of widening the scope.
-- set_config(..., true) lasts until the end of the transaction, which for a call sent alone is
-- the end of the call.

-- The scope of these writes: the caller's, when it set one, or else the org's (API writes) or
-- the bypass (runner writes), until the end of the transaction.
CREATE FUNCTION iiq.scope_to_org_unless_scoped(org uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF iiq.current_org() IS NULL AND NOT iiq.rls_bypassed() THEN
        PERFORM set_config('app.org_id', org::text, true);
    END IF;
END
$$;

CREATE FUNCTION iiq.bypass_unless_scoped() RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF iiq.current_org() IS NULL AND NOT iiq.rls_bypassed() THEN
        PERFORM set_config('app.rls_bypass', 'true', true);
    END IF;
END
$$;

-- Creates a queued experiment, or nothing when its org's quota has no room. The parameters and
-- the statement are those documented at `create_experiment` in sql/queries/experiments.sql,
-- which calls this function. Returns the experiment's row plus queued_event_created_at.
CREATE FUNCTION iiq.create_experiment(
    uuid, uuid, text, jsonb, jsonb, text, double precision, integer, double precision, text, uuid, text,
    timestamptz, text, text, jsonb
) RETURNS TABLE (experiment iiq.experiments, queued_event_created_at timestamptz)
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM iiq.scope_to_org_unless_scoped($2);
    RETURN QUERY
    WITH clock AS (
        SELECT coalesce($13, now()) AS as_of
    ), admitted AS (
        UPDATE iiq.experiment_quota
        SET used_gpu_hours = CASE WHEN clock.as_of >= month_resets_at THEN 0 ELSE used_gpu_hours END,
            month_resets_at = CASE WHEN clock.as_of >= month_resets_at
                                   THEN iiq.next_month_start(clock.as_of) ELSE month_resets_at END,
            active = active + 1,
            reserved_gpu_hours = reserved_gpu_hours + $7,
            updated_at = now()
        FROM clock
        WHERE org_id = $2 AND iiq.quota_has_room(experiment_quota, $7, clock.as_of)
        RETURNING org_id
    ), job AS (
        SELECT (procrastinate_defer_jobs_v1(ARRAY[
            ROW($14::varchar, $15::varchar, 0, NULL, NULL, $16, NULL)::procrastinate_job_to_defer_v1
        ]))[1] AS id
        FROM admitted
    ), created AS (
        INSERT INTO iiq.experiments AS e (
            id, org_id, tool_id, target, input_config, goal, status, estimated_gpu_hours, gpu_count,
            timeout_seconds, created_by, template_id, config_hash, job_id, last_event_seq, created_at, queued_at
        )
        SELECT $1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11, $12, job.id, 2, now(), now()
        FROM job
        RETURNING e AS experiment_row, e.id, e.org_id
    ), event AS (
        INSERT INTO iiq.experiment_events AS ev (org_id, experiment_id, seq, event_type, stage, payload)
        SELECT created.org_id, created.id, step.seq, 'status', step.stage, jsonb_build_object('status', step.stage)
        FROM created, (VALUES (1, 'pending'), (2, 'queued')) AS step (seq, stage)
        RETURNING ev.seq, ev.created_at
    )
    SELECT created.experiment_row, (SELECT event.created_at FROM event WHERE event.seq = 2) FROM created;
END
$$;

-- Appends a handler's event to a running experiment, numbered under the experiment's row lock
-- so that sequence order is commit order, and ordered by that lock against the terminal
-- transition, so no handler event follows the terminal event. Runner-side: it bypasses
-- row-level security when the caller set no scope. Returns one row: the event's seq and
-- created_at with status 'running', or a NULL seq and the experiment's status when it is not
-- running; no row when the experiment does not exist.
CREATE FUNCTION iiq.append_running_event(experiment uuid, event_type text, stage text, payload jsonb)
    RETURNS TABLE (seq integer, created_at timestamptz, status text)
    LANGUAGE plpgsql
    AS $$
#variable_conflict use_variable
BEGIN
    PERFORM iiq.bypass_unless_scoped();
    RETURN QUERY
    WITH next AS (
        UPDATE iiq.experiments AS e
        SET last_event_seq = e.last_event_seq + 1
        WHERE e.id = experiment AND e.status = 'running'
        RETURNING e.org_id, e.last_event_seq
    )
    INSERT INTO iiq.experiment_events AS ev (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT next.org_id, experiment, next.last_event_seq, event_type, stage, payload FROM next
    RETURNING ev.seq, ev.created_at, 'running'::text;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::integer, NULL::timestamptz, e.status FROM iiq.experiments AS e WHERE e.id = experiment;
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION iiq.create_experiment(
    uuid, uuid, text, jsonb, jsonb, text, double precision, integer, double precision, text, uuid, text,
    timestamptz, text, text, jsonb
) TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.append_running_event(uuid, text, text, jsonb) TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.scope_to_org_unless_scoped(uuid), iiq.bypass_unless_scoped() TO iiq_service;
