-- The create admits the experiment last instead of first. The admission's UPDATE locks the
-- org's quota row until the commit, so every create of one org waits for the one before it to
-- commit. Taken last, the lock covers the UPDATE and the commit only, not also the job, the
-- experiment and its events, which took most of the statement's time. A check without a lock
-- comes first, so a create refused for want of room still writes nothing. When a concurrent
-- create took the last room between that check and the UPDATE, this create deletes the rows
-- it wrote and returns no row, as before. Parameters, result and scope are those of
-- migration 008.
CREATE OR REPLACE FUNCTION iiq.create_experiment(
    uuid, uuid, text, jsonb, jsonb, text, double precision, integer, double precision, text, uuid, text,
    timestamptz, text, text, jsonb
) RETURNS TABLE (experiment iiq.experiments, queued_event_created_at timestamptz)
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_as_of timestamptz := coalesce($13, now());
    v_job_id bigint;
    v_created iiq.experiments;
BEGIN
    PERFORM iiq.scope_to_org_unless_scoped($2);

    PERFORM 1 FROM iiq.experiment_quota AS q WHERE q.org_id = $2 AND iiq.quota_has_room(q, $7, v_as_of);
    IF NOT FOUND THEN
        RETURN;
    END IF;

    v_job_id := (procrastinate_defer_jobs_v1(ARRAY[
        ROW($14::varchar, $15::varchar, 0, NULL, NULL, $16, NULL)::procrastinate_job_to_defer_v1
    ]))[1];
    INSERT INTO iiq.experiments AS e (
        id, org_id, tool_id, target, input_config, goal, status, estimated_gpu_hours, gpu_count,
        timeout_seconds, created_by, template_id, config_hash, job_id, last_event_seq, created_at, queued_at
    )
    VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11, $12, v_job_id, 2, now(), now())
    RETURNING e.* INTO v_created;
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload, created_at)
    VALUES ($2, $1, 1, 'status', 'pending', '{"status": "pending"}', now()),
           ($2, $1, 2, 'status', 'queued', '{"status": "queued"}', now());

    UPDATE iiq.experiment_quota AS q
    SET used_gpu_hours = CASE WHEN v_as_of >= q.month_resets_at THEN 0 ELSE q.used_gpu_hours END,
        month_resets_at = CASE WHEN v_as_of >= q.month_resets_at
                               THEN iiq.next_month_start(v_as_of) ELSE q.month_resets_at END,
        active = q.active + 1,
        reserved_gpu_hours = q.reserved_gpu_hours + $7,
        updated_at = now()
    WHERE q.org_id = $2 AND iiq.quota_has_room(q, $7, v_as_of);
    IF NOT FOUND THEN
        -- The events go with the experiment (ON DELETE CASCADE).
        DELETE FROM iiq.experiments WHERE id = $1;
        DELETE FROM procrastinate_jobs WHERE id = v_job_id;
        RETURN;
    END IF;

    experiment := v_created;
    queued_event_created_at := now();
    RETURN NEXT;
END
$$;
