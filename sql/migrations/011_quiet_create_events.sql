-- The create's own two status events (seq 1 and 2) send no notification. They commit with the
-- experiment itself, so no stream or runner can be following the experiment yet: a stream
-- starts only after the route has found the committed row, and then reads these events from
-- the table. Each create used to send both notifications to every listening process, and
-- Postgres queues notifications under a cluster-wide lock that it holds through the commit.
DROP TRIGGER experiment_events_notify ON iiq.experiment_events;

CREATE TRIGGER experiment_events_notify
    AFTER INSERT ON iiq.experiment_events
    FOR EACH ROW WHEN (NEW.seq > 2) EXECUTE FUNCTION iiq.notify_event();
