-- Subscriptions and their delivery log.

CREATE TABLE event.event_subscriptions (
    subscription_id       text PRIMARY KEY,
    subscriber_name       text NOT NULL,
    subscriber_type       text NOT NULL,
    event_types           text[] NOT NULL,
    event_sources         text[],
    event_categories      text[],
    callback_url          text,
    webhook_secret        text NOT NULL,
    enabled               boolean NOT NULL DEFAULT true,
    retry_policy          jsonb NOT NULL,
    rate_limit_per_second integer CHECK (rate_limit_per_second > 0),
    -- Since when every delivery has failed (NULL while healthy); past the configured window the
    -- subscription is disabled, with the reason.
    failing_since         timestamptz,
    disabled_reason       text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- One row per delivery attempt. A redelivered attempt (a sender crashed before recording)
-- overwrites its own row.
CREATE TABLE event.delivery_attempts (
    attempt_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id text NOT NULL,
    event_id        uuid NOT NULL,
    webhook_id      text NOT NULL,
    attempt         integer NOT NULL,
    status          text NOT NULL CHECK (status IN ('delivered', 'retry', 'failed', 'refused', 'skipped')),
    status_code     integer,
    duration_ms     double precision NOT NULL DEFAULT 0,
    error           text,
    next_attempt_at timestamptz,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, event_id, attempt)
);
CREATE INDEX delivery_attempts_subscription_time_idx ON event.delivery_attempts (subscription_id, attempted_at DESC);
