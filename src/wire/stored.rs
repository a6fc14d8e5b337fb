//! The STORED stream's message: one stored event, as stored, in the persister's order. The
//! contract with downstream JetStream consumers: `jetstream/schemas/stored-event.v1.json` describes the
//! payload, and the headers follow the CloudEvents NATS binding (binary mode).
//!
//! Reads nothing, writes nothing. Guarantees: the payload's field names are the API's, a
//! field is only ever added within a schema version; `Nats-Msg-Id` is the event id, so a
//! repeated publish inside the duplicate window is stored once; every message carries the
//! EVENTS sequence it was stored from ([`headers::EVENTS_SEQUENCE`]), which is how the
//! persister finds where STORED ends after a crash.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::message::Outgoing;
use super::trace::TraceContext;
use super::{headers, subjects};
use crate::domain::{Event, EventCategory, EventSource, JsonObject, StreamId, rfc3339};

/// The version of the payload's schema (`jetstream/schemas/stored-event.v{N}.json`), in the
/// [`headers::SCHEMA_VERSION`] header.
pub const SCHEMA_VERSION: &str = "1";
/// The CloudEvents version the `ce-*` headers follow.
const CE_SPEC_VERSION: &str = "1.0";

/// A stored event and what storing it added: its entity-stream version, the EVENTS sequence
/// it came from, and when its row was written.
#[derive(Debug, Clone, Copy)]
pub struct StoredRecord<'a> {
    pub event: &'a Event,
    pub stream_version: Option<i64>,
    pub stream_seq: u64,
    pub stored_at: DateTime<Utc>,
    pub trace: Option<&'a TraceContext>,
}

/// The payload (schema version 1). Absent optional fields are left out.
#[derive(Serialize)]
struct Payload<'a> {
    event_id: Uuid,
    event_type: &'a str,
    event_source: EventSource,
    event_category: EventCategory,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    organization_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    data: &'a JsonObject,
    metadata: &'a JsonObject,
    context: &'a JsonObject,
    properties: &'a JsonObject,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a StreamId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_version: Option<i64>,
    stream_seq: u64,
    #[serde(serialize_with = "rfc3339::serialize")]
    timestamp: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::serialize")]
    stored_at: DateTime<Utc>,
}

impl StoredRecord<'_> {
    /// [`StoredRecord::to_message`], with `data` left empty and the header
    /// [`headers::TRUNCATED`] when the whole message would exceed `max_payload` (NATS refuses
    /// it, and one message STORED cannot take would stop every one after it). Only a
    /// NATS-native event near the limit grows past it: the gateway keeps HTTP events well
    /// below.
    pub fn to_message_within(&self, expected_last: u64, max_payload: usize) -> Result<Outgoing, serde_json::Error> {
        let message = self.to_message(expected_last)?;
        if fits(&message, max_payload) {
            return Ok(message);
        }
        let mut event = self.event.clone();
        event.data = JsonObject::new();
        let smaller = StoredRecord { event: &event, ..*self };
        Ok(smaller.to_message(expected_last)?.with_header(headers::TRUNCATED, "data"))
    }

    /// The STORED message, published only if STORED's last sequence is `expected_last`
    /// (`Nats-Expected-Last-Sequence`): the persister's messages can never interleave with
    /// another writer's or follow a hole.
    pub fn to_message(&self, expected_last: u64) -> Result<Outgoing, serde_json::Error> {
        let event = self.event;
        let payload = serde_json::to_vec(&Payload {
            event_id: event.event_id,
            event_type: &event.event_type,
            event_source: event.event_source,
            event_category: event.event_category,
            user_id: event.user_id.as_deref(),
            session_id: event.session_id.as_deref(),
            organization_id: event.organization_id.as_deref(),
            device_id: event.device_id.as_deref(),
            correlation_id: event.correlation_id.as_deref(),
            data: &event.data,
            metadata: &event.metadata,
            context: &event.context,
            properties: &event.properties,
            stream_id: event.stream_id.as_ref(),
            stream_version: self.stream_version,
            stream_seq: self.stream_seq,
            timestamp: event.timestamp,
            created_at: event.created_at,
            stored_at: self.stored_at,
        })?;
        let subject =
            subjects::stored_subject(event.event_source.as_str(), event.event_category.as_str(), &event.event_type);
        let id = event.event_id.to_string();
        let mut message = Outgoing::with_id(subject, &id, payload.into())
            .with_header(headers::EXPECTED_LAST_SEQUENCE, &expected_last.to_string())
            .with_header(headers::EVENTS_SEQUENCE, &self.stream_seq.to_string())
            .with_header(headers::SCHEMA_VERSION, SCHEMA_VERSION)
            .with_header("ce-specversion", CE_SPEC_VERSION)
            .with_header("ce-id", &id)
            .with_header("ce-source", &percent_encode(&ce_source(event)))
            .with_header("ce-type", &percent_encode(&event.event_type))
            .with_header("ce-time", &rfc3339::to_string(&event.timestamp))
            .with_header("content-type", "application/json");
        if let Some(stream_id) = &event.stream_id {
            message = message.with_header("ce-subject", &percent_encode(stream_id.as_str()));
        }
        if let Some(trace) = self.trace {
            message = message.with_trace(trace);
        }
        Ok(message)
    }
}

