-- Every per-user count but the daily ones in one row per user: events, events per status and
-- processing time. A batch then touches one row per user instead of three (rollup_users,
-- rollup_user_status, rollup_processing), in the persister and in the processor stage.
ALTER TABLE event.rollup_users
    ADD COLUMN pending    bigint NOT NULL DEFAULT 0,
    ADD COLUMN processing bigint NOT NULL DEFAULT 0,
    ADD COLUMN processed  bigint NOT NULL DEFAULT 0,
    ADD COLUMN failed     bigint NOT NULL DEFAULT 0,
    ADD COLUMN archived   bigint NOT NULL DEFAULT 0,
    -- Processed events with their time from created_at to processed, for the average.
    ADD COLUMN timed      bigint NOT NULL DEFAULT 0,
    ADD COLUMN total_ms   double precision NOT NULL DEFAULT 0;

INSERT INTO event.rollup_users AS u (user_id, events, pending, processing, processed, failed, archived)
SELECT user_id, 0,
       COALESCE(sum(events) FILTER (WHERE status = 'pending'), 0),
       COALESCE(sum(events) FILTER (WHERE status = 'processing'), 0),
       COALESCE(sum(events) FILTER (WHERE status = 'processed'), 0),
       COALESCE(sum(events) FILTER (WHERE status = 'failed'), 0),
       COALESCE(sum(events) FILTER (WHERE status = 'archived'), 0)
FROM event.rollup_user_status GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET pending = EXCLUDED.pending, processing = EXCLUDED.processing,
    processed = EXCLUDED.processed, failed = EXCLUDED.failed, archived = EXCLUDED.archived;

INSERT INTO event.rollup_users AS u (user_id, events, timed, total_ms)
SELECT user_id, 0, processed, total_ms FROM event.rollup_processing WHERE user_id <> ''
ON CONFLICT (user_id) DO UPDATE SET timed = EXCLUDED.timed, total_ms = EXCLUDED.total_ms;

-- rollup_processing keeps the one row for all events ('').
DELETE FROM event.rollup_processing WHERE user_id <> '';
DROP TABLE event.rollup_user_status;
