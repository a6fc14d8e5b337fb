-- The projector locks every projection of the streams in a batch, whatever their name: without
-- an index on the entity alone that lookup read the whole table once per batch.
CREATE INDEX event_projections_entity_idx ON event.event_projections (entity_type, entity_id);
