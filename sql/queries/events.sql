-- name: append_event
-- Numbers the event under the experiment's row lock, so sequence order is commit order.
WITH next AS (
    UPDATE iiq.experiments
    SET last_event_seq = last_event_seq + 1
    WHERE id = $1
    RETURNING org_id, last_event_seq
)
INSERT INTO iiq.experiment_events (org_id, experiment_id, seq, event_type, stage, payload)
SELECT org_id, $1, last_event_seq, $2, $3, $4 FROM next
RETURNING seq, created_at;

-- name: append_running_event
-- As append_event, but only while the experiment is running, through iiq.append_running_event
-- (migration 008): the row lock orders it against the terminal transition, so no handler event
-- can follow the terminal event. Sent alone it is its own transaction. It returns seq and
-- created_at of the new event. When the experiment is not running, seq is NULL and status is
-- the experiment's status. When the experiment does not exist, it returns no row.
SELECT seq, created_at, status FROM iiq.append_running_event($1, $2, $3, $4);

-- name: read_events
SELECT seq, event_type, stage, payload, created_at
FROM iiq.experiment_events
WHERE experiment_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3;
