-- name: find_lost_runs
-- Running experiments whose worker process has not refreshed heartbeat_at for $1 seconds.
SELECT id, job_id, tool_id
FROM iiq.experiments
WHERE status = 'running'
  AND coalesce(heartbeat_at, started_at) < now() - make_interval(secs => $1);

-- name: beat_running
UPDATE iiq.experiments
SET heartbeat_at = now()
WHERE id = ANY($1::uuid[]) AND status = 'running'
RETURNING id;

-- name: find_orphaned_jobs
-- Jobs still `doing` for an experiment that has ended, held by a lost or pruned worker: the
-- worker died after the terminal transition and before procrastinate recorded the outcome.
SELECT j.id AS job_id
FROM procrastinate.procrastinate_jobs j
JOIN iiq.experiments e ON e.job_id = j.id
LEFT JOIN procrastinate.procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing'
  AND e.status IN ('completed', 'failed', 'cancelled', 'timed_out')
  AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => $1));

-- name: find_lost_queued_jobs
-- Jobs a lost worker had fetched before its run was marked running: the handler never
-- started, so the job can go back to the queue.
SELECT j.id AS job_id, e.id
FROM iiq.experiments e
JOIN procrastinate.procrastinate_jobs j ON j.id = e.job_id
LEFT JOIN procrastinate.procrastinate_workers w ON w.id = j.worker_id
WHERE e.status = 'queued'
  AND j.status = 'doing'
  AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => $1));

-- name: lock_running_experiment
SELECT id, org_id, tool_id, gpu_count, job_id,
       extract(epoch FROM now() - started_at)::float8 AS running_seconds
FROM iiq.experiments
WHERE id = $1 AND status = 'running'
FOR UPDATE;

-- name: finish_lost_job
-- Deletes the lost run's job, whatever state procrastinate left it in.
DELETE FROM procrastinate.procrastinate_jobs WHERE id = $1;

-- name: requeue_lost_job
UPDATE procrastinate.procrastinate_jobs
SET status = 'todo', worker_id = NULL
WHERE id = $1 AND status = 'doing';
