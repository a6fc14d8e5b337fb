//! Parsing a create request from its JSON text. A request in the gateway's own shape (what
//! the gateway publishes to EVENTS, and what most producers send) is deserialized straight
//! into an [`Event`]; anything else goes through a JSON tree and [`parse_event`], which
//! reports every field error.
//!
//! Reads JSON text, writes nothing. Guarantees: both ways build the same event from the same
//! request and defaults; the straight way only ever declines a request, and then
//! [`parse_event`] decides.

use std::borrow::Cow;

use chrono::SubsecRound;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::event::{Event, JsonObject, MAX_ID_CHARS, StreamId, new_event_id};
use super::fields::{FieldError, parse_timestamp};
use super::kinds::{EventCategory, EventSource};
use super::parse::{Defaults, MAX_EVENT_TYPE_CHARS, object_contains_nul, parse_event};

/// Why a request's text is not an event.
#[derive(Debug)]
pub enum TextError {
    /// Not JSON at all.
    NotJson(serde_json::Error),
    /// JSON, with these field errors.
    Invalid(Vec<FieldError>),
}

/// Parses one create request from its JSON text with these defaults (asked for only when the
/// request leaves a field out).
pub fn parse_event_text(text: &[u8], defaults: impl Fn() -> Defaults) -> Result<Event, TextError> {
    if let Some(event) = parse_typed(text, &defaults) {
        return Ok(event);
    }
    let value: Value = serde_json::from_slice(text).map_err(TextError::NotJson)?;
    parse_event(value, &defaults()).map_err(TextError::Invalid)
}

/// A create request in the gateway's own shape, borrowed from its text: the fields of an
/// [`Event`] and no other, every one of its JSON type. Those [`Defaults`] supply may be left
/// out (`null` is the same as left out, as in [`parse_event`]).
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

