//! Segment and RudderStack tracking messages (`track`, `identify`, `page`, `screen`, `group`,
//! `alias`) as create requests: the one mapping the tracking API (`/v1/*`) and the RudderStack
//! webhook share.
//!
//! Reads JSON; writes nothing. The mapping:
//! - `track` → the `event` name (required); `page` / `screen` → `name` (else the type);
//!   `identify`, `group`, `alias` → the type (or `event` when given).
//! - Category: `page` and `screen` are `page_view`; a `track` whose name says `form` is
//!   `form_submit`, one that says `click` is `click`; everything else `user_action`.
//! - `properties` and `traits` (or `context.traits`, where RudderStack's identify puts them)
//!   become `data`; `context` stays `context`; `userId` (else
//!   `anonymousId`) is the user; `context.sessionId` the session; `messageId` gives a stable
//!   event id, so a retried message lands once.
//! - The message's own fields that have no place of their own (`messageId`, `anonymousId`,
//!   `timestamp`, `originalTimestamp`, `sentAt`, `receivedAt`, `channel`, `integrations`,
//!   `groupId`, `previousId`) are kept in `metadata`.

use chrono::{DateTime, Datelike, Duration, Utc};
use serde_json::{Map, Value, json};

use crate::domain::fields::TIMESTAMP_YEARS;
use crate::domain::parse::parse_timestamp;
use crate::domain::{EventCategory, EventSource, FieldError, event_id_from_key};

/// How far a client's `sentAt` may be from when the service received it before the client's
/// clock is taken to be wrong (network time and queueing stay below this).
pub const CLOCK_TOLERANCE: Duration = Duration::seconds(2);

/// Where a message came from, which decides what the mapping trusts.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// From RudderStack's webhook destination: its server set the times already.
    Webhook,
    /// From an SDK (the tracking API), received now: the client's clock may be off.
    Sdk { received_at: DateTime<Utc> },
}

/// The metadata key that records the message type.
fn type_key(origin: Origin) -> &'static str {
    match origin {
        Origin::Webhook => "rudderstack_type",
        Origin::Sdk { .. } => "message_type",
    }
}

/// Message fields kept in `metadata` as they came.
const KEPT: [&str; 10] = [
    "messageId",
    "anonymousId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "channel",
    "integrations",
    "groupId",
    "previousId",
];

/// One message as a create request. `kind` is the type the endpoint implies (`/v1/track`), if
/// any; the message's own `type` is used otherwise.
pub fn to_request(message: &Value, kind: Option<&str>, origin: Origin) -> Result<Value, Vec<FieldError>> {
    let Some(message) = message.as_object() else {
        return Err(vec![FieldError::new("", "must be a JSON object")]);
    };
    let text = |name: &str| message.get(name).and_then(as_id);
    let kind =
        kind.map(str::to_owned).or_else(|| text("type")).unwrap_or_else(|| "track".to_owned()).to_ascii_lowercase();
    let Some(event_type) = event_type(&kind, &text) else {
        return Err(vec![FieldError::new("event", "is required for track events")]);
    };
    let mut data = Map::new();
    // RudderStack's identify carries its traits in `context.traits`, Segment's at the root.
    let traits = message.get("traits").or_else(|| message.get("context").and_then(|context| context.get("traits")));
    for values in [message.get("properties"), traits] {
        if let Some(Value::Object(values)) = values {
            data.extend(values.clone());
        }
    }
    let mut metadata = Map::new();
    metadata.insert(type_key(origin).into(), Value::String(kind.clone()));
    for name in KEPT {
        if let Some(value) = message.get(name).filter(|value| !value.is_null()) {
            metadata.insert(name.into(), value.clone());
        }
    }
    let context = message.get("context").filter(|value| value.is_object()).cloned().unwrap_or_else(|| json!({}));
    let mut request = json!({
        "event_id": text("messageId").map(|message_id| event_id_from_key("rudderstack", &message_id)),
        "event_type": event_type,
        "event_category": category(&kind, &event_type).as_str(),
        "user_id": text("userId").or_else(|| text("anonymousId")),
        "session_id": context.get("sessionId").and_then(as_id),
        "data": data,
        "metadata": metadata,
        "timestamp": event_time(message, origin).map(|time| time.to_rfc3339()),
    });
    if let Origin::Sdk { received_at } = origin {
        request["event_source"] = json!(source_of(&context).as_str());
        request["metadata"]["receivedAt"] = json!(received_at.to_rfc3339());
    }
    request["context"] = context;
    Ok(request)
}

fn event_type(kind: &str, text: &impl Fn(&str) -> Option<String>) -> Option<String> {
    match kind {
        "track" => text("event"),
        "page" | "screen" => text("name").or_else(|| text("event")).or_else(|| Some(kind.to_owned())),
        _ => text("event").or_else(|| Some(kind.to_owned())),
    }
}

/// The category a message type and event name say.
pub fn category(kind: &str, event_type: &str) -> EventCategory {
    let lowered = event_type.to_lowercase();
    match kind {
        "page" | "screen" => EventCategory::PageView,
        "track" if lowered.contains("form") => EventCategory::FormSubmit,
        "track" if lowered.contains("click") => EventCategory::Click,
        _ => EventCategory::UserAction,
    }
}

/// Browser and mobile libraries send from the frontend; server libraries from a backend.
pub fn source_of(context: &Value) -> EventSource {
    let library = context.pointer("/library/name").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase();
    let frontend = ["javascript", ".js", "ios", "android", "react-native", "flutter", "browser"];
    if frontend.iter().any(|marker| library.contains(marker)) { EventSource::Frontend } else { EventSource::Backend }
}

