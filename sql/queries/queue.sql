-- name: count_queued_jobs
SELECT queue_name, count(*)::int AS depth
FROM procrastinate.procrastinate_jobs
WHERE status = 'todo'
GROUP BY queue_name;