/// The event of a request in the gateway's own shape, decoded straight into its fields;
/// `defaults` is asked only when the request leaves a field out. `None` when the request is in
/// any other shape or breaks a rule.
fn parse_typed(text: &[u8], defaults: impl FnOnce() -> Defaults) -> Option<Event> {
    let typed: Typed = serde_json::from_slice(text).ok()?;
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
    if [&data, &metadata, &context, &properties].iter().any(|map| object_contains_nul(map)) {
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
        Some(text) => parse_timestamp(&text).map(|t| t.trunc_subsecs(6)),
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
    use chrono::Utc;
    use serde_json::json;

    fn parse(value: Value) -> Event {
        parse_event(value, &Defaults::http(Utc::now())).unwrap()
    }

    /// For a request that leaves nothing out: the defaults are never asked for.
    fn no_defaults() -> Defaults {
        panic!("a whole event needs no defaults")
    }

    #[test]
    fn requests_that_leave_fields_out_take_the_defaults() {
        let defaults = || Defaults {
            now: Utc::now(),
            event_source: EventSource::IotDevice,
            event_category: EventCategory::Telemetry,
            event_id: Some(Uuid::now_v7()),
            event_type: Some("temp.read".to_owned()),
        };
        let defaults = {
            let fixed = defaults();
            move || fixed.clone()
        };
        let requests = [
            json!({"user_id": "u1", "data": {"a": 1}}),
            json!({"event_type": "order.placed", "event_source": "backend", "event_category": "order",
                   "user_id": "bench-user-1", "session_id": "s", "correlation_id": "c",
                   "data": {"order_id": "o-1", "amount": 1.25}, "metadata": {"bench": "x"}}),
            json!({"event_type": null, "event_source": null, "timestamp": "2025-12-30T10:00:00.1234567Z",
                   "device_id": "d"}),
        ];
        for request in requests {
            let text = serde_json::to_vec(&request).unwrap();
            let straight = parse_typed(&text, &defaults).expect("parsed without a JSON tree");
            assert_eq!(straight, parse_event(request.clone(), &defaults()).unwrap(), "{request}");
            assert_eq!(parse_event_text(&text, &defaults).unwrap(), straight);
        }
        // Left to parse_event: a field it knows and the straight way does not, a type nothing
        // supplies.
        let entity = json!({"event_type": "a", "entity_type": "order", "entity_id": "1"});
        assert_eq!(parse_typed(&serde_json::to_vec(&entity).unwrap(), &defaults), None);
        assert_eq!(parse_typed(br#"{"user_id": "u"}"#, || Defaults::http(Utc::now())), None);
    }

    #[test]
    fn text_that_is_no_event_says_why() {
        let http = || Defaults::http(Utc::now());
        assert!(matches!(parse_event_text(b"{nope", http), Err(TextError::NotJson(_))));
        let Err(TextError::Invalid(errors)) = parse_event_text(br#"{"event_type": 7, "user_id": "u"}"#, http) else {
            panic!("a JSON request with a bad field")
        };
        assert_eq!(errors[0].field, "event_type");
        let event = parse_event_text(br#"{"event_type": "a", "entity_type": "o", "entity_id": "1"}"#, http).unwrap();
        assert_eq!(event.stream_id.as_ref().map(StreamId::as_str), Some("o:1"), "by the JSON tree");
    }

    #[test]
    fn whole_events_parse_straight_to_what_parse_event_builds() {
        let requests = [
            json!({"event_type": "order.placed", "user_id": "u1", "data": {"total": 5, "items": [1, "a"]}}),
            json!({"event_type": "x", "stream_id": "order:1", "device_id": "d", "timestamp": "2025-12-30T10:00:00.1234567Z"}),
            json!({"event_type": "é".repeat(255), "event_source": "frontend", "event_category": "page_view"}),
        ];
        for request in requests {
            let event = parse(request);
            let wire = serde_json::to_vec(&event).unwrap();
            assert_eq!(parse_typed(&wire, no_defaults), Some(event.clone()));
            assert_eq!(parse_typed(&wire, no_defaults).unwrap(), parse(serde_json::from_slice(&wire).unwrap()));
        }
    }

    #[test]
    fn anything_else_is_left_to_parse_event() {
        let event = parse(json!({"event_type": "a", "user_id": "u"}));
        let canonical = serde_json::to_value(&event).unwrap();
        let variant = |change: &dyn Fn(&mut Value)| {
            let mut value = canonical.clone();
            change(&mut value);
            parse_typed(&serde_json::to_vec(&value).unwrap(), no_defaults)
        };
        // Another field, a wrong type, a broken rule: declined.
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
        assert_eq!(naive.timestamp, parse_timestamp("2025-12-30T10:00:00.5Z").unwrap());
    }

    /// Every field of a whole request, alone given each of these values (absent, `null`, the
    /// wrong type, at and past a limit, NUL, control characters, another shape): wherever the
    /// straight way accepts, `parse_event` accepts too and builds the same event.
    #[test]
    fn the_straight_way_never_builds_another_event_than_parse_event() {
        let fixed = Defaults {
            now: Utc::now(),
            event_source: EventSource::Backend,
            event_category: EventCategory::UserAction,
            event_id: Some(Uuid::now_v7()),
            event_type: Some("from.subject".to_owned()),
        };
        let base = json!({
            "event_id": Uuid::now_v7(), "event_type": "order.placed", "event_source": "frontend",
            "event_category": "order", "user_id": "u", "session_id": "s", "organization_id": "o",
            "device_id": "d", "correlation_id": "c", "data": {"a": [1, {"b": "x"}]}, "metadata": {},
            "context": {"ip": "1.2.3.4"}, "properties": {"k": null}, "stream_id": "order:1",
            "timestamp": "2025-12-30T10:00:00.1234567+02:00", "created_at": "2025-12-30T10:00:01Z"
        });
        let values = [
            Value::Null,
            json!(7),
            json!(""),
            json!(" "),
            json!("x".repeat(255)),
            json!("x".repeat(256)),
            json!("a\u{0}b"),
            json!("a\nb"),
            json!("order:2"),
            json!("nocolon"),
            json!("2025-12-30T10:00:00"),
            json!("backend"),
            json!("unknown"),
            json!({"deep": ["a\u{0}"]}),
            json!({"fine": true}),
            json!([1]),
        ];
        let names: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        let mut straight = 0;
        for name in &names {
            for value in values.iter().map(Some).chain([None]) {
                let mut request = base.clone();
                match value {
                    Some(value) => request[name.as_str()] = value.clone(),
                    None => drop(request.as_object_mut().unwrap().remove(name.as_str())),
                }
                let text = serde_json::to_vec(&request).unwrap();
                if let Some(event) = parse_typed(&text, || fixed.clone()) {
                    straight += 1;
                    let parsed = parse_event(request.clone(), &fixed);
                    assert_eq!(parsed.as_ref().ok(), Some(&event), "{request}");
                }
            }
        }
        assert!(straight > names.len() * 3, "most variations of a whole request go the straight way: {straight}");
    }
}
