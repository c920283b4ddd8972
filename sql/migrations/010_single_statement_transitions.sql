-- A run's two transitions, to running and to its terminal state, as functions that set their
-- own scope, like the emit of migration 008. The runner sends each alone, as its own
-- transaction: one round trip instead of three, and no backend sits idle in a transaction
-- between BEGIN, the statement and COMMIT while the worker's event loop is busy elsewhere.
-- Each bypasses row-level security only when its caller set no scope, and returns one row: the
-- experiment's row after the move, event_seq and event_created_at of its status event, and
-- current_status. When the guard matches no row, the experiment columns and the event columns
-- are NULL and current_status is the experiment's status (NULL too when it does not exist).

-- Moves a queued experiment to running; $2 is the status event's payload.
CREATE FUNCTION iiq.mark_running(uuid, jsonb)
    RETURNS TABLE (experiment iiq.experiments, event_seq integer, event_created_at timestamptz, current_status text)
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM iiq.bypass_unless_scoped();
    RETURN QUERY
    WITH moved AS (
        UPDATE iiq.experiments AS e
        SET status = 'running', started_at = now(), last_event_seq = e.last_event_seq + 1
        WHERE e.id = $1 AND e.status = 'queued'
        RETURNING e AS moved_row, e.id, e.org_id, e.last_event_seq, e.status
    ), event AS (
        INSERT INTO iiq.experiment_events AS ev (org_id, experiment_id, seq, event_type, stage, payload)
        SELECT moved.org_id, moved.id, moved.last_event_seq, 'status', moved.status, $2 FROM moved
        RETURNING ev.seq, ev.created_at
    )
    SELECT moved.moved_row, event.seq, event.created_at, moved.status FROM moved, event;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::iiq.experiments, NULL::integer, NULL::timestamptz, e.status
        FROM iiq.experiments AS e WHERE e.id = $1;
    END IF;
END
$$;

-- Ends a running experiment as $2 (completed, failed, cancelled or timed_out), with results
-- summary $3 or error message $4, charging $5 GPU-hours to the month current at $7 (NULL: the
-- database's now()) and releasing its quota share; $6 is the status event's payload.
CREATE FUNCTION iiq.finish_running(uuid, text, jsonb, text, double precision, jsonb, timestamptz)
    RETURNS TABLE (experiment iiq.experiments, event_seq integer, event_created_at timestamptz, current_status text)
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM iiq.bypass_unless_scoped();
    RETURN QUERY
    WITH moved AS (
        UPDATE iiq.experiments AS e
        SET status = $2, results_summary = $3, error_message = $4, actual_gpu_hours = $5, finished_at = now(),
            last_event_seq = e.last_event_seq + 1
        WHERE e.id = $1 AND e.status = 'running'
        RETURNING e AS moved_row, e.id, e.org_id, e.last_event_seq, e.status, e.estimated_gpu_hours
    ), event AS (
        INSERT INTO iiq.experiment_events AS ev (org_id, experiment_id, seq, event_type, stage, payload)
        SELECT moved.org_id, moved.id, moved.last_event_seq, 'status', moved.status, $6 FROM moved
        RETURNING ev.seq, ev.created_at
    ), released AS (
        SELECT iiq.release_quota(moved.org_id, moved.estimated_gpu_hours, $5, $7) FROM moved
    )
    SELECT moved.moved_row, event.seq, event.created_at, moved.status FROM moved, event, released;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::iiq.experiments, NULL::integer, NULL::timestamptz, e.status
        FROM iiq.experiments AS e WHERE e.id = $1;
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION iiq.mark_running(uuid, jsonb) TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.finish_running(uuid, text, jsonb, text, double precision, jsonb, timestamptz)
    TO iiq_service;
