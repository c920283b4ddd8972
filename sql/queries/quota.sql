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

-- name: lock_for_recount
-- Stops experiments from being created or ended until the transaction ends.
LOCK TABLE iiq.experiments, iiq.experiment_quota IN SHARE ROW EXCLUSIVE MODE;

-- name: recount_quota
-- Sets the in-flight count and reservation of org $1 (NULL: every org) from its experiments;
-- run it after lock_for_recount. Returns each org's numbers before and after.
WITH counted AS (
    SELECT q.org_id, q.active AS active_before, q.reserved_gpu_hours AS reserved_before,
           count(e.id)::int AS active, coalesce(sum(e.estimated_gpu_hours), 0)::float8 AS reserved
    FROM iiq.experiment_quota q
    LEFT JOIN iiq.experiments e
        ON e.org_id = q.org_id AND e.status IN ('pending', 'queued', 'running')
    WHERE $1::uuid IS NULL OR q.org_id = $1
    GROUP BY q.org_id, q.active, q.reserved_gpu_hours
), updated AS (
    UPDATE iiq.experiment_quota q
    SET active = counted.active, reserved_gpu_hours = counted.reserved, updated_at = now()
    FROM counted
    WHERE q.org_id = counted.org_id
      AND (q.active <> counted.active OR q.reserved_gpu_hours <> counted.reserved)
    RETURNING q.org_id
)
SELECT counted.*, updated.org_id IS NOT NULL AS changed
FROM counted LEFT JOIN updated ON updated.org_id = counted.org_id
ORDER BY counted.org_id;
