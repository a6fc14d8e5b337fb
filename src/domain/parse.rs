//! Parsing at the edge: turns a create request (JSON from HTTP or a NATS-native producer) into
//! a validated [`Event`], collecting every field error instead of stopping at the first.
//!
//! Reads JSON values, writes nothing. Guarantees: an [`Event`] that comes out of here has a
//! non-blank event type of at most 255 characters, known source and category, object-valued
//! payload fields and no NUL characters anywhere (PostgreSQL cannot store them), so the
//! persister never meets a row it cannot write because of its content.

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::event::{Event, JsonObject, MAX_ID_CHARS, StreamId, new_event_id};
pub use super::fields::parse_timestamp;
use super::fields::{FieldError, Fields};
use super::kinds::{EventCategory, EventSource};

/// Longest accepted event type, in characters.
pub const MAX_EVENT_TYPE_CHARS: usize = 255;

/// What the caller knows that the request may not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub now: DateTime<Utc>,
    pub event_source: EventSource,
    pub event_category: EventCategory,
    /// Used when the request has no `event_id` (a NATS producer's `Nats-Msg-Id`, say);
    /// a fresh v7 id otherwise.
    pub event_id: Option<Uuid>,
    /// Used when the request has no `event_type` (the type tokens of a NATS subject).
    pub event_type: Option<String>,
}

impl Defaults {
    /// The defaults of the HTTP create endpoint.
    pub fn http(now: DateTime<Utc>) -> Self {
        Self {
            now,
            event_source: EventSource::Backend,
            event_category: EventCategory::UserAction,
            event_id: None,
            event_type: None,
        }
    }
}

/// The object-valued fields of an event.
const PAYLOAD_OBJECTS: [&str; 4] = ["data", "metadata", "context", "properties"];

