-- name: insert_quota
INSERT INTO iiq.experiment_quota (org_id, monthly_gpu_hours, max_concurrent, month_resets_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (org_id) DO NOTHING;

-- name: read_quota
-- db_now: the database's clock, which decides when a month ends.
SELECT *, now() AS db_now FROM iiq.experiment_quota WHERE org_id = $1;

-- name: update_quota_limits
UPDATE iiq.experiment_quota
SET monthly_gpu_hours = coalesce($2, monthly_gpu_hours),
    max_concurrent = coalesce($3, max_concurrent),
    updated_at = now()
WHERE org_id = $1
RETURNING *;
