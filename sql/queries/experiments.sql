-- name: insert_experiment
-- Inserts the experiment with its `pending` status event (seq 1). quota_has_room tells whether
-- the org's quota has room for it at $13: a read without a lock, so that a create bound to be
-- refused stops here; `admit_experiment`, the create transaction's last statement, decides.
WITH experiment AS (
    INSERT INTO iiq.experiments (
        id, org_id, tool_id, target, input_config, goal, status, estimated_gpu_hours, gpu_count,
        timeout_seconds, created_by, template_id, config_hash, last_event_seq, created_at
    )
    VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, $10, $11, $12, 1, now())
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, 1, 'status', 'pending', '{"status": "pending"}'::jsonb FROM experiment
    RETURNING seq
)
SELECT experiment.*,
       coalesce((SELECT iiq.quota_has_room(q, $7::float8, $13::timestamptz)
                 FROM iiq.experiment_quota q WHERE q.org_id = $2), false) AS quota_has_room
FROM experiment, event;

-- name: get_experiment
SELECT * FROM iiq.experiments WHERE id = $1;

-- name: get_experiment_status
SELECT status, cancel_requested_at IS NOT NULL AS cancel_requested
FROM iiq.experiments
WHERE id = $1;

-- name: list_experiments
-- Keyset pagination on (created_at, id), newest first; $3 and $4 are the cursor or NULL.
SELECT * FROM iiq.experiments
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR tool_id = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5;

-- Each transition below is one statement: the guarded UPDATE of the experiment, its status
-- event numbered in that same UPDATE, and for transitions out of pending, queued or running, the
-- release of its quota share. Each returns the experiment's row plus event_seq and
-- event_created_at; no row when the guard did not match.

-- name: mark_queued
-- $3: the status event's payload.
WITH moved AS (
    UPDATE iiq.experiments
    SET status = 'queued', job_id = $2, queued_at = now(), last_event_seq = last_event_seq + 1
    WHERE id = $1 AND status = 'pending'
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, last_event_seq, 'status', status, $3::jsonb FROM moved
    RETURNING seq, created_at
)
SELECT moved.*, event.seq AS event_seq, event.created_at AS event_created_at FROM moved, event;

-- name: mark_running
-- $2: the status event's payload.
WITH moved AS (
    UPDATE iiq.experiments
    SET status = 'running', started_at = now(), last_event_seq = last_event_seq + 1
    WHERE id = $1 AND status = 'queued'
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, last_event_seq, 'status', status, $2::jsonb FROM moved
    RETURNING seq, created_at
)
SELECT moved.*, event.seq AS event_seq, event.created_at AS event_created_at FROM moved, event;

-- name: mark_completed
-- $2: results summary; $3: actual GPU-hours of the run, charged to the month current at $5
-- ($6: the next monthly reset); $4: the status event's payload.
WITH moved AS (
    UPDATE iiq.experiments
    SET status = 'completed', results_summary = $2, actual_gpu_hours = $3, finished_at = now(),
        last_event_seq = last_event_seq + 1
    WHERE id = $1 AND status = 'running'
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, last_event_seq, 'status', status, $4::jsonb FROM moved
    RETURNING seq, created_at
), released AS (
    SELECT iiq.release_quota(org_id, estimated_gpu_hours, $3::float8, $5::timestamptz, $6::timestamptz) FROM moved
)
SELECT moved.*, event.seq AS event_seq, event.created_at AS event_created_at FROM moved, event, released;

-- name: mark_ended
-- Ends a running experiment as $2 (failed, cancelled or timed_out) with error message $3;
-- $4: actual GPU-hours, charged as in mark_completed ($6, $7); $5: the status event's payload.
WITH moved AS (
    UPDATE iiq.experiments
    SET status = $2, error_message = $3, actual_gpu_hours = $4, finished_at = now(),
        last_event_seq = last_event_seq + 1
    WHERE id = $1 AND status = 'running'
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, last_event_seq, 'status', status, $5::jsonb FROM moved
    RETURNING seq, created_at
), released AS (
    SELECT iiq.release_quota(org_id, estimated_gpu_hours, $4::float8, $6::timestamptz, $7::timestamptz) FROM moved
)
SELECT moved.*, event.seq AS event_seq, event.created_at AS event_created_at FROM moved, event, released;

-- name: cancel_not_started
-- $2: the error message; $3: the status event's payload; nothing is charged ($4, $5 as in
-- mark_completed).
WITH moved AS (
    UPDATE iiq.experiments
    SET status = 'cancelled', cancel_requested_at = coalesce(cancel_requested_at, now()),
        error_message = $2, actual_gpu_hours = 0, finished_at = now(),
        last_event_seq = last_event_seq + 1
    WHERE id = $1 AND status IN ('pending', 'queued')
    RETURNING *
), event AS (
    INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
    SELECT org_id, id, last_event_seq, 'status', status, $3::jsonb FROM moved
    RETURNING seq, created_at
), released AS (
    SELECT iiq.release_quota(org_id, estimated_gpu_hours, 0::float8, $4::timestamptz, $5::timestamptz) FROM moved
)
SELECT moved.*, event.seq AS event_seq, event.created_at AS event_created_at FROM moved, event, released;

-- name: request_cancel
UPDATE iiq.experiments
SET cancel_requested_at = now()
WHERE id = $1 AND status = 'running' AND cancel_requested_at IS NULL
RETURNING *;

-- name: lock_experiment
SELECT * FROM iiq.experiments WHERE id = $1 FOR UPDATE;

-- name: count_running_by_tool
SELECT tool_id, count(*)::int AS running
FROM iiq.experiments
WHERE status = 'running'
GROUP BY tool_id;
