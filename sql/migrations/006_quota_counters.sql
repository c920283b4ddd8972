-- Each org's quota row carries its in-flight count and the GPU-hours those experiments reserve.
-- Admission becomes one guarded UPDATE of that row (`admit_experiment`), taken last in the
-- create transaction, instead of a row lock held through the whole create plus a count over
-- the org's experiments. Every transition out of pending, queued or running releases its
-- share in the same statement, through iiq.release_quota.

ALTER TABLE iiq.experiment_quota
    ADD COLUMN active integer NOT NULL DEFAULT 0 CHECK (active >= 0),
    ADD COLUMN reserved_gpu_hours double precision NOT NULL DEFAULT 0
        CHECK (reserved_gpu_hours >= 0 AND reserved_gpu_hours <> 'NaN');

-- Count what is in flight now. The lock keeps experiments from being created or ended while
-- the counts are taken; engines still running the previous release wait here.
SELECT set_config('app.rls_bypass', 'true', true);
LOCK TABLE iiq.experiments, iiq.experiment_quota IN SHARE ROW EXCLUSIVE MODE;
UPDATE iiq.experiment_quota q
SET active = c.active, reserved_gpu_hours = c.reserved
FROM (
    SELECT org_id, count(*)::int AS active, coalesce(sum(estimated_gpu_hours), 0) AS reserved
    FROM iiq.experiments
    WHERE status IN ('pending', 'queued', 'running')
    GROUP BY org_id
) c
WHERE q.org_id = c.org_id;

-- The first instant of the month after `ts`'s month, in UTC: when a monthly budget resets.
CREATE FUNCTION iiq.next_month_start(ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT (date_trunc('month', ts AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC' $$;

-- True when quota row `q` has room at `as_of` for one more experiment estimated at `estimate`
-- GPU-hours: under the concurrency cap, and within the month's budget after the monthly reset
-- if it is due. The 1e-9 lets float sums such as 0.1 + 0.2 fill a budget exactly. Experiments
-- estimated at 0 GPU-hours never count against the budget.
CREATE FUNCTION iiq.quota_has_room(q iiq.experiment_quota, estimate double precision, as_of timestamptz)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT q.active < q.max_concurrent
       AND (estimate <= 0
            OR CASE WHEN as_of >= q.month_resets_at THEN 0 ELSE q.used_gpu_hours END
               + q.reserved_gpu_hours + estimate <= q.monthly_gpu_hours + 1e-9);
$$;

-- Releases one in-flight experiment of `for_org`: one fewer active, `estimate` GPU-hours less
-- reserved, `charged` GPU-hours more used in the month current at `as_of` (NULL: the database's
-- now()), after the monthly reset when it is due. Floats summed and subtracted can drift, so
-- the reservation is exactly 0 once nothing is in flight. A count that is already 0 is wrong
-- (an engine older than this migration created experiments): it stays 0, so that the run can
-- still end, and a warning goes to the server log; `iiq quota recount` repairs the count.
CREATE FUNCTION iiq.release_quota(
    for_org uuid, estimate double precision, charged double precision, as_of timestamptz
) RETURNS integer
    -- PL/pgSQL keeps the UPDATE's plan for the session; a SQL function would plan it per call.
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    at_time timestamptz := coalesce(as_of, now());
    counted integer;
BEGIN
    SELECT active INTO counted FROM iiq.experiment_quota WHERE org_id = for_org FOR UPDATE;
    IF counted = 0 THEN
        RAISE WARNING 'iiq: the in-flight count of org % was 0 while an experiment ended: run iiq quota recount',
            for_org;
    END IF;
    UPDATE iiq.experiment_quota
    SET active = greatest(active - 1, 0),
        reserved_gpu_hours = CASE WHEN active <= 1 THEN 0 ELSE greatest(0, reserved_gpu_hours - estimate) END,
        used_gpu_hours = CASE WHEN at_time >= month_resets_at THEN 0 ELSE used_gpu_hours END + greatest(charged, 0),
        month_resets_at = CASE WHEN at_time >= month_resets_at
                               THEN iiq.next_month_start(at_time) ELSE month_resets_at END,
        updated_at = now()
    WHERE org_id = for_org
    RETURNING active INTO counted;
    RETURN counted;
END
$$;

GRANT EXECUTE ON FUNCTION iiq.next_month_start(timestamptz) TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.quota_has_room(iiq.experiment_quota, double precision, timestamptz) TO iiq_service;
GRANT EXECUTE ON FUNCTION iiq.release_quota(uuid, double precision, double precision, timestamptz)
    TO iiq_service;
