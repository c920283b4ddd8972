-- The database announces every stored event itself, from the inserting transaction, so no
-- writer needs a pg_notify statement (and a round trip) of its own, and no writer can forget
-- one. The payload is `<experiment_id>:<seq>`, on the channel named by EVENTS_CHANNEL in
-- iiq/experiments/events.py; like any NOTIFY it is delivered when the transaction commits.
CREATE FUNCTION iiq.notify_event() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('iiq_events_v1', NEW.experiment_id::text || ':' || NEW.seq::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER experiment_events_notify
    AFTER INSERT ON iiq.experiment_events
    FOR EACH ROW EXECUTE FUNCTION iiq.notify_event();
