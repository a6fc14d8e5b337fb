-- How far the persister has published stored events to the STORED stream: every row whose
-- stream_seq is at or below announced_seq is on STORED. STORED's own last message says the
-- same and wins while it is there; this column is the fallback once STORED's messages have
-- all expired, and where a store from before STORED starts: STORED begins after the upgrade,
-- it does not replay history.
ALTER TABLE event.persister_position ADD COLUMN announced_seq bigint;
UPDATE event.persister_position SET announced_seq = last_seq;
ALTER TABLE event.persister_position
    ALTER COLUMN announced_seq SET DEFAULT 0,
    ALTER COLUMN announced_seq SET NOT NULL;