/// When the event happened. From a webhook: the first readable of `timestamp`,
/// `originalTimestamp`, `sentAt`. From an SDK: the client's time (`originalTimestamp`, else
/// `timestamp`), corrected by how far the client's clock is off when its `sentAt` disagrees
/// with when the message was received: `receivedAt − (sentAt − client time)`.
pub fn event_time(message: &Map<String, Value>, origin: Origin) -> Option<DateTime<Utc>> {
    let time = |name: &str| message.get(name).and_then(Value::as_str).and_then(parse_timestamp);
    match origin {
        Origin::Webhook => time("timestamp").or_else(|| time("originalTimestamp")).or_else(|| time("sentAt")),
        Origin::Sdk { received_at } => {
            let client = time("originalTimestamp").or_else(|| time("timestamp"));
            match (client, time("sentAt")) {
                (Some(client), Some(sent)) => Some(corrected(client, sent, received_at)),
                (Some(client), None) => Some(client),
                (None, _) => Some(received_at),
            }
        }
    }
}

/// A client time moved by the client clock's offset, when it is off by more than
/// [`CLOCK_TOLERANCE`]. A correction that lands outside [`TIMESTAMP_YEARS`] says the client's
/// times are nonsense: then the time it was received.
pub fn corrected(client: DateTime<Utc>, sent: DateTime<Utc>, received: DateTime<Utc>) -> DateTime<Utc> {
    let skew = received - sent;
    if skew.abs() <= CLOCK_TOLERANCE {
        return client;
    }
    received.checked_sub_signed(sent - client).filter(|time| TIMESTAMP_YEARS.contains(&time.year())).unwrap_or(received)
}

/// Ids arrive as strings or numbers.
fn as_id(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_timestamp(text).unwrap()
    }

    #[test]
    fn webhook_mapping_is_unchanged() {
        let request = to_request(
            &json!({
                "type": "track", "event": "Signup Form Submitted", "anonymousId": "anon-1",
                "messageId": "m-1", "properties": {"plan": "pro"}, "context": {"ip": "1.2.3.4"}
            }),
            None,
            Origin::Webhook,
        )
        .unwrap();
        assert_eq!(request["event_category"], "form_submit");
        assert_eq!(request["user_id"], "anon-1");
        assert_eq!(request["data"]["plan"], "pro");
        assert_eq!(request["metadata"]["messageId"], "m-1");
        assert_eq!(request["metadata"]["rudderstack_type"], "track");
        assert_eq!(request["event_id"], json!(event_id_from_key("rudderstack", "m-1")));
        assert!(request.get("event_source").is_none(), "the webhook's default source applies");

        let page = to_request(&json!({"type": "page", "name": "Home", "userId": 42}), None, Origin::Webhook).unwrap();
        assert_eq!((page["event_type"].as_str(), page["event_category"].as_str()), (Some("Home"), Some("page_view")));
        assert_eq!(page["user_id"], "42");
        let identify =
            to_request(&json!({"type": "identify", "userId": "u", "traits": {"email": "a@b"}}), None, Origin::Webhook)
                .unwrap();
        assert_eq!(identify["event_type"], "identify");
        assert_eq!(identify["data"]["email"], "a@b");
        let click = to_request(&json!({"type": "track", "event": "Button Clicked"}), None, Origin::Webhook).unwrap();
        assert_eq!(click["event_category"], "click");
        assert!(to_request(&json!({"type": "track"}), None, Origin::Webhook).is_err());
    }

    #[test]
    fn the_endpoint_names_the_type_and_the_library_the_source() {
        let sdk = Origin::Sdk { received_at: at("2026-01-01T00:00:00Z") };
        let group = to_request(
            &json!({"groupId": "g1", "userId": "u", "traits": {"name": "Acme"},
                    "context": {"library": {"name": "analytics-python"}}}),
            Some("group"),
            sdk,
        )
        .unwrap();
        assert_eq!((group["event_type"].as_str(), group["event_source"].as_str()), (Some("group"), Some("backend")));
        assert_eq!(group["metadata"]["groupId"], "g1");
        assert_eq!(group["metadata"]["message_type"], "group");
        let browser = json!({"library": {"name": "RudderLabs JavaScript SDK"}});
        assert_eq!(source_of(&browser), EventSource::Frontend);
        assert_eq!(source_of(&json!({})), EventSource::Backend);
    }

    #[test]
    fn a_client_clock_that_is_off_is_corrected() {
        let received = at("2026-01-01T12:00:10Z");
        let sdk = Origin::Sdk { received_at: received };
        // The client's clock is an hour behind: it sent at 11:00:05 what happened at 11:00:00.
        let message = json!({"originalTimestamp": "2026-01-01T11:00:00Z", "sentAt": "2026-01-01T11:00:05Z"});
        assert_eq!(event_time(message.as_object().unwrap(), sdk), Some(at("2026-01-01T12:00:05Z")));
        // A clock that agrees (within the tolerance) is trusted as it is.
        let message = json!({"timestamp": "2026-01-01T12:00:00Z", "sentAt": "2026-01-01T12:00:09Z"});
        assert_eq!(event_time(message.as_object().unwrap(), sdk), Some(at("2026-01-01T12:00:00Z")));
        // No client time at all: when it was received.
        assert_eq!(event_time(&Map::new(), sdk), Some(received));
        // A correction that would leave the years a timestamp may have: when it was received.
        let message = json!({"originalTimestamp": "0000-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"});
        assert_eq!(event_time(message.as_object().unwrap(), sdk), Some(received));
        // The webhook's times are RudderStack's, already corrected.
        let message = json!({"originalTimestamp": "2026-01-01T11:00:00Z", "sentAt": "2026-01-01T11:00:05Z"});
        assert_eq!(event_time(message.as_object().unwrap(), Origin::Webhook), Some(at("2026-01-01T11:00:00Z")));
    }
}
