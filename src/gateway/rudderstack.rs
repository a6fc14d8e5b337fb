//! `POST /webhooks/rudderstack`: RudderStack's webhook destination.
//!
//! Reads HTTP; writes `events.>`. Checks `X-Signature` when a secret is configured (hex HMAC-SHA256 of the raw body,
//! optionally `sha256=`-prefixed, or the secret itself, since RudderStack's webhook
//! destination can only send static headers), maps each RudderStack event to an event,
//! publishes them and answers on PubAck. The `messageId` becomes the event id, so RudderStack's
//! retries are stored once.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::{RawBody, parse_json};
use crate::domain::parse::{self, Defaults};
use crate::domain::{EventCategory, EventSource, FieldError, event_id_from_key};

#[derive(Serialize)]
pub struct Accepted {
    status: &'static str,
    message: String,
    event_ids: Vec<Uuid>,
}

pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Accepted>, ApiError> {
    if let Some(secret) = &state.rudderstack_secret {
        let signature = headers.get("x-signature").and_then(|value| value.to_str().ok()).unwrap_or("");
        if !signature_matches(secret.expose(), signature, &body) {
            return Err(ApiError::BadSignature);
        }
    }
    let payload = parse_json(&body)?;
    let items = match payload {
        Value::Array(items) => items,
        Value::Object(_) => vec![payload],
        _ => return Err(ApiError::BadRequest("expected a RudderStack event object or an array of them".into())),
    };
    let now = Utc::now();
    let mut messages = Vec::with_capacity(items.len());
    let mut event_ids = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let prefix = format!("[{index}]");
        let event = map_event(item).and_then(|request| {
            let defaults = Defaults { event_source: EventSource::Frontend, ..Defaults::http(now) };
            parse::parse_event(request, &defaults)
        });
        match event.and_then(|event| {
            state.event_message(&event).map(|message| (message, event.event_id)).map_err(|error| match error {
                ApiError::Validation(errors) => errors,
                other => vec![FieldError::new("", other.to_string())],
            })
        }) {
            Ok((message, event_id)) => {
                messages.push(message);
                event_ids.push(event_id);
            }
            Err(item_errors) => errors.extend(item_errors.into_iter().map(|error| error.nested(&prefix))),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    for result in state.bus.publish_all(messages).await {
        result?;
    }
    let message = format!("{} accepted", super::events(event_ids.len()));
    Ok(Json(Accepted { status: "accepted", message, event_ids }))
}

/// `X-Signature` is the hex HMAC-SHA256 of the raw body (`sha256=` prefix optional) or the
/// secret itself. Both comparisons take constant time.
pub fn signature_matches(secret: &str, signature: &str, body: &[u8]) -> bool {
    let signature = signature.trim();
    if bool::from(signature.as_bytes().ct_eq(secret.as_bytes())) {
        return true;
    }
    let hex_part = signature.strip_prefix("sha256=").unwrap_or(signature);
    let Ok(expected) = hex::decode(hex_part) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Maps one RudderStack event to a create request.
fn map_event(item: &Value) -> Result<Value, Vec<FieldError>> {
    let Some(event) = item.as_object() else {
        return Err(vec![FieldError::new("", "must be a JSON object")]);
    };
    let text = |name: &str| event.get(name).and_then(as_id);
    let kind = text("type").unwrap_or_else(|| "track".to_owned()).to_ascii_lowercase();
    let event_type = match kind.as_str() {
        "track" => text("event"),
        "page" | "screen" => text("name").or_else(|| text("event")).or_else(|| Some(kind.clone())),
        _ => text("event").or_else(|| Some(kind.clone())),
    };
    let Some(event_type) = event_type else {
        return Err(vec![FieldError::new("event", "is required for track events")]);
    };
    let lowered = event_type.to_lowercase();
    let category = match kind.as_str() {
        "page" | "screen" => EventCategory::PageView,
        "track" if lowered.contains("form") => EventCategory::FormSubmit,
        "track" if lowered.contains("click") => EventCategory::Click,
        _ => EventCategory::UserAction,
    };
    let mut data = Map::new();
    for name in ["properties", "traits"] {
        if let Some(Value::Object(values)) = event.get(name) {
            data.extend(values.clone());
        }
    }
    let mut metadata = Map::new();
    metadata.insert("rudderstack_type".into(), Value::String(kind.clone()));
    for name in ["messageId", "anonymousId", "sentAt", "receivedAt", "originalTimestamp", "channel"] {
        if let Some(value) = event.get(name).filter(|value| !value.is_null()) {
            metadata.insert(name.into(), value.clone());
        }
    }
    let context = event.get("context").filter(|value| value.is_object()).cloned().unwrap_or_else(|| json!({}));
    let session_id = context.get("sessionId").and_then(as_id);
    let event_id = text("messageId").map(|message_id| event_id_from_key("rudderstack", &message_id));
    let timestamp = ["timestamp", "originalTimestamp", "sentAt"].iter().find_map(|name| {
        event.get(*name).and_then(Value::as_str).filter(|text| parse::parse_timestamp(text).is_some())
    });
    Ok(json!({
        "event_id": event_id,
        "event_type": event_type,
        "event_category": category.as_str(),
        "user_id": text("userId").or_else(|| text("anonymousId")),
        "session_id": session_id,
        "data": data,
        "metadata": metadata,
        "context": context,
        "timestamp": timestamp,
    }))
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

    #[test]
    fn signatures() {
        let body = br#"{"type":"track"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = hex::encode(mac.finalize().into_bytes());
        assert!(signature_matches("s3cret", &good, body));
        assert!(signature_matches("s3cret", &format!("sha256={good}"), body));
        assert!(signature_matches("s3cret", "s3cret", body));
        assert!(!signature_matches("s3cret", &good, b"{}"));
        assert!(!signature_matches("s3cret", "", body));
        assert!(!signature_matches("s3cret", "zz", body));
    }

    #[test]
    fn mapping() {
        let request = map_event(&json!({
            "type": "track", "event": "Signup Form Submitted", "anonymousId": "anon-1",
            "messageId": "m-1", "properties": {"plan": "pro"}, "context": {"ip": "1.2.3.4"}
        }))
        .unwrap();
        assert_eq!(request["event_category"], "form_submit");
        assert_eq!(request["user_id"], "anon-1");
        assert_eq!(request["data"]["plan"], "pro");
        assert_eq!(request["metadata"]["messageId"], "m-1");
        assert_eq!(request["event_id"], json!(event_id_from_key("rudderstack", "m-1")));

        let page = map_event(&json!({"type": "page", "name": "Home", "userId": 42})).unwrap();
        assert_eq!((page["event_type"].as_str(), page["event_category"].as_str()), (Some("Home"), Some("page_view")));
        assert_eq!(page["user_id"], "42");
        let identify = map_event(&json!({"type": "identify", "userId": "u", "traits": {"email": "a@b"}})).unwrap();
        assert_eq!(identify["event_type"], "identify");
        assert_eq!(identify["data"]["email"], "a@b");
        let click = map_event(&json!({"type": "track", "event": "Button Clicked"})).unwrap();
        assert_eq!(click["event_category"], "click");
        assert!(map_event(&json!({"type": "track"})).is_err());
    }
}
