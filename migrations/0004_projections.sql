-- Event sourcing: projections of entity streams, their definitions and snapshots.

CREATE TABLE event.projection_definitions (
    name         text PRIMARY KEY,
    entity_type  text NOT NULL,
    event_types  text[],
    reducer      text NOT NULL CHECK (reducer IN ('merge', 'by_type', 'counter')),
    -- 'catching_up' until the projector has folded the existing history, then 'live'.
    status       text NOT NULL DEFAULT 'catching_up' CHECK (status IN ('catching_up', 'live')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The built-in projection of every stream: each event's data as a JSON merge patch.
INSERT INTO event.projection_definitions (name, entity_type, reducer, status) VALUES ('default', '*', 'merge', 'live');

-- One row per (projection, entity). version = events applied; stream_version = the last
-- stream version folded in (the watermark that makes applying idempotent).
CREATE TABLE event.event_projections (
    projection_id   uuid PRIMARY KEY,
    projection_name text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text NOT NULL,
    state           jsonb NOT NULL,
    version         bigint NOT NULL,
    stream_version  bigint NOT NULL,
    last_event_id   uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (projection_name, entity_type, entity_id)
);

-- The state every N applied events, so time travel folds from the nearest one.
CREATE TABLE event.projection_snapshots (
    projection_name text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text NOT NULL,
    version         bigint NOT NULL,
    stream_version  bigint NOT NULL,
    state           jsonb NOT NULL,
    last_event_id   uuid,
    -- The latest event timestamp folded into this state.
    max_timestamp   timestamptz NOT NULL,
    PRIMARY KEY (projection_name, entity_type, entity_id, version)
);
