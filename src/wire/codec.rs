//! The EVENTS message codec: the one encode the gateway publishes with, and the one decode
//! every stage (persister, processor, dispatcher, projector) reads EVENTS with.
//!
//! Reads message subjects, headers and payloads; writes nothing. Guarantees: the same message
//! decodes to the same event in every stage and on every redelivery (a message without an id
//! gets one from its `Nats-Msg-Id`, or from its stream position). NATS-native producers may
//! leave out the source, category and type (the subject's are taken), the id and the times.
//! A payload in the gateway's format, whole or with those left out, decodes straight into its
//! fields; anything else goes through [`crate::domain::parse::parse_event`] with the same
//! defaults, which builds the same event where both accept a message.

use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::message::Outgoing;
use super::trace::TraceContext;
use super::{headers, subjects};
use crate::domain::event::positional_event_id;
use crate::domain::parse::Defaults;
use crate::domain::typed::{self, TextError};
use crate::domain::{Event, EventCategory, EventSource, event_id_from_key};

/// An EVENTS message decoded: the event and where JetStream put it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    pub stream_seq: u64,
    pub subject: String,
    /// The producer's trace context, or the one derived from the event id.
    pub trace: TraceContext,
}

/// Why a message was refused: a stable, low-cardinality `code` and a human `detail`. Carried
/// in the dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub detail: String,
    /// The stored event the refused message is about, when the stage knows it (a redrive
    /// needs it; see [`crate::infra::deadletter`]).
    pub event_id: Option<Uuid>,
}

impl Rejection {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into(), event_id: None }
    }

    /// The same refusal, about this event.
    pub fn about(self, event_id: Uuid) -> Self {
        Self { event_id: Some(event_id), ..self }
    }
}

/// The EVENTS message of an event: `events.{source}.{category}.{type}`, `Nats-Msg-Id` = the
/// event id, the event's JSON as the payload.
pub fn encode(event: &Event) -> Result<Outgoing, serde_json::Error> {
    let subject =
        subjects::event_subject(event.event_source.as_str(), event.event_category.as_str(), &event.event_type);
    encode_on(subject, event)
}

/// [`encode`] with the subject chosen by the caller (the frontend endpoints keep the free-text
/// category in the subject). Marks the message as the service's own (`Event-Service-Ingest`).
pub fn encode_on(subject: String, event: &Event) -> Result<Outgoing, serde_json::Error> {
    let payload = Bytes::from(serde_json::to_vec(event)?);
    Ok(Outgoing::event(subject, event.event_id, payload).with_header(headers::INGEST, "http"))
}

/// Whether a service of ours encoded this EVENTS message (else a NATS-native producer did).
pub fn is_ingested(message_headers: Option<&HeaderMap>) -> bool {
    message_headers.is_some_and(|map| map.get(headers::INGEST).is_some())
}

/// Decodes a message a stage pulled from its EVENTS consumer.
pub fn decode(message: &Message) -> Result<Incoming, Rejection> {
    let info = message.info().map_err(|error| Rejection::new("no_metadata", error.to_string()))?;
    decode_parts(&message.subject, message.headers.as_ref(), &message.payload, info.stream_sequence, info.published)
}

