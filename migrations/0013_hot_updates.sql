-- Rows that every batch updates in place: an entity stream's version (the persister), its
-- projections' state (the projector) and a user's day counts (the persister). None of these
-- updates changes an indexed column, so PostgreSQL can write the new row version on the same
-- page without touching the indexes (a HOT update), but only when the page has room. Full
-- pages (the default fillfactor of 100) made most of them cold: new index entries in every
-- index for every update. With 30 % of each page kept free, nearly all of them are HOT.
-- Measured in BENCHMARKS.md ("Room for updates in place").
--
-- The setting applies to pages written from now on. An existing store gets it for its old
-- pages when they are rewritten, e.g. by `VACUUM FULL` (which locks the table while it runs).
-- rollup_users is not here: its index on `events` changes with every update, so its updates
-- can never be HOT.
ALTER TABLE event.event_streams SET (fillfactor = 70);
ALTER TABLE event.event_projections SET (fillfactor = 70);
ALTER TABLE event.rollup_user_daily SET (fillfactor = 70);
