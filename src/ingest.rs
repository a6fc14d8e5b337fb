//! Parsing at the edge: turns a create request (JSON from HTTP or a NATS-native producer) into
//! a validated [`Event`], collecting every field error instead of stopping at the first.
//!
//! Reads JSON values, writes nothing. Guarantees: an [`Event`] that comes out of here has a
//! non-blank event type of at most 255 characters, known source and category, object-valued
//! payload fields and no NUL characters anywhere (PostgreSQL cannot store them), so the
//! persister never meets a row it cannot write because of its content.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::model::{Event, EventCategory, EventSource, JsonObject, new_event_id};

/// Longest accepted event type, in characters.
pub const MAX_EVENT_TYPE_CHARS: usize = 255;
/// Longest accepted identifier (user, session, organization, device, correlation, stream).
pub const MAX_ID_CHARS: usize = 255;

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error, for a field nested under `prefix` (`"[3]"`, `"events[2]"`).
    pub fn nested(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        Self { field, message: self.message }
    }
}

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
    let stream_id = fields.stream_id().or_else(|| Event::implicit_stream_id(user_id.as_deref(), device_id.as_deref()));
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

/// An [`Event`] exactly as the gateway publishes it, borrowed from the message: no other field,
/// every field of its JSON type. Anything else goes the way of [`parse_event`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Canonical<'a> {
    event_id: Uuid,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    event_source: EventSource,
    event_category: EventCategory,
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
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    created_at: Cow<'a, str>,
}

/// The event of a message in the gateway's own format (every stage reads them, most messages
/// are), decoded straight into its fields instead of through a JSON tree. `None` when the
/// message is in any other shape or breaks a rule: then [`parse_event`] decides, with the
/// field errors. Where both accept a message they build the same event.
pub fn parse_canonical(payload: &[u8]) -> Option<Event> {
    let canonical: Canonical = serde_json::from_slice(payload).ok()?;
    let text_ok = |text: &str, max_chars: usize| text.chars().count() <= max_chars && !text.contains('\0');
    let id = |value: Option<Cow<'_, str>>| match value {
        Some(text) if !text_ok(&text, MAX_ID_CHARS) => Err(()),
        other => Ok(other.map(Cow::into_owned)),
    };
    let event_type = canonical.event_type;
    if !text_ok(&event_type, MAX_EVENT_TYPE_CHARS)
        || event_type.trim().is_empty()
        || event_type.chars().any(char::is_control)
    {
        return None;
    }
    let [data, metadata, context, properties] =
        [canonical.data, canonical.metadata, canonical.context, canonical.properties];
    if [&data, &metadata, &context, &properties].iter().any(|map| object_contains_nul(map)) {
        return None;
    }
    let user_id = id(canonical.user_id).ok()?;
    let device_id = id(canonical.device_id).ok()?;
    let stream_id = match canonical.stream_id {
        Some(stream_id) if valid_stream_id(&stream_id) => Some(stream_id.into_owned()),
        Some(_) => return None,
        None => Event::implicit_stream_id(user_id.as_deref(), device_id.as_deref()),
    };
    let time = |text: &str| if text.contains('\0') { None } else { parse_timestamp(text).map(|t| t.trunc_subsecs(6)) };
    Some(Event {
        event_id: canonical.event_id,
        event_type: event_type.into_owned(),
        event_source: canonical.event_source,
        event_category: canonical.event_category,
        user_id,
        session_id: id(canonical.session_id).ok()?,
        organization_id: id(canonical.organization_id).ok()?,
        device_id,
        correlation_id: id(canonical.correlation_id).ok()?,
        data,
        metadata,
        context,
        properties,
        stream_id,
        timestamp: time(&canonical.timestamp)?,
        created_at: time(&canonical.created_at)?,
    })
}

/// The object-valued fields of an event.
const PAYLOAD_OBJECTS: [&str; 4] = ["data", "metadata", "context", "properties"];