/// Whether a message fits in `max_payload` with its headers (as NATS counts them, with room
/// for the header line and a header added later).
fn fits(message: &Outgoing, max_payload: usize) -> bool {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, values)| {
            values.iter().map(|value| AsRef::<str>::as_ref(name).len() + value.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    message.payload.len() + headers + 256 <= max_payload
}

/// The CloudEvents `source`: the one the producer sent, when it came in as a CloudEvent
/// (kept in `metadata.ce_source`), else `/event-service/{event_source}`.
fn ce_source(event: &Event) -> String {
    match event.metadata.get("ce_source").and_then(|value| value.as_str()) {
        Some(source) if !source.is_empty() => source.to_owned(),
        _ => format!("/event-service/{}", event.event_source.as_str()),
    }
}

/// Header values as the CloudEvents bindings want them: printable ASCII as is, everything
/// else (and `%` itself) percent-encoded as UTF-8.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && !c.is_ascii_control() && c != '%' {
            encoded.push(c);
        } else {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn event() -> Event {
        let mut event: Event = serde_json::from_value(json!({
            "event_id": "0190b5d8-0000-7000-8000-000000000001",
            "event_type": "order.placé",
            "event_source": "backend",
            "event_category": "order",
            "user_id": "u1",
            "session_id": null, "organization_id": null, "device_id": null, "correlation_id": null,
            "data": {"total": 12}, "metadata": {}, "context": {}, "properties": {},
            "stream_id": "order:42",
            "timestamp": "2026-12-04T10:00:00Z",
            "created_at": "2026-12-04T10:00:01Z"
        }))
        .unwrap();
        event.metadata.insert("ce_source".into(), json!(""));
        event
    }

    #[test]
    fn the_message_is_the_stored_event_with_cloudevents_headers() {
        let event = event();
        let stored_at = "2026-12-04T10:00:02Z".parse().unwrap();
        let record = StoredRecord { event: &event, stream_version: Some(3), stream_seq: 77, stored_at, trace: None };
        let message = record.to_message(41).unwrap();
        assert_eq!(message.subject, "event.stored.backend.order.order.plac_");
        let header = |name: &str| message.headers.get(name).map(|value| value.as_str().to_owned());
        assert_eq!(header("Nats-Msg-Id").as_deref(), Some("0190b5d8-0000-7000-8000-000000000001"));
        assert_eq!(header("ce-id"), header("Nats-Msg-Id"));
        assert_eq!(header("Nats-Expected-Last-Sequence").as_deref(), Some("41"));
        assert_eq!(header(headers::EVENTS_SEQUENCE).as_deref(), Some("77"));
        assert_eq!(header(headers::SCHEMA_VERSION).as_deref(), Some("1"));
        assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(header("ce-type").as_deref(), Some("order.plac%C3%A9"));
        assert_eq!(header("ce-source").as_deref(), Some("/event-service/backend"));
        assert_eq!(header("ce-time").as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(header("ce-subject").as_deref(), Some("order:42"));
        let payload: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(payload["stream_version"], 3);
        assert_eq!(payload["stream_seq"], 77);
        assert_eq!(payload["stored_at"], "2026-12-04T10:00:02Z");
        assert_eq!(payload["data"]["total"], 12);
        assert!(payload.get("session_id").is_none(), "absent fields are left out");
    }

    /// The schema file is the contract: every message validates, and its enums are the kinds.
    #[test]
    fn the_payload_follows_its_schema_file() {
        let schema: Value = serde_json::from_str(include_str!("../../jetstream/schemas/stored-event.v1.json")).unwrap();
        let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&schema).unwrap();
        let event = event();
        let stored_at = Utc::now();
        for stream_version in [Some(1), None] {
            let mut event = event.clone();
            if stream_version.is_none() {
                event.stream_id = None;
            }
            let record = StoredRecord { event: &event, stream_version, stream_seq: 1, stored_at, trace: None };
            let payload: Value = serde_json::from_slice(&record.to_message(0).unwrap().payload).unwrap();
            let errors: Vec<String> = validator.iter_errors(&payload).map(|error| error.to_string()).collect();
            assert!(errors.is_empty(), "{errors:?} in {payload}");
        }
        let names = |values: &Value| -> Vec<String> {
            values.as_array().unwrap().iter().map(|value| value.as_str().unwrap().to_owned()).collect()
        };
        let sources: Vec<String> = EventSource::ALL.iter().map(|source| source.as_str().to_owned()).collect();
        assert_eq!(names(&schema["properties"]["event_source"]["enum"]), sources);
        let categories: Vec<String> = EventCategory::ALL.iter().map(|category| category.as_str().to_owned()).collect();
        assert_eq!(names(&schema["properties"]["event_category"]["enum"]), categories);
    }

    #[test]
    fn a_message_too_large_for_nats_goes_without_its_data() {
        let mut event = event();
        event.data.insert("blob".into(), json!("x".repeat(10_000)));
        let record =
            StoredRecord { event: &event, stream_version: Some(1), stream_seq: 9, stored_at: Utc::now(), trace: None };
        let whole = record.to_message_within(3, 1024 * 1024).unwrap();
        assert!(whole.headers.get(headers::TRUNCATED).is_none());
        let cut = record.to_message_within(3, 4096).unwrap();
        assert_eq!(cut.headers.get(headers::TRUNCATED).map(|value| value.as_str()), Some("data"));
        let payload: Value = serde_json::from_slice(&cut.payload).unwrap();
        assert_eq!(payload["data"], json!({}));
        assert_eq!(payload["stream_seq"], 9);
        assert!(cut.payload.len() < 4096);
    }

    #[test]
    fn a_cloudevent_keeps_its_source() {
        let mut event = event();
        event.metadata.insert("ce_source".into(), json!("/shop/orders"));
        assert_eq!(ce_source(&event), "/shop/orders");
        assert_eq!(percent_encode("50% ü\n"), "50%25 %C3%BC%0A");
    }
}