/// Validates one create request (or an [`Event`] as published by the gateway, which is a
/// superset) and builds the event. Takes the request by value: its payload objects move into
/// the event instead of being copied.
pub fn parse_event(value: Value, defaults: &Defaults) -> Result<Event, Vec<FieldError>> {
    let has_nul = contains_nul(&value);
    let Value::Object(mut body) = value else {
        return Err(vec![FieldError::new("", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let mut fields = Fields { body: &body, errors: &mut errors };

    let event_type = match fields.string("event_type", MAX_EVENT_TYPE_CHARS) {
        Some(event_type) => Some(event_type),
        None if !fields.present("event_type") => match &defaults.event_type {
            Some(event_type) => Some(event_type.clone()),
            None => {
                fields.fail("event_type", "is required");
                None
            }
        },
        None => None,
    };
    if let Some(event_type) = &event_type {
        if event_type.trim().is_empty() {
            fields.fail("event_type", "must not be blank");
        } else if event_type.chars().any(char::is_control) {
            fields.fail("event_type", "must not contain control characters");
        }
    }
    let event_source =
        fields.enumerated("event_source", EventSource::parse, EventSource::expected).unwrap_or(defaults.event_source);
    let event_category = fields
        .enumerated("event_category", EventCategory::parse, EventCategory::expected)
        .unwrap_or(defaults.event_category);
    let user_id = fields.string("user_id", MAX_ID_CHARS);
    let session_id = fields.string("session_id", MAX_ID_CHARS);
    let organization_id = fields.string("organization_id", MAX_ID_CHARS);
    let device_id = fields.string("device_id", MAX_ID_CHARS);
    let correlation_id = fields.string("correlation_id", MAX_ID_CHARS);
    for name in PAYLOAD_OBJECTS {
        fields.check_object(name);
    }
    let event_id = fields.uuid("event_id").or(defaults.event_id).unwrap_or_else(new_event_id);
    // PostgreSQL keeps microseconds: cut there, so the answer shows what GET will show.
    let timestamp = fields.timestamp("timestamp").unwrap_or(defaults.now).trunc_subsecs(6);
    let created_at = fields.timestamp("created_at").unwrap_or(defaults.now).trunc_subsecs(6);
    let stream_id = stream_id(&mut fields).or_else(|| StreamId::implicit(user_id.as_deref(), device_id.as_deref()));
    if has_nul {
        errors.push(FieldError::new("", "must not contain NUL (\\u0000) characters"));
    }
    let [data, metadata, context, properties] = PAYLOAD_OBJECTS.map(|name| match body.remove(name) {
        Some(Value::Object(map)) => map,
        _ => JsonObject::new(),
    });

    match event_type {
        Some(event_type) if errors.is_empty() => Ok(Event {
            event_id,
            event_type,
            event_source,
            event_category,
            user_id,
            session_id,
            organization_id,
            device_id,
            correlation_id,
            data,
            metadata,
            context,
            properties,
            stream_id,
            timestamp,
            created_at,
        }),
        _ => Err(errors),
    }
}

/// `stream_id`, or `entity_type` + `entity_id`.
fn stream_id(fields: &mut Fields<'_>) -> Option<StreamId> {
    let explicit = fields.string("stream_id", MAX_ID_CHARS);
    let entity_type = fields.string("entity_type", MAX_ID_CHARS);
    let entity_id = fields.string("entity_id", MAX_ID_CHARS);
    let from_entity = match (entity_type, entity_id) {
        (Some(entity_type), Some(entity_id)) => Some(format!("{entity_type}:{entity_id}")),
        (None, None) => None,
        (Some(_), None) => {
            fields.fail("entity_id", "is required when entity_type is given");
            None
        }
        (None, Some(_)) => {
            fields.fail("entity_type", "is required when entity_id is given");
            None
        }
    };
    let text = match (explicit, from_entity) {
        (Some(explicit), Some(derived)) if explicit != derived => {
            fields.fail("stream_id", "contradicts entity_type and entity_id");
            return None;
        }
        (explicit, derived) => explicit.or(derived)?,
    };
    let parsed = StreamId::parse(&text);
    if parsed.is_none() {
        fields.fail("stream_id", "must look like {entity_type}:{entity_id}");
    }
    parsed
}

/// True when any string or key in the value holds a NUL character.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => object_contains_nul(map),
        _ => false,
    }
}

/// [`contains_nul`] for an object.
pub fn object_contains_nul(map: &JsonObject) -> bool {
    map.iter().any(|(key, item)| key.contains('\0') || contains_nul(item))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Event, Vec<FieldError>> {
        parse_event(value, &Defaults::http(Utc::now()))
    }

    fn fields_of(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|error| error.field).collect()
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let event = parse(json!({"event_type": "user.registered", "user_id": "u1"})).unwrap();
        assert_eq!(event.event_source, EventSource::Backend);
        assert_eq!(event.event_category, EventCategory::UserAction);
        assert_eq!(event.event_id.get_version_num(), 7);
        assert_eq!(event.stream_id.as_ref().map(StreamId::as_str), Some("user:u1"));
        assert!(event.data.is_empty());
    }

    #[test]
    fn explicit_nulls_mean_default() {
        let event = parse(json!({
            "event_type": "a", "event_source": null, "data": null, "timestamp": null
        }))
        .unwrap();
        assert_eq!(event.event_source, EventSource::Backend);
        assert!(event.data.is_empty());
    }

    #[test]
    fn every_bad_field_is_reported() {
        let errors = parse(json!({
            "event_type": " ",
            "event_source": "mainframe",
            "event_category": 7,
            "user_id": 12,
            "data": [1],
            "event_id": "nope",
            "timestamp": "yesterday",
        }))
        .unwrap_err();
        assert_eq!(
            fields_of(errors),
            ["event_type", "event_source", "event_category", "user_id", "data", "event_id", "timestamp"]
        );
    }

    #[test]
    fn event_type_limits() {
        assert!(parse(json!({"event_type": "x".repeat(255)})).is_ok());
        assert!(parse(json!({"event_type": "é".repeat(255)})).is_ok());
        assert_eq!(fields_of(parse(json!({"event_type": "x".repeat(256)})).unwrap_err()), ["event_type"]);
        assert_eq!(fields_of(parse(json!({})).unwrap_err()), ["event_type"]);
        assert_eq!(fields_of(parse(json!({"event_type": "a\nb"})).unwrap_err()), ["event_type"]);
    }

    #[test]
    fn nul_characters_are_refused_anywhere() {
        let errors = parse(json!({"event_type": "a", "data": {"deep": ["ok", "bad\u{0}"]}})).unwrap_err();
        assert_eq!(fields_of(errors), [""]);
    }

    #[test]
    fn streams_from_entity_fields() {
        let event =
            parse(json!({"event_type": "a", "entity_type": "order", "entity_id": "o-1", "user_id": "u"})).unwrap();
        assert_eq!(event.stream_id.as_ref().map(StreamId::as_str), Some("order:o-1"));
        let errors = parse(json!({"event_type": "a", "stream_id": "nocolon"})).unwrap_err();
        assert_eq!(fields_of(errors), ["stream_id"]);
        let errors = parse(json!({"event_type": "a", "entity_type": "order"})).unwrap_err();
        assert_eq!(fields_of(errors), ["entity_id"]);
    }

    #[test]
    fn timestamps_with_and_without_offsets() {
        assert!(parse_timestamp("2025-12-30T10:00:00Z").is_some());
        assert!(parse_timestamp("2025-12-30T10:00:00.123+02:00").is_some());
        assert!(parse_timestamp("2025-12-30T10:00:00.123456").is_some());
        assert!(parse_timestamp("30/12/2025").is_none());
        // What PostgreSQL cannot keep (or chrono cannot move) is refused here, not when stored.
        assert!(parse_timestamp("0000-01-01T00:00:00Z").is_some());
        assert!(parse_timestamp("9999-12-31T23:59:59.999999Z").is_some());
        for far in
            ["-200000-01-01T00:00:00", "+200000-01-01T00:00:00", "-0001-12-31 00:00:00", "0000-01-01T00:00:00+01:00"]
        {
            assert!(parse_timestamp(far).is_none(), "{far}");
        }
    }

    #[test]
    fn published_events_parse_back_to_themselves() {
        let event = parse(json!({"event_type": "order.placed", "data": {"total": 5}})).unwrap();
        let again = parse(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(event, again);
    }
}