/// Decodes an EVENTS message from its parts: subject, headers, payload, stream sequence and
/// the time JetStream stored it.
pub fn decode_parts(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    seq: u64,
    published: DateTime<Utc>,
) -> Result<Incoming, Rejection> {
    let incoming = |event: Event| {
        let trace = TraceContext::from_nats(headers).unwrap_or_else(|| TraceContext::for_event(event.event_id));
        Incoming { event, stream_seq: seq, subject: subject.to_owned(), trace }
    };
    let defaults = || native_defaults(subject, headers, seq, published);
    let event = typed::parse_event_text(payload, defaults).map_err(|error| match error {
        TextError::NotJson(error) => Rejection::new("invalid_json", format!("payload is not JSON: {error}")),
        TextError::Invalid(errors) => {
            let detail = errors
                .iter()
                .map(|error| {
                    if error.field.is_empty() {
                        error.message.clone()
                    } else {
                        format!("{}: {}", error.field, error.message)
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            Rejection::new("validation_failed", detail)
        }
    })?;
    Ok(incoming(event))
}

/// What a message's subject, headers and stream position say about an event whose payload
/// leaves fields out: source, category and type from the subject, the id from
/// `Nats-Msg-Id` (or from the position), the time from when JetStream stored it.
fn native_defaults(subject: &str, headers: Option<&HeaderMap>, seq: u64, published: DateTime<Utc>) -> Defaults {
    let (source, category, event_type) = subjects::parse_event_subject(subject)
        .map(|(source, category, event_type)| {
            (EventSource::parse(source), EventCategory::parse(category), Some(event_type))
        })
        .unwrap_or((None, None, None));
    // A redriven message keeps its producer's id beside the redrive's own dedupe id.
    let msg_id = headers.and_then(|headers| {
        headers.get(super::headers::ORIGINAL_MSG_ID).or_else(|| headers.get(async_nats::header::NATS_MESSAGE_ID))
    });
    let event_id = match msg_id.map(|id| id.as_str()) {
        Some(id) => Uuid::parse_str(id).unwrap_or_else(|_| event_id_from_key("nats-msg-id", id)),
        None => positional_event_id(published, seq),
    };
    Defaults {
        now: published,
        event_source: source.unwrap_or(EventSource::Backend),
        event_category: category.unwrap_or(EventCategory::UserAction),
        event_id: Some(event_id),
        event_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse;
    use serde_json::json;

    #[test]
    fn native_payloads_in_the_gateways_shape_take_the_defaults_of_the_message() {
        let published = Utc::now();
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "order-17");
        let subject = "events.iot_device.telemetry.temp.read";
        let payload = json!({"user_id": "u1", "data": {"a": 1}});
        let wire = serde_json::to_vec(&payload).unwrap();
        let decoded = decode_parts(subject, Some(&headers), &wire, 9, published).unwrap().event;
        let defaults = native_defaults(subject, Some(&headers), 9, published);
        assert_eq!(decoded, parse::parse_event(payload, &defaults).unwrap());
        assert_eq!((decoded.event_type.as_str(), decoded.event_source), ("temp.read", EventSource::IotDevice));
        assert_eq!(decoded.event_id, event_id_from_key("nats-msg-id", "order-17"));
    }

    #[test]
    fn native_messages_take_what_the_subject_and_headers_say() {
        let now = Utc::now();
        let body = br#"{"user_id": "u1", "data": {"a": 1}}"#;
        let decoded = decode_parts("events.iot_device.telemetry.temp.read", None, body, 9, now).unwrap();
        assert_eq!(decoded.event.event_type, "temp.read");
        assert_eq!(decoded.event.event_source, EventSource::IotDevice);
        assert_eq!(decoded.event.event_id, positional_event_id(now, 9), "stable across redeliveries");
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "order-17");
        let keyed = decode_parts("events.backend.order.placed", Some(&headers), body, 10, now).unwrap();
        assert_eq!(keyed.event.event_id, event_id_from_key("nats-msg-id", "order-17"));
        // Redriven: the redrive's own dedupe id, the producer's beside it.
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "redrive.4");
        headers.insert(super::headers::ORIGINAL_MSG_ID, "order-17");
        let redriven = decode_parts("events.backend.order.placed", Some(&headers), body, 30, now).unwrap();
        assert_eq!(redriven.event.event_id, keyed.event.event_id, "the id it would have had");
        let bad = decode_parts("events.backend.order.placed", None, b"{nope", 11, now).unwrap_err();
        assert_eq!(bad.code, "invalid_json");
        let invalid = decode_parts("other.subject", None, br#"{"data": 1}"#, 12, now).unwrap_err();
        assert_eq!(invalid.code, "validation_failed");
    }
}
