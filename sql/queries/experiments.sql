-- name: insert_experiment
INSERT INTO iiq.experiments (
    id, org_id, tool_id, target, input_config, goal, status,
    estimated_gpu_hours, gpu_count, timeout_seconds, created_by, template_id, config_hash, created_at
)
VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, $10, $11, $12, now())
RETURNING *;

-- name: mark_queued
UPDATE iiq.experiments
SET status = 'queued', job_id = $2, queued_at = now()
WHERE id = $1 AND status = 'pending'
RETURNING *;

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

-- name: mark_running
UPDATE iiq.experiments
SET status = 'running', started_at = now()
WHERE id = $1 AND status = 'queued'
RETURNING *;

-- name: mark_completed
-- $3: actual GPU-hours of the run.
UPDATE iiq.experiments
SET status = 'completed', results_summary = $2, actual_gpu_hours = $3, finished_at = now()
WHERE id = $1 AND status = 'running'
RETURNING *;

-- name: mark_ended
-- Ends a running experiment as failed, cancelled or timed_out.
UPDATE iiq.experiments
SET status = $2, error_message = $3, actual_gpu_hours = $4, finished_at = now()
WHERE id = $1 AND status = 'running'
RETURNING *;

-- name: cancel_not_started
UPDATE iiq.experiments
SET status = 'cancelled', cancel_requested_at = coalesce(cancel_requested_at, now()),
    error_message = 'cancelled before it started', actual_gpu_hours = 0, finished_at = now()
WHERE id = $1 AND status IN ('pending', 'queued')
RETURNING *;

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
