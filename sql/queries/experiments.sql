-- name: create_experiment
-- Creates a queued experiment, or nothing when its org's quota has no room, in one statement.
-- iiq.create_experiment (migrations 008 and 009) sets the org's row-level scope when the caller
-- has set none, then:
-- 1. checks, without a lock, that the org's quota has room at $13 (NULL: the database's now())
--    for one more experiment reserving $7 GPU-hours, and returns no row when it has none;
-- 2. defers its job with procrastinate's own function ($14: queue, $15: task, $16: arguments),
--    the one procrastinate's `defer_jobs` query calls;
-- 3. inserts it as queued, with its `pending` and `queued` status events (seq 1 and 2). Nothing
--    outside this transaction can see it before both events are stored;
-- 4. admits it, last: counts one more in-flight experiment reserving $7 GPU-hours on the org's
--    quota row, applying the monthly reset first when it is due. After waiting for a concurrent
--    writer of that row, the UPDATE re-checks its condition on the new row version, so
--    concurrent creates of one org cannot overshoot a limit. When no room is left, it deletes
--    what steps 2 and 3 wrote and returns no row. The row stays locked until the commit: sent
--    alone, the call is its own transaction, which Postgres commits before it replies.
-- The other parameters are the experiment's columns: $1 id, $2 org_id, $3 tool_id, $4 target,
-- $5 input_config, $6 goal, $8 gpu_count, $9 timeout_seconds, $10 created_by, $11 template_id,
-- $12 config_hash. Returns the experiment's row plus queued_event_created_at; no row on refusal.
SELECT (c.experiment).*, c.queued_event_created_at
FROM iiq.create_experiment($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) AS c;

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
-- event numbered in that same UPDATE, and for transitions out of pending, queued or running,
-- the release of its quota share (iiq.release_quota). Each returns the experiment's row plus
-- event_seq and event_created_at. cancel_not_started returns no row when its guard did not
-- match. The runner sends mark_running and finish_running alone. They call the functions of
-- migration 010, which set their own scope. When the guard did not match, they return NULL
-- event columns and the experiment's current_status.

-- name: mark_running
-- $2: the status event's payload.
SELECT (t.experiment).*, t.event_seq, t.event_created_at, t.current_status
FROM iiq.mark_running($1, $2) AS t;

-- name: finish_running
-- Ends a running experiment as $2 (completed, failed, cancelled or timed_out). $3 is the results
-- summary of a completed run and $4 the error message of the others. $5 is the run's actual
-- GPU-hours, charged to the month current at $7 (NULL: the database's now()). $6 is the status
-- event's payload.
SELECT (t.experiment).*, t.event_seq, t.event_created_at, t.current_status
FROM iiq.finish_running($1, $2, $3, $4, $5, $6, $7) AS t;

-- name: cancel_not_started
-- $2: the error message; $3: the status event's payload; nothing is charged ($4 as $7 in
-- finish_running).
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
    SELECT iiq.release_quota(org_id, estimated_gpu_hours, 0::float8, $4::timestamptz) FROM moved
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
