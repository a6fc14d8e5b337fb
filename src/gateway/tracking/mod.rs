//! The tracking API that Segment and RudderStack SDKs send to: `POST /v1/track`, `/v1/identify`,
//! `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`, `/v1/batch` and `/beacon/v1/batch`, so
//! a product already instrumented with either uses this service as its data plane unchanged.
//!
//! Reads HTTP; writes `events.>`. Guarantees, as the SDKs expect them:
//! - Success is exactly 200, once JetStream has every accepted event (anything else makes an
//!   SDK retry, and a retry lands once: `messageId` gives the event id).
//! - A write key (`EVENT_WRITE_KEYS`) is taken from Basic auth (the key as user name), from
//!   `writeKey` in the body, or from `?writeKey=` (the beacon cannot send headers); a wrong or
//!   missing one is a 401 while keys are configured.
//! - In a batch, an invalid item is reported by index and the others are stored; a batch with
//!   nothing valid is a 400 (SDKs do not retry it). A message over `EVENT_TRACKING_MAX_EVENT_BYTES`
//!   is such an invalid item; a body over `EVENT_TRACKING_MAX_BATCH_BYTES` is a 413.

pub mod mapping;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::{RawBody, parse_json};
use super::sorted::{Rejected, Sorted};
use crate::domain::FieldError;
use crate::domain::parse::{self, Defaults};
use crate::wire::TraceContext;
use mapping::Origin;

