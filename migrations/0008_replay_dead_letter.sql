-- A replay job that redrives a processor's dead letter remembers it: the replayer deletes the
-- dead letter once the replay succeeded, so a redrive that fails again leaves it listed.
ALTER TABLE event.replay_jobs ADD COLUMN dead_letter_seq bigint;