/// Parses a timestamp the way producers send them: RFC 3339, or ISO 8601 without an offset
/// (taken as UTC, as Python's `datetime.isoformat()` writes it).
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(parsed) = DateTime::parse_from_rfc3339(text) {
        return Some(parsed.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

/// Checks a stream id: `{entity_type}:{entity_id}`, both parts non-empty.
pub fn valid_stream_id(stream_id: &str) -> bool {
    match stream_id.split_once(':') {
        Some((entity_type, entity_id)) => {
            !entity_type.trim().is_empty()
                && !entity_id.trim().is_empty()
                && stream_id.chars().count() <= MAX_ID_CHARS
                && !stream_id.chars().any(char::is_control)
        }
        None => false,
    }
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

fn object_contains_nul(map: &JsonObject) -> bool {
    map.iter().any(|(key, item)| key.contains('\0') || contains_nul(item))
}

/// Field readers over one request object that record errors as they go.
pub(crate) struct Fields<'a> {
    pub body: &'a Map<String, Value>,
    pub errors: &'a mut Vec<FieldError>,
}

impl Fields<'_> {
    /// The field's value, treating an explicit `null` like an absent field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.body.get(name).filter(|value| !value.is_null())
    }

    pub fn present(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    pub fn string(&mut self, name: &str, max_chars: usize) -> Option<String> {
        match self.get(name)? {
            Value::String(text) if text.chars().count() > max_chars => {
                self.fail(name, format!("must be at most {max_chars} characters"));
                None
            }
            Value::String(text) => Some(text.clone()),
            _ => {
                self.fail(name, "must be a string");
                None
            }
        }
    }

    pub fn object(&mut self, name: &str) -> JsonObject {
        match self.get(name) {
            Some(Value::Object(map)) => map.clone(),
            _ => {
                self.check_object(name);
                JsonObject::new()
            }
        }
    }

    /// Records an error unless the field is absent, `null` or an object.
    pub fn check_object(&mut self, name: &str) {
        if self.get(name).is_some_and(|value| !value.is_object()) {
            self.fail(name, "must be a JSON object");
        }
    }

    pub fn enumerated<T>(&mut self, name: &str, parse: fn(&str) -> Option<T>, expected: fn() -> String) -> Option<T> {
        let parsed = self.get(name)?.as_str().and_then(parse);
        if parsed.is_none() {
            self.fail(name, format!("must be one of: {}", expected()));
        }
        parsed
    }

    pub fn uuid(&mut self, name: &str) -> Option<Uuid> {
        let parsed = self.get(name)?.as_str().and_then(|text| Uuid::parse_str(text).ok());
        if parsed.is_none() {
            self.fail(name, "must be a UUID");
        }
        parsed
    }

    pub fn timestamp(&mut self, name: &str) -> Option<DateTime<Utc>> {
        let parsed = self.get(name)?.as_str().and_then(parse_timestamp);
        if parsed.is_none() {
            self.fail(name, "must be an ISO 8601 / RFC 3339 timestamp");
        }
        parsed
    }

    /// `stream_id`, or `entity_type` + `entity_id`.
    fn stream_id(&mut self) -> Option<String> {
        let explicit = self.string("stream_id", MAX_ID_CHARS);
        let entity_type = self.string("entity_type", MAX_ID_CHARS);
        let entity_id = self.string("entity_id", MAX_ID_CHARS);
        let from_entity = match (entity_type, entity_id) {
            (Some(entity_type), Some(entity_id)) => Some(format!("{entity_type}:{entity_id}")),
            (None, None) => None,
            (Some(_), None) => {
                self.fail("entity_id", "is required when entity_type is given");
                None
            }
            (None, Some(_)) => {
                self.fail("entity_type", "is required when entity_id is given");
                None
            }
        };
        let stream_id = match (explicit, from_entity) {
            (Some(explicit), Some(derived)) if explicit != derived => {
                self.fail("stream_id", "contradicts entity_type and entity_id");
                return None;
            }
            (explicit, derived) => explicit.or(derived)?,
        };
        if !valid_stream_id(&stream_id) {
            self.fail("stream_id", "must look like {entity_type}:{entity_id}");
            return None;
        }
        Some(stream_id)
    }
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
        assert_eq!(event.stream_id.as_deref(), Some("user:u1"));
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
        assert_eq!(event.stream_id.as_deref(), Some("order:o-1"));
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
    }

    #[test]
    fn published_events_parse_back_to_themselves() {
        let event = parse(json!({"event_type": "order.placed", "data": {"total": 5}})).unwrap();
        let again = parse(serde_json::to_value(&event).unwrap()).unwrap();
        assert_eq!(event, again);
    }

    #[test]
    fn canonical_messages_decode_to_what_parse_event_builds() {
        let requests = [
            json!({"event_type": "order.placed", "user_id": "u1", "data": {"total": 5, "items": [1, "a"]}}),
            json!({"event_type": "x", "stream_id": "order:1", "device_id": "d", "timestamp": "2025-12-30T10:00:00.1234567Z"}),
            json!({"event_type": "é".repeat(255), "event_source": "frontend", "event_category": "page_view"}),
        ];
        for request in requests {
            let event = parse(request).unwrap();
            let wire = serde_json::to_vec(&event).unwrap();
            assert_eq!(parse_canonical(&wire), Some(event.clone()));
            assert_eq!(parse_canonical(&wire).unwrap(), parse(serde_json::from_slice(&wire).unwrap()).unwrap());
        }
    }

    #[test]
    fn anything_but_a_valid_canonical_message_is_left_to_parse_event() {
        let event = parse(json!({"event_type": "a", "user_id": "u"})).unwrap();
        let canonical = serde_json::to_value(&event).unwrap();
        let variant = |change: &dyn Fn(&mut Value)| {
            let mut value = canonical.clone();
            change(&mut value);
            parse_canonical(&serde_json::to_vec(&value).unwrap())
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
        assert_eq!(implicit.stream_id.as_deref(), Some("user:u"));
        // A timestamp without an offset is UTC, as parse_event takes it.
        let naive = variant(&|v| v["timestamp"] = json!("2025-12-30T10:00:00.5")).unwrap();
        assert_eq!(naive.timestamp, parse_timestamp("2025-12-30T10:00:00.5Z").unwrap());
    }

    #[test]
    fn nested_field_names() {
        assert_eq!(FieldError::new("event_type", "x").nested("[3]").field, "[3].event_type");
        assert_eq!(FieldError::new("", "x").nested("[3]").field, "[3]");
    }
}
