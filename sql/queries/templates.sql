-- name: insert_template
-- Returns no row when the org already has a template of this name.
INSERT INTO iiq.experiment_templates (id, org_id, name, tool_id, target, input_config, goal)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (org_id, name) DO NOTHING
RETURNING *;

-- name: get_template
SELECT * FROM iiq.experiment_templates WHERE id = $1;

-- name: list_templates
-- Keyset pagination on (created_at, id), newest first; $2 and $3 are the cursor or NULL.
SELECT * FROM iiq.experiment_templates
WHERE ($1::text IS NULL OR tool_id = $1)
  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $4;

-- name: update_template
UPDATE iiq.experiment_templates
SET name = $2, tool_id = $3, target = $4, input_config = $5, goal = $6, updated_at = now()
WHERE id = $1
RETURNING *;

-- name: delete_template
DELETE FROM iiq.experiment_templates WHERE id = $1 RETURNING id;
