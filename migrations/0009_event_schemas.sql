-- The schema registry: numbered versions of a JSON Schema per event type. The newest version
-- of a type is the one its events are checked against.
CREATE TABLE event.event_schemas (
    event_type    text NOT NULL,
    version       integer NOT NULL CHECK (version > 0),
    schema        jsonb NOT NULL,
    mode          text NOT NULL CHECK (mode IN ('reject', 'flag')),
    redact        jsonb NOT NULL DEFAULT '[]',
    compatibility text NOT NULL CHECK (compatibility IN ('backward', 'none')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, version)
);
