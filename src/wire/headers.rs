//! The NATS message headers the service reads and writes, named once.
//!
//! Reads nothing, writes nothing. `Nats-Msg-Id` (JetStream's dedupe key) is
//! `async_nats::header::NATS_MESSAGE_ID`; everything of our own starts with `Event-Service-`.

/// On an EVENTS message: the core-NATS subject on which the persister reports it stored.
pub const NOTIFY: &str = "Event-Service-Notify";
/// On an EVENTS message the service encoded itself (the gateway): `http`. Messages without it
/// came from NATS-native producers.
pub const INGEST: &str = "Event-Service-Ingest";

/// On a STORED message: the EVENTS sequence the event was stored from (also `stream_seq` in
/// its payload), and the version of the payload's schema (`schemas/stored-event.v{N}.json`).
pub const EVENTS_SEQUENCE: &str = "Event-Service-Events-Sequence";
pub const SCHEMA_VERSION: &str = "Event-Service-Schema-Version";
/// On a STORED message whose event was too large for NATS with it: the field left empty
/// (`data`); the event is whole in PostgreSQL (`GET /api/v1/events/{event_id}`).
pub const TRUNCATED: &str = "Event-Service-Truncated";
/// JetStream's optimistic concurrency check: stored only if the stream's last sequence is
/// this one.
pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";

/// On a dead-lettered message: a stable reason code, the human reason, the stage that refused
/// it, and where the original was.
pub const REASON_CODE: &str = "Event-Service-Reason-Code";
pub const REASON: &str = "Event-Service-Reason";
pub const STAGE: &str = "Event-Service-Stage";
pub const ORIGINAL_SUBJECT: &str = "Event-Service-Original-Subject";
pub const ORIGINAL_SEQUENCE: &str = "Event-Service-Original-Sequence";
/// On a dead letter and on a redriven message: the original's `Nats-Msg-Id` (the dead letter's
/// own is derived from where the original was, a redrive's from the dead letter). An EVENTS
/// message's event id is derived from it when its payload has none.
pub const ORIGINAL_MSG_ID: &str = "Event-Service-Original-Msg-Id";
/// On a redriven message: the DEADLETTER sequence it was redriven from.
pub const REDRIVEN_FROM: &str = "Event-Service-Redriven-From";

/// On a delivery (DELIVERIES) and on a processor's NATS request: which event.
pub const EVENT_ID: &str = "Event-Service-Event-Id";
/// On a delivery: for which subscription.
pub const SUBSCRIPTION: &str = "Event-Service-Subscription";
/// On a delivery: attempts already made when it was queued (a resend starts a new budget).
pub const ATTEMPT_BASE: &str = "Event-Service-Attempt-Base";
/// On a processor's NATS request: which processor asks.
pub const PROCESSOR: &str = "Event-Service-Processor";

/// On a processor's reply (NATS services convention): the service failed.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// Header values cannot hold line breaks; keep them short too.
pub fn safe_value(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1024).collect()
}