/// The message types `/v1/{type}` takes.
const KINDS: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// `?writeKey=`, for callers that cannot send headers (`navigator.sendBeacon`).
#[derive(Deserialize)]
pub struct KeyParam {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// What the SDKs get back (they only look at the status).
#[derive(Serialize)]
pub struct Answer {
    success: bool,
    accepted: usize,
    event_ids: Vec<Uuid>,
    rejected: Vec<Rejected>,
}

/// `POST /v1/{type}`: one message.
pub async fn message(
    State(state): State<AppState>,
    trace: TraceContext,
    Path(kind): Path<String>,
    headers: HeaderMap,
    Query(key): Query<KeyParam>,
    RawBody(body): RawBody,
) -> Result<Json<Answer>, ApiError> {
    if !KINDS.contains(&kind.as_str()) {
        return Err(ApiError::NotFound("Endpoint"));
    }
    let message = parse_json(&body).map_err(invalid)?;
    check_key(&state, &headers, key.write_key.as_deref(), message.get("writeKey"))?;
    ingest(&state, &trace, vec![message], Some(&kind)).await
}

/// `POST /v1/batch` and `/beacon/v1/batch`: `{batch, context, integrations, sentAt, writeKey}`,
/// the envelope's `context`, `integrations` and `sentAt` merged into each message.
pub async fn batch(
    State(state): State<AppState>,
    trace: TraceContext,
    headers: HeaderMap,
    Query(key): Query<KeyParam>,
    RawBody(body): RawBody,
) -> Result<Json<Answer>, ApiError> {
    let Value::Object(mut envelope) = parse_json(&body).map_err(invalid)? else {
        return Err(ApiError::InvalidMessage(vec![FieldError::new("body", "must be an object: {\"batch\": [...]}")]));
    };
    check_key(&state, &headers, key.write_key.as_deref(), envelope.get("writeKey"))?;
    let Some(Value::Array(items)) = envelope.remove("batch") else {
        return Err(ApiError::InvalidMessage(vec![FieldError::new("batch", "is required: an array of messages")]));
    };
    let items = items.into_iter().map(|item| merged(item, &envelope)).collect();
    ingest(&state, &trace, items, None).await
}

/// Maps, validates and publishes messages; answers 200 unless nothing could be accepted.
async fn ingest(
    state: &AppState,
    trace: &TraceContext,
    messages: Vec<Value>,
    kind: Option<&str>,
) -> Result<Json<Answer>, ApiError> {
    let received_at = Utc::now();
    let origin = Origin::Sdk { received_at };
    let defaults = Defaults::http(received_at);
    let limit = state.tracking_max_event_bytes;
    let mut sorted = Sorted::default();
    for (index, message) in messages.iter().enumerate() {
        let item = within_limit(message, limit)
            .and_then(|()| mapping::to_request(message, kind, origin))
            .and_then(|request| parse::parse_event(request, &defaults))
            .and_then(|event| state.item_message(event));
        sorted.push(index, item);
    }
    if let Some(errors) = sorted.nothing_accepted() {
        return Err(ApiError::InvalidMessage(errors));
    }
    let (event_ids, rejected) = sorted.publish(state, "tracking", trace).await?;
    Ok(Json(Answer { success: true, accepted: event_ids.len(), event_ids, rejected }))
}

/// A message larger than an event may be is refused on its own.
fn within_limit(message: &Value, limit: usize) -> Result<(), Vec<FieldError>> {
    let size = serde_json::to_vec(message).map_or(usize::MAX, |bytes| bytes.len());
    if size > limit {
        return Err(vec![FieldError::new("", format!("the message is {size} bytes; the limit is {limit}"))]);
    }
    Ok(())
}

/// A batch message with the envelope's `context` and `integrations` under its own (its own
/// keys win) and the envelope's `sentAt` when it has none.
fn merged(message: Value, envelope: &Map<String, Value>) -> Value {
    let Value::Object(mut message) = message else { return message };
    for name in ["context", "integrations"] {
        if let Some(Value::Object(shared)) = envelope.get(name) {
            let mut combined = shared.clone();
            if let Some(Value::Object(own)) = message.remove(name) {
                combined.extend(own);
            }
            message.insert(name.to_owned(), Value::Object(combined));
        }
    }
    if let (None, Some(sent_at)) = (message.get("sentAt"), envelope.get("sentAt")) {
        message.insert("sentAt".to_owned(), sent_at.clone());
    }
    Value::Object(message)
}

/// A malformed body answers 400 here, as the SDKs' own endpoints do.
fn invalid(error: ApiError) -> ApiError {
    match error {
        ApiError::Validation(errors) => ApiError::InvalidMessage(errors),
        other => other,
    }
}

/// Checks the write key when write keys or ingest keys are configured (either is accepted,
/// and admin keys too): Basic auth user name, body `writeKey`, or `?writeKey=`.
fn check_key(state: &AppState, headers: &HeaderMap, query: Option<&str>, body: Option<&Value>) -> Result<(), ApiError> {
    if !state.write_keys.enabled() && !state.keys.ingest.enabled() {
        return Ok(());
    }
    let presented = basic_user(headers)
        .or_else(|| query.map(str::to_owned))
        .or_else(|| body.and_then(Value::as_str).map(str::to_owned));
    match presented {
        Some(key) if state.write_keys.accepts(&key) | state.keys.scope_of(&key).is_some() => Ok(()),
        _ => Err(ApiError::BadWriteKey),
    }
}

/// The user name of `Authorization: Basic base64(user:password)`.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(user, _)| user);
    (!user.is_empty()).then(|| user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    #[test]
    fn the_envelope_fills_in_what_a_message_leaves_out() {
        let envelope = json!({"context": {"app": "shop", "ip": "1.1.1.1"}, "integrations": {"All": true},
                              "sentAt": "2026-01-01T00:00:00Z"});
        let message = merged(json!({"type": "track", "context": {"ip": "2.2.2.2"}}), envelope.as_object().unwrap());
        assert_eq!(message["context"], json!({"app": "shop", "ip": "2.2.2.2"}));
        assert_eq!(message["integrations"], json!({"All": true}));
        assert_eq!(message["sentAt"], "2026-01-01T00:00:00Z");
        let own = merged(json!({"sentAt": "2026-02-02T00:00:00Z"}), envelope.as_object().unwrap());
        assert_eq!(own["sentAt"], "2026-02-02T00:00:00Z");
    }

    #[test]
    fn write_keys_come_as_basic_auth_user_names() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic d2sxOg=="));
        assert_eq!(basic_user(&headers).as_deref(), Some("wk1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer wk1"));
        assert_eq!(basic_user(&headers), None);
        assert!(within_limit(&json!({"a": "x".repeat(100)}), 50).is_err());
        assert!(within_limit(&json!({"a": 1}), 50).is_ok());
    }
}
