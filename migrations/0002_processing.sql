-- Event processing: the processor registry, one result row per (event, processor, run,
-- attempt), and replay jobs.

CREATE TABLE event.event_processors (
    processor_id      text PRIMARY KEY,
    processor_name    text NOT NULL UNIQUE,
    processor_type    text NOT NULL,
    enabled           boolean NOT NULL DEFAULT true,
    priority          integer NOT NULL DEFAULT 0,
    filters           jsonb NOT NULL DEFAULT '{}',
    config            jsonb NOT NULL DEFAULT '{}',
    max_retries       integer NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    error_count       bigint NOT NULL DEFAULT 0,
    last_error        text,
    last_processed_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- run_id is '' for live processing and the replay id for a replay, so a replay adds rows and
-- never overwrites the originals. A redelivered attempt overwrites its own row.
CREATE TABLE event.processing_results (
    result_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL,
    processor_id   text NOT NULL,
    processor_name text NOT NULL,
    run_id         text NOT NULL DEFAULT '',
    attempt        integer NOT NULL,
    status         text NOT NULL CHECK (status IN ('success', 'failed', 'skipped', 'retry')),
    message        text,
    duration_ms    double precision NOT NULL DEFAULT 0,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, processor_name, run_id, attempt)
);
CREATE INDEX processing_results_processed_at_idx ON event.processing_results (processed_at DESC);

CREATE TABLE event.replay_jobs (
    replay_id      uuid PRIMARY KEY,
    status         text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    selector       jsonb NOT NULL,
    target_service text,
    processors     text[],
    events_count   bigint NOT NULL,
    replayed       bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    -- The selection is the selected events up to until_seq (the newest when the job was
    -- asked for); last_seq is the last one replayed, so a restarted job goes on after it.
    until_seq      bigint NOT NULL,
    last_seq       bigint NOT NULL DEFAULT 0,
    error_message  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    completed_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_stream_seq_idx ON event.events (stream_seq);
CREATE INDEX events_stream_id_seq_idx ON event.events (stream_id, stream_seq) WHERE stream_id IS NOT NULL;
