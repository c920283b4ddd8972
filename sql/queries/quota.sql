-- name: insert_quota
INSERT INTO iiq.experiment_quota (org_id, monthly_gpu_hours, max_concurrent, month_resets_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (org_id) DO NOTHING;

-- name: lock_quota
SELECT * FROM iiq.experiment_quota WHERE org_id = $1 FOR UPDATE;

-- name: reset_quota_month
UPDATE iiq.experiment_quota
SET used_gpu_hours = 0, month_resets_at = $2, updated_at = now()
WHERE org_id = $1
RETURNING *;

-- name: count_in_flight
-- Active experiments and the GPU-hours they have reserved by estimate.
SELECT count(*)::int AS active, coalesce(sum(estimated_gpu_hours), 0)::float8 AS reserved
FROM iiq.experiments
WHERE org_id = $1 AND status IN ('pending', 'queued', 'running');

-- name: charge_quota
UPDATE iiq.experiment_quota
SET used_gpu_hours = used_gpu_hours + $2, updated_at = now()
WHERE org_id = $1
RETURNING *;

-- name: update_quota_limits
UPDATE iiq.experiment_quota
SET monthly_gpu_hours = coalesce($2, monthly_gpu_hours),
    max_concurrent = coalesce($3, max_concurrent),
    updated_at = now()
WHERE org_id = $1
RETURNING *;
