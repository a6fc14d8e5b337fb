//! `POST /webhooks/rudderstack`: RudderStack's webhook destination.
//!
//! Reads HTTP; writes `events.>`. Checks `X-Signature` when a secret is configured (hex HMAC-SHA256 of the raw body,
//! optionally `sha256=`-prefixed, or the secret itself, since RudderStack's webhook
//! destination can only send static headers), maps each RudderStack event to an event (the
//! tracking API's mapping, [`super::tracking::mapping`]), publishes the valid ones and answers
//! on PubAck, listing the invalid ones. The `messageId` becomes the event id, so RudderStack's
//! retries are stored once.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::{RawBody, parse_json};
use super::sorted::{Rejected, Sorted};
use super::tracking::mapping::{self, Origin};
use crate::domain::EventSource;
use crate::domain::parse::{self, Defaults};
use crate::wire::TraceContext;

#[derive(Serialize)]
pub struct Accepted {
    status: &'static str,
    message: String,
    event_ids: Vec<Uuid>,
    /// Items that were not accepted, with their errors (the others are stored).
    rejected: Vec<Rejected>,
}

pub async fn webhook(
    State(state): State<AppState>,
    trace: TraceContext,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Accepted>, ApiError> {
    if let Some(secret) = &state.rudderstack_secret {
        let signature = headers.get("x-signature").and_then(|value| value.to_str().ok()).unwrap_or("");
        if !signature_matches(secret.expose(), signature, &body) {
            return Err(ApiError::BadSignature);
        }
    }
    let items = items(parse_json(&body)?)?;
    let now = Utc::now();
    let defaults = Defaults { event_source: EventSource::Frontend, ..Defaults::http(now) };
    let mut sorted = Sorted::default();
    for (index, item) in items.iter().enumerate() {
        let event = mapping::to_request(item, None, Origin::Webhook)
            .and_then(|request| parse::parse_event(request, &defaults))
            .and_then(|event| state.item_message(event));
        sorted.push(index, event);
    }
    // RudderStack does not retry a 4xx: one bad item must not cost the others.
    if let Some(errors) = sorted.nothing_accepted() {
        return Err(ApiError::Validation(errors));
    }
    let (event_ids, rejected) = sorted.publish(&state, "rudderstack", &trace).await?;
    let message = format!("{} accepted, {} rejected", super::events(event_ids.len()), rejected.len());
    Ok(Json(Accepted { status: "accepted", message, event_ids, rejected }))
}

/// The events of a payload: one event, an array of them, or a `{"batch": [...]}` envelope.
fn items(payload: Value) -> Result<Vec<Value>, ApiError> {
    match payload {
        Value::Array(items) => Ok(items),
        Value::Object(mut envelope) if envelope.get("batch").is_some_and(Value::is_array) => {
            match envelope.remove("batch") {
                Some(Value::Array(items)) => Ok(items),
                _ => Ok(Vec::new()),
            }
        }
        Value::Object(_) => Ok(vec![payload]),
        _ => Err(ApiError::BadRequest(
            "expected a RudderStack event object, an array of them, or {\"batch\": [...]}".into(),
        )),
    }
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
}
