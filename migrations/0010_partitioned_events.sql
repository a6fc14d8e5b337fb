-- Retention: event.events becomes a table partitioned by the day (UTC) of stored_at, so that
-- events older than EVENT_RETENTION_DAYS leave by dropping whole partitions, never by DELETE
-- (src/store/retention.rs creates the partitions ahead and drops the expired ones).
--
-- A unique index of a partitioned table must hold the partition key, so event_id alone can no
-- longer be the primary key. Its uniqueness moves to event.event_ids, a narrow table the
-- persister claims each id in before it writes the row (in the same transaction); retention
-- removes a dropped partition's ids with it, so an id is there exactly while its event is.
-- Likewise (stream_id, stream_version) is no longer unique in the database: event.event_streams
-- hands out the versions (one row lock per stream), as it always did.
--
-- The conversion is in place, without copying a row: the existing table becomes the first
-- partition, events_to_YYYYMMDD, holding every stored_at before tomorrow (UTC). It leaves as a
-- whole once its newest event is past the retention. An empty store starts with daily
-- partitions only.

-- Each id keeps its row's stored_at: a read by id bounds itself to the partitions of the ids'
-- days (src/store/by_id.rs) instead of probing every partition's id index.
-- Nothing may be stored while the ids are copied: a row committed after the copy would have no
-- id in the guard (a persister of the previous version may still be running).
LOCK TABLE event.events IN ACCESS EXCLUSIVE MODE;

CREATE TABLE event.event_ids (event_id uuid PRIMARY KEY, stored_at timestamptz NOT NULL);
INSERT INTO event.event_ids SELECT event_id, stored_at FROM event.events;

ALTER TABLE event.events RENAME TO events_old;
ALTER TABLE event.events_old DROP CONSTRAINT events_pkey;
DROP INDEX event.events_stream_version_idx;
ALTER INDEX event.events_timestamp_idx RENAME TO events_old_timestamp_idx;
ALTER INDEX event.events_user_timestamp_idx RENAME TO events_old_user_timestamp_idx;
ALTER INDEX event.events_type_timestamp_idx RENAME TO events_old_type_timestamp_idx;
ALTER INDEX event.events_status_timestamp_idx RENAME TO events_old_status_timestamp_idx;
ALTER INDEX event.events_data_gin_idx RENAME TO events_old_data_gin_idx;
ALTER INDEX event.events_stream_seq_idx RENAME TO events_old_stream_seq_idx;
ALTER INDEX event.events_stream_id_seq_idx RENAME TO events_old_stream_id_seq_idx;

CREATE TABLE event.events (LIKE event.events_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (stored_at);

-- The same indexes as before (they attach to the old table's without a rebuild), plus one on
-- event_id for the reads by id, and (stream_id, stream_version) without the uniqueness.
CREATE INDEX events_event_id_idx ON event.events (event_id);
CREATE INDEX events_timestamp_idx ON event.events ("timestamp" DESC, event_id DESC);
CREATE INDEX events_user_timestamp_idx ON event.events (user_id, "timestamp" DESC) WHERE user_id IS NOT NULL;
CREATE INDEX events_type_timestamp_idx ON event.events (event_type, "timestamp" DESC);
CREATE INDEX events_status_timestamp_idx ON event.events (status, "timestamp" DESC);
CREATE INDEX events_stream_version_idx ON event.events (stream_id, stream_version) WHERE stream_id IS NOT NULL;
CREATE INDEX events_data_gin_idx ON event.events USING gin (data jsonb_path_ops);
CREATE INDEX events_stream_seq_idx ON event.events (stream_seq);
CREATE INDEX events_stream_id_seq_idx ON event.events (stream_id, stream_seq) WHERE stream_id IS NOT NULL;

DO $$
DECLARE
    today    timestamptz := date_trunc('day', now(), 'UTC');
    tomorrow timestamptz := today + interval '1 day';
    first    timestamptz := today;
    day      timestamptz;
    name     text;
BEGIN
    IF EXISTS (SELECT 1 FROM event.events_old) THEN
        name := 'events_to_' || to_char(tomorrow AT TIME ZONE 'UTC', 'YYYYMMDD');
        EXECUTE format('ALTER TABLE event.events_old RENAME TO %I', name);
        EXECUTE format('ALTER TABLE event.events ATTACH PARTITION event.%I FOR VALUES FROM (MINVALUE) TO (%L)',
                       name, tomorrow);
        first := tomorrow;
    ELSE
        DROP TABLE event.events_old;
    END IF;
    -- Two days ahead; the persister keeps it so (src/store/retention.rs).
    FOR i IN 0..2 LOOP
        day := first + i * interval '1 day';
        EXECUTE format('CREATE TABLE event.%I PARTITION OF event.events FOR VALUES FROM (%L) TO (%L)',
                       'events_p' || to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD'), day, day + interval '1 day');
    END LOOP;
END $$;

-- An entity stream's oldest retained version: the events before it have left with a dropped
-- partition. Stream versions go on numbering; projection rebuilds and time travel before it
-- answer history_expired.
ALTER TABLE event.event_streams ADD COLUMN first_version bigint NOT NULL DEFAULT 1;

-- The logs of what happened to events leave with the same retention, by time.
CREATE INDEX delivery_attempts_attempted_at_idx ON event.delivery_attempts (attempted_at);
