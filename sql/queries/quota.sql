-- name: insert_quota
INSERT INTO iiq.experiment_quota (org_id, monthly_gpu_hours, max_concurrent, month_resets_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (org_id) DO NOTHING;

-- name: read_quota
SELECT * FROM iiq.experiment_quota WHERE org_id = $1;

-- name: admit_experiment
-- Counts one more in-flight experiment reserving $2 GPU-hours if the org has room for it at
-- $3, applying the monthly reset first when it is due ($4: the next reset). Returns no row on
-- refusal. After waiting for a concurrent writer of the row, the UPDATE re-checks its WHERE
-- clause on the new row version, so concurrent creates of one org cannot overshoot a limit.
UPDATE iiq.experiment_quota
SET used_gpu_hours = CASE WHEN $3::timestamptz >= month_resets_at THEN 0 ELSE used_gpu_hours END,
    month_resets_at = CASE WHEN $3::timestamptz >= month_resets_at THEN $4::timestamptz ELSE month_resets_at END,
    active = active + 1,
    reserved_gpu_hours = reserved_gpu_hours + $2::float8,
    updated_at = now()
WHERE org_id = $1 AND iiq.quota_has_room(experiment_quota, $2::float8, $3::timestamptz)
RETURNING *;

-- name: update_quota_limits
UPDATE iiq.experiment_quota
SET monthly_gpu_hours = coalesce($2, monthly_gpu_hours),
    max_concurrent = coalesce($3, max_concurrent),
    updated_at = now()
WHERE org_id = $1
RETURNING *;
