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

use std::borrow::Cow;

use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::message::Outgoing;
use super::trace::TraceContext;
use super::{headers, subjects};
use crate::domain::event::{MAX_ID_CHARS, new_event_id, positional_event_id};
use crate::domain::parse::{self, Defaults, MAX_EVENT_TYPE_CHARS};
use crate::domain::{Event, EventCategory, EventSource, JsonObject, StreamId, event_id_from_key};

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
    // What the gateway published, and most of what NATS-native producers publish: straight
    // into the event.
    if let Some(event) = decode_typed(payload, defaults) {
        return Ok(incoming(event));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|error| Rejection::new("invalid_json", format!("payload is not JSON: {error}")))?;
    let event = parse::parse_event(value, &defaults()).map_err(|errors| {
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

/// An [`Event`] in the gateway's format, borrowed from the message: no other field, every
/// field of its JSON type. A NATS-native producer may leave out the fields
/// [`native_defaults`] supplies (`null` is the same as left out, as in
/// [`parse::parse_event`]). Anything else goes the way of [`parse::parse_event`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed<'a> {
    event_id: Option<Uuid>,
    #[serde(borrow)]
    event_type: Option<Cow<'a, str>>,
    event_source: Option<EventSource>,
    event_category: Option<EventCategory>,
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    organization_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    correlation_id: Option<Cow<'a, str>>,
    #[serde(default)]
    data: JsonObject,
    #[serde(default)]
    metadata: JsonObject,
    #[serde(default)]
    context: JsonObject,
    #[serde(default)]
    properties: JsonObject,
    #[serde(borrow)]
    stream_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    created_at: Option<Cow<'a, str>>,
}

impl Typed<'_> {
    /// Whether the payload leaves out a field only the message's other parts can supply.
    fn needs_defaults(&self) -> bool {
        self.event_id.is_none()
            || self.event_type.is_none()
            || self.event_source.is_none()
            || self.event_category.is_none()
            || self.timestamp.is_none()
            || self.created_at.is_none()
    }
}

