//! Public collection endpoints for browsers and apps: one event, or a batch of up to 100.
//!
//! Enriches each event with the client's IP (X-Forwarded-For aware), User-Agent and Referer,
//! publishes it to `events.frontend.{category}.{event_type}` and answers on PubAck, without
//! waiting for PostgreSQL. A batch accepts its valid items and reports the others one by one.
//!
//! Reads HTTP; writes `events.>`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, header};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::sorted::{Rejected, Sorted};
use crate::domain::parse::{self, Defaults};
use crate::domain::{EventCategory, EventSource, FieldError, Fields, MAX_ID_CHARS};
use crate::wire::TraceContext;
use crate::wire::{Outgoing, codec, subjects};

/// Most events in one frontend batch (BR-FE-003).
pub const MAX_FRONTEND_BATCH: usize = 100;
const DEFAULT_CATEGORY: &str = "user_interaction";

/// What the request says about the client.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
}

impl ClientInfo {
    pub fn from_request(headers: &HeaderMap, peer: Option<SocketAddr>) -> Self {
        let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
        let forwarded = text("x-forwarded-for")
            .and_then(|list| list.split(',').next().map(|first| first.trim().to_owned()))
            .filter(|ip| !ip.is_empty());
        Self {
            ip: forwarded.or_else(|| text("x-real-ip")).or_else(|| peer.map(|peer| peer.ip().to_string())),
            user_agent: text(header::USER_AGENT.as_str()),
            referer: text(header::REFERER.as_str()),
        }
    }
}

#[derive(Serialize)]
pub struct Accepted {
    status: &'static str,
    event_id: Uuid,
    message: &'static str,
}

pub async fn collect(
    State(state): State<AppState>,
    trace: TraceContext,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<Accepted>, ApiError> {
    let client = ClientInfo::from_request(&headers, Some(peer));
    let message = frontend_message(&state, &body, &client, &Map::new(), Utc::now()).map_err(ApiError::Validation)?;
    let event_id = message.1;
    state.publish_one("frontend", &trace, message.0).await?;
    Ok(Json(Accepted { status: "accepted", event_id, message: "Event accepted" }))
}

#[derive(Serialize)]
pub struct BatchAccepted {
    status: &'static str,
    processed_count: usize,
    event_ids: Vec<Uuid>,
    rejected: Vec<Rejected>,
    message: String,
}

pub async fn collect_batch(
    State(state): State<AppState>,
    trace: TraceContext,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<BatchAccepted>, ApiError> {
    let Some(events) = body.get("events").and_then(Value::as_array) else {
        return Err(ApiError::field("events", "is required: a JSON array of frontend events"));
    };
    if events.len() > MAX_FRONTEND_BATCH {
        return Err(ApiError::field(
            "events",
            format!("holds {} events; the limit is {MAX_FRONTEND_BATCH}", events.len()),
        ));
    }
    let client_info = match body.get("client_info") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(info)) => info.clone(),
        Some(_) => return Err(ApiError::field("client_info", "must be a JSON object")),
    };
    let client = ClientInfo::from_request(&headers, Some(peer));
    let now = Utc::now();
    let mut sorted = Sorted::default();
    for (index, item) in events.iter().enumerate() {
        sorted.push(index, frontend_message(&state, item, &client, &client_info, now));
    }
    let (event_ids, rejected) = sorted.publish(&state, "frontend", &trace).await?;
    let processed_count = event_ids.len();
    let message = format!("{} accepted, {} rejected", super::events(processed_count), rejected.len());
    Ok(Json(BatchAccepted { status: "accepted", processed_count, event_ids, rejected, message }))
}

/// Validates one frontend event and builds its message.
fn frontend_message(
    state: &AppState,
    body: &Value,
    client: &ClientInfo,
    client_info: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<(Outgoing, Uuid), Vec<FieldError>> {
    let (request, category, mut errors) = frontend_request(body, client, client_info)?;
    let defaults = Defaults { event_source: EventSource::Frontend, ..Defaults::http(now) };
    let mut event = match parse::parse_event(request, &defaults) {
        Ok(event) if errors.is_empty() => event,
        Ok(_) => return Err(errors),
        Err(more) => {
            errors.extend(more);
            return Err(errors);
        }
    };
    state.conform(&mut event)?;
    // The subject keeps the free-text category; the stored one is a known category.
    let subject = subjects::event_subject("frontend", &category, &event.event_type);
    let message = codec::encode_on(subject, &event).map_err(|error| vec![FieldError::new("", error.to_string())])?;
    if message.payload.len() > state.max_event_bytes {
        return Err(vec![FieldError::new(
            "",
            format!("the event is {} bytes; the limit is {}", message.payload.len(), state.max_event_bytes),
        )]);
    }
    Ok((message, event.event_id))
}

/// A frontend event as a create request (source `frontend`, the client's details in
/// metadata), its free-text category, and the errors of the fields only frontend events have.
fn frontend_request(
    body: &Value,
    client: &ClientInfo,
    client_info: &Map<String, Value>,
) -> Result<(Value, String, Vec<FieldError>), Vec<FieldError>> {
    let Some(map) = body.as_object() else {
        return Err(vec![FieldError::new("", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let category = fields.string("category", MAX_ID_CHARS).unwrap_or_else(|| DEFAULT_CATEGORY.to_owned());
    let page_url = fields.string("page_url", 4096);
    let mut metadata = given_metadata(&mut fields, client_info);
    let stored_category = EventCategory::parse(&category);
    if stored_category.is_none() {
        metadata.insert("frontend_category".into(), Value::String(category.clone()));
    }
    for (key, value) in [
        ("client_ip", &client.ip),
        ("user_agent", &client.user_agent),
        ("referer", &client.referer),
        ("page_url", &page_url),
    ] {
        if let Some(value) = value {
            metadata.insert(key.into(), Value::String(value.clone()));
        }
    }
    let request = json!({
        "event_type": map.get("event_type"),
        "event_source": "frontend",
        "event_category": stored_category.unwrap_or(EventCategory::UserAction).as_str(),
        "user_id": map.get("user_id"),
        "session_id": map.get("session_id"),
        "data": map.get("data"),
        "metadata": metadata,
        "timestamp": map.get("timestamp"),
    });
    Ok((request, category, errors))
}

/// The batch's `client_info` (as text) and the event's own `metadata` (strings only).
fn given_metadata(fields: &mut Fields<'_>, client_info: &Map<String, Value>) -> Map<String, Value> {
    let mut metadata: Map<String, Value> =
        client_info.iter().map(|(key, value)| (key.clone(), Value::String(as_text(value)))).collect();
    match fields.body.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(given)) => {
            for (key, value) in given {
                match value {
                    Value::String(_) => {
                        metadata.insert(key.clone(), value.clone());
                    }
                    _ => fields.fail(&format!("metadata.{key}"), "must be a string"),
                }
            }
        }
        Some(_) => fields.fail("metadata", "must be an object of strings"),
    }
    metadata
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[derive(Serialize)]
pub struct FrontendHealth {
    status: &'static str,
    service: &'static str,
    nats_connected: bool,
    timestamp: DateTime<Utc>,
}

pub async fn health(State(state): State<AppState>) -> Json<FrontendHealth> {
    let nats_connected = state.bus.is_connected();
    Json(FrontendHealth {
        status: if nats_connected { "healthy" } else { "degraded" },
        service: "frontend-event-collection",
        nats_connected,
        timestamp: Utc::now(),
    })
}
