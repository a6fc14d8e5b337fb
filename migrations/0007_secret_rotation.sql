-- Secret rotation: after POST .../secret/rotate the replaced secret keeps signing deliveries
-- (beside the new one) until previous_secret_expires_at, so receivers can switch without a gap.
ALTER TABLE event.event_subscriptions
    ADD COLUMN previous_secret            text,
    ADD COLUMN previous_secret_expires_at timestamptz;
