-- The event store, stream bookkeeping and the statistics rollups that the persister keeps in
-- the same transaction as the events themselves.
CREATE SCHEMA IF NOT EXISTS event;

CREATE TABLE event.events (
    event_id        uuid PRIMARY KEY,
    event_type      text NOT NULL,
    event_source    text NOT NULL,
    event_category  text NOT NULL,
    user_id         text,
    session_id      text,
    organization_id text,
    device_id       text,
    correlation_id  text,
    data            jsonb NOT NULL DEFAULT '{}',
    metadata        jsonb NOT NULL DEFAULT '{}',
    context         jsonb NOT NULL DEFAULT '{}',
    properties      jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processing', 'processed', 'failed', 'archived')),
    processors      text[] NOT NULL DEFAULT '{}',
    retry_count     integer NOT NULL DEFAULT 0,
    error_message   text,
    processed_at    timestamptz,
    stream_id       text,
    stream_version  bigint,
    -- Position in the JetStream EVENTS stream: the one total order of all events.
    stream_seq      bigint NOT NULL,
    subject         text NOT NULL,
    "timestamp"     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_timestamp_idx ON event.events ("timestamp" DESC, event_id DESC);
CREATE INDEX events_user_timestamp_idx ON event.events (user_id, "timestamp" DESC) WHERE user_id IS NOT NULL;
CREATE INDEX events_type_timestamp_idx ON event.events (event_type, "timestamp" DESC);
CREATE INDEX events_status_timestamp_idx ON event.events (status, "timestamp" DESC);
CREATE UNIQUE INDEX events_stream_version_idx ON event.events (stream_id, stream_version) WHERE stream_id IS NOT NULL;
CREATE INDEX events_data_gin_idx ON event.events USING gin (data jsonb_path_ops);

-- How far the persister has stored each JetStream stream: it stores strictly in sequence
-- order, so stream versions follow the JetStream order even across redeliveries.
CREATE TABLE event.persister_position (
    stream     text PRIMARY KEY,
    last_seq   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE event.event_streams (
    stream_id   text PRIMARY KEY,
    stream_type text NOT NULL,
    entity_type text NOT NULL,
    entity_id   text NOT NULL,
    version     bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Statistics rollups: counts kept exact by the writers of events and statuses, so the
-- statistics endpoint never scans event.events.
CREATE TABLE event.rollup_daily (
    day            date NOT NULL,
    event_source   text NOT NULL,
    event_category text NOT NULL,
    event_type     text NOT NULL,
    events         bigint NOT NULL,
    PRIMARY KEY (day, event_source, event_category, event_type)
);

CREATE TABLE event.rollup_status (
    status text PRIMARY KEY,
    events bigint NOT NULL
);

CREATE TABLE event.rollup_user_daily (
    user_id        text NOT NULL,
    day            date NOT NULL,
    event_source   text NOT NULL,
    event_category text NOT NULL,
    event_type     text NOT NULL,
    events         bigint NOT NULL,
    PRIMARY KEY (user_id, day, event_source, event_category, event_type)
);

CREATE TABLE event.rollup_user_status (
    user_id text NOT NULL,
    status  text NOT NULL,
    events  bigint NOT NULL,
    PRIMARY KEY (user_id, status)
);

CREATE TABLE event.rollup_users (
    user_id text PRIMARY KEY,
    events  bigint NOT NULL
);
CREATE INDEX rollup_users_events_idx ON event.rollup_users (events DESC);

-- Processing time, filled by the processor stage: one row for all events ('') and one per user.
CREATE TABLE event.rollup_processing (
    user_id     text PRIMARY KEY,
    processed   bigint NOT NULL DEFAULT 0,
    total_ms    double precision NOT NULL DEFAULT 0
);