/// The event of a message in the gateway's format, decoded straight into its fields instead
/// of through a JSON tree; `defaults` is asked only when the payload leaves a field out.
/// `None` when the message is in any other shape or breaks a rule: then
/// [`parse::parse_event`] decides, with the field errors. Where both accept a message they
/// build the same event.
fn decode_typed(payload: &[u8], defaults: impl FnOnce() -> Defaults) -> Option<Event> {
    let typed: Typed = serde_json::from_slice(payload).ok()?;
    let defaults = typed.needs_defaults().then(defaults);
    let text_ok = |text: &str, max_chars: usize| text.chars().count() <= max_chars && !text.contains('\0');
    let id = |value: Option<Cow<'_, str>>| match value {
        Some(text) if !text_ok(&text, MAX_ID_CHARS) => Err(()),
        other => Ok(other.map(Cow::into_owned)),
    };
    let event_type = match typed.event_type {
        Some(event_type) if text_ok(&event_type, MAX_EVENT_TYPE_CHARS) => event_type.into_owned(),
        Some(_) => return None,
        None => defaults.as_ref()?.event_type.clone()?,
    };
    if event_type.trim().is_empty() || event_type.chars().any(char::is_control) {
        return None;
    }
    let [data, metadata, context, properties] = [typed.data, typed.metadata, typed.context, typed.properties];
    if [&data, &metadata, &context, &properties].iter().any(|map| parse::object_contains_nul(map)) {
        return None;
    }
    let user_id = id(typed.user_id).ok()?;
    let device_id = id(typed.device_id).ok()?;
    let stream_id = match typed.stream_id {
        Some(text) => Some(StreamId::parse(&text)?),
        None => StreamId::implicit(user_id.as_deref(), device_id.as_deref()),
    };
    // PostgreSQL keeps microseconds, as in parse_event.
    let time = |text: Option<Cow<'_, str>>| match text {
        Some(text) if text.contains('\0') => None,
        Some(text) => parse::parse_timestamp(&text).map(|t| t.trunc_subsecs(6)),
        None => defaults.as_ref().map(|defaults| defaults.now.trunc_subsecs(6)),
    };
    Some(Event {
        event_id: typed.event_id.or_else(|| defaults.as_ref()?.event_id).unwrap_or_else(new_event_id),
        event_type,
        event_source: typed.event_source.or_else(|| Some(defaults.as_ref()?.event_source))?,
        event_category: typed.event_category.or_else(|| Some(defaults.as_ref()?.event_category))?,
        user_id,
        session_id: id(typed.session_id).ok()?,
        organization_id: id(typed.organization_id).ok()?,
        device_id,
        correlation_id: id(typed.correlation_id).ok()?,
        data,
        metadata,
        context,
        properties,
        stream_id,
        timestamp: time(typed.timestamp)?,
        created_at: time(typed.created_at)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Event {
        parse::parse_event(value, &Defaults::http(Utc::now())).unwrap()
    }

    /// For a payload that leaves nothing out: the defaults are never asked for.
    fn no_defaults() -> Defaults {
        panic!("a whole event needs no defaults")
    }

    #[test]
    fn native_payloads_decode_straight_to_what_parse_event_builds() {
        let published = Utc::now();
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "order-17");
        let subject = "events.iot_device.telemetry.temp.read";
        let defaults = || native_defaults(subject, Some(&headers), 9, published);
        let payloads = [
            json!({"user_id": "u1", "data": {"a": 1}}),
            json!({"event_type": "order.placed", "event_source": "backend", "event_category": "order",
                   "user_id": "bench-user-1", "session_id": "s", "correlation_id": "c",
                   "data": {"order_id": "o-1", "amount": 1.25}, "metadata": {"bench": "x"},
                   "event_id": "0190a0c2-6a4f-7a3e-8f00-000000000001"}),
            json!({"event_type": null, "event_source": null, "timestamp": "2025-12-30T10:00:00.1234567Z",
                   "device_id": "d"}),
        ];
        for payload in payloads {
            let wire = serde_json::to_vec(&payload).unwrap();
            let typed = decode_typed(&wire, defaults).expect("decoded without a JSON tree");
            assert_eq!(typed, parse::parse_event(payload.clone(), &defaults()).unwrap(), "{payload}");
            assert_eq!(decode_parts(subject, Some(&headers), &wire, 9, published).unwrap().event, typed);
        }
        // Left to parse_event: a field it knows and the typed form does not, a type nothing
        // supplies.
        let entity = json!({"event_type": "a", "entity_type": "order", "entity_id": "1"});
        assert_eq!(decode_typed(&serde_json::to_vec(&entity).unwrap(), defaults), None);
        let untyped = native_defaults("other.subject", None, 9, published);
        assert_eq!(decode_typed(br#"{"user_id": "u"}"#, || untyped.clone()), None);
    }

    #[test]
    fn canonical_messages_decode_to_what_parse_event_builds() {
        let requests = [
            json!({"event_type": "order.placed", "user_id": "u1", "data": {"total": 5, "items": [1, "a"]}}),
            json!({"event_type": "x", "stream_id": "order:1", "device_id": "d", "timestamp": "2025-12-30T10:00:00.1234567Z"}),
            json!({"event_type": "é".repeat(255), "event_source": "frontend", "event_category": "page_view"}),
        ];
        for request in requests {
            let event = parse(request);
            let wire = serde_json::to_vec(&event).unwrap();
            assert_eq!(decode_typed(&wire, no_defaults), Some(event.clone()));
            assert_eq!(decode_typed(&wire, no_defaults).unwrap(), parse(serde_json::from_slice(&wire).unwrap()));
        }
    }

    #[test]
    fn anything_but_a_valid_canonical_message_is_left_to_parse_event() {
        let event = parse(json!({"event_type": "a", "user_id": "u"}));
        let canonical = serde_json::to_value(&event).unwrap();
        let variant = |change: &dyn Fn(&mut Value)| {
            let mut value = canonical.clone();
            change(&mut value);
            decode_typed(&serde_json::to_vec(&value).unwrap(), no_defaults)
        };
        // Another field, a wrong type, a broken rule: not canonical.
        assert_eq!(variant(&|v| v["entity_type"] = json!("order")), None);
        assert_eq!(variant(&|v| v["user_id"] = json!(12)), None);
        assert_eq!(variant(&|v| v["data"] = json!({"deep": "a\u{0}"})), None);
        assert_eq!(variant(&|v| v["event_type"] = json!(" ")), None);
        assert_eq!(variant(&|v| v["user_id"] = json!("x".repeat(256))), None);
        assert_eq!(variant(&|v| v["stream_id"] = json!("nocolon")), None);
        assert_eq!(variant(&|v| v["data"] = Value::Null), None);
        // No stream named: the implicit one, as parse_event does.
        let implicit = variant(&|v| v["stream_id"] = Value::Null).unwrap();
        assert_eq!(implicit.stream_id.as_ref().map(StreamId::as_str), Some("user:u"));
        // A timestamp without an offset is UTC, as parse_event takes it.
        let naive = variant(&|v| v["timestamp"] = json!("2025-12-30T10:00:00.5")).unwrap();
        assert_eq!(naive.timestamp, parse::parse_timestamp("2025-12-30T10:00:00.5Z").unwrap());
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
