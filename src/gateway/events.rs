//! The management endpoints for events: create, batch, get, query and statistics.
//!
//! Create and batch publish to EVENTS and answer once PostgreSQL has the events
//! (read-your-writes), or 202 when that takes longer than the store timeout: the events are
//! safe in JetStream either way. A client sending `Prefer: respond-async` (RFC 7240) gets its
//! 202 as soon as JetStream has acknowledged the events, without waiting for PostgreSQL.
//! Reads go straight to PostgreSQL.
//!
//! Reads HTTP and PostgreSQL; writes `events.>`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::AppState;
use super::admission::Admitted;
use super::error::ApiError;
use super::extract::{self, JsonBody, RawBody};
use crate::domain::fields::object_body;
use crate::domain::parse::{Defaults, MAX_EVENT_TYPE_CHARS};
use crate::domain::typed::{self, TextError};
use crate::domain::{Event, EventCategory, EventSource, EventStatus, FieldError, Fields, MAX_ID_CHARS};
use crate::infra::bus::Stored;
use crate::infra::metrics::PathLabels;
use crate::store::events::{self as stored, StoredEvent};
use crate::store::query::{self, EventFilter};
use crate::store::statistics::{self, Statistics};
use crate::wire::{Outgoing, TraceContext, codec, headers};

/// The ingest paths of [`crate::infra::metrics::PathLabels`] this module publishes on.
const CREATE: &str = "create";
const BATCH: &str = "batch";

/// An accepted event as create and batch answer it.
#[derive(Serialize)]
pub struct EventView<'a> {
    #[serde(flatten)]
    event: &'a Event,
    status: EventStatus,
}

pub async fn create(
    State(state): State<AppState>,
    trace: TraceContext,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    extract::require_content(&body)?;
    let now = Utc::now();
    let mut event = typed::parse_event_text(&body, || Defaults::http(now)).map_err(|error| match error {
        TextError::NotJson(error) => extract::not_json(error),
        TextError::Invalid(errors) => ApiError::Validation(errors),
    })?;
    state.conform(&mut event).map_err(ApiError::SchemaViolation)?;
    let message = state.event_message(&event)?;
    let body = pending_answer(std::slice::from_ref(&event), [&message.payload[..]], false)?;
    if prefers_async(&headers) {
        state.publish_one(CREATE, &trace, message).await?;
        return Ok(accepted_async(body));
    }
    let message = message.with_header(headers::NOTIFY, state.waiters.subject());
    let waiting = state.waiters.register(&[event.event_id]);
    let stored = state.publish_one(CREATE, &trace, message).await?;
    let in_database = waiting.wait(&state.pool, state.store_timeout, stored.duplicate, Some(stored.sequence)).await;
    Ok(answer(in_database, body))
}

pub async fn batch(
    State(state): State<AppState>,
    trace: TraceContext,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    // Each event's text, to be parsed straight into its fields.
    let Ok(items) = serde_json::from_slice::<Vec<&RawValue>>(&body) else {
        extract::parse_json(&body)?;
        return Err(ApiError::field("body", "must be a JSON array of events"));
    };
    if items.len() > state.max_batch_events {
        return Err(ApiError::field(
            "body",
            format!("holds {} events; the limit is {}", items.len(), state.max_batch_events),
        ));
    }
    let now = Utc::now();
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match typed::parse_event_text(item.get().as_bytes(), || Defaults::http(now)) {
            Ok(event) => events.push(event),
            Err(TextError::Invalid(item_errors)) => {
                errors.extend(item_errors.into_iter().map(|error| error.nested(&format!("[{index}]"))))
            }
            // The array's items were read as JSON already.
            Err(TextError::NotJson(error)) => errors.push(FieldError::new(format!("[{index}]"), error.to_string())),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    if events.is_empty() {
        return Ok(Json(Vec::<Value>::new()).into_response());
    }
    let mut first_index = HashMap::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        if let Some(first) = first_index.insert(event.event_id, index) {
            errors.push(FieldError::new(format!("[{index}].event_id"), format!("repeats the event_id of [{first}]")));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    state.conform_all(&mut events)?;
    let respond_async = prefers_async(&headers);
    let mut messages = Vec::with_capacity(events.len());
    for (index, event) in events.iter().enumerate() {
        let message = state.event_message(event).map_err(|error| match error {
            ApiError::EventTooLarge(detail) => ApiError::EventTooLarge(format!("[{index}]: {detail}")),
            other => other,
        })?;
        let message =
            if respond_async { message } else { message.with_header(headers::NOTIFY, state.waiters.subject()) };
        messages.push((event.event_id, message));
    }
    let body = pending_answer(&events, messages.iter().map(|(_, message)| &message.payload[..]), true)?;
    if respond_async {
        publish_new(&state, BATCH, &trace, messages).await?;
        return Ok(accepted_async(body));
    }
    let ids: Vec<Uuid> = events.iter().map(|event| event.event_id).collect();
    let waiting = state.waiters.register(&ids);
    let published = publish_new(&state, BATCH, &trace, messages).await?;
    let in_database = waiting.wait(&state.pool, state.store_timeout, published.seen_before, published.through).await;
    Ok(answer(in_database, body))
}

/// True when the request says `Prefer: respond-async`: answer once JetStream has the events.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|value| value.to_str().ok()).any(|value| {
        value.split(',').any(|preference| {
            let name = preference.split(';').next().unwrap_or_default().trim();
            name.eq_ignore_ascii_case("respond-async")
        })
    })
}

/// The answer to create (`many` false: one object) or batch (an array): every accepted event
/// with `"status":"pending"`, as [`EventView`] serializes it.
///
/// Spliced from the events' EVENTS payloads, which are the events' JSON objects, instead of
/// serializing every event a second time: the payload's closing brace becomes the status
/// field. Should a payload not end in one, the events are serialized again.
fn pending_answer<'a>(
    events: &[Event],
    payloads: impl IntoIterator<Item = &'a [u8]>,
    many: bool,
) -> Result<Vec<u8>, ApiError> {
    const STATUS: &[u8] = br#","status":"pending"}"#;
    let mut body = Vec::new();
    if many {
        body.push(b'[');
    }
    for (index, payload) in payloads.into_iter().enumerate() {
        let Some((b'}', fields)) = payload.split_last() else {
            return serialized_answer(events, many);
        };
        if index > 0 {
            body.push(b',');
        }
        body.reserve(fields.len() + STATUS.len() + 1);
        body.extend_from_slice(fields);
        body.extend_from_slice(STATUS);
    }
    if many {
        body.push(b']');
    }
    Ok(body)
}

/// [`pending_answer`] the slow way: every event serialized as an [`EventView`].
fn serialized_answer(events: &[Event], many: bool) -> Result<Vec<u8>, ApiError> {
    let views: Vec<EventView> = events.iter().map(|event| EventView { event, status: EventStatus::Pending }).collect();
    let serialized = match views.first() {
        Some(view) if !many => serde_json::to_vec(view),
        _ => serde_json::to_vec(&views),
    };
    serialized.map_err(|error| ApiError::Internal(error.into()))
}

/// A JSON answer from bytes already serialized.
fn json_answer(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// 202 with `Preference-Applied: respond-async`: in JetStream, stored shortly.
fn accepted_async(body: Vec<u8>) -> Response {
    let mut response = json_answer(StatusCode::ACCEPTED, body);
    response.headers_mut().insert("preference-applied", HeaderValue::from_static("respond-async"));
    response
}

/// What [`publish_new`] did.
pub(super) struct Published {
    /// Some events had been accepted before (nobody will announce those as stored).
    pub seen_before: bool,
    /// The EVENTS sequence of the last event published now; none when nothing was.
    pub through: Option<u64>,
}

/// Publishes a batch atomically, leaving out the events that are already stored.
///
/// A client that retries a batch (its answer was lost, say) sends event ids JetStream has
/// seen, and JetStream refuses an atomic batch holding any id it has already stored. The ids
/// PostgreSQL has are then dropped and the rest published again, as one batch still; ids that
/// are in JetStream but not yet in PostgreSQL are waited for, up to the store timeout.
pub(super) async fn publish_new(
    state: &AppState,
    path: &'static str,
    trace: &TraceContext,
    messages: Vec<(Uuid, Outgoing)>,
) -> Result<Published, ApiError> {
    let _admitted = state.admit(path, messages.len()).await?;
    let mut messages: Vec<_> = messages.into_iter().map(|(id, message)| (id, message.with_trace(trace))).collect();
    let deadline = tokio::time::Instant::now() + state.store_timeout;
    let mut seen_before = false;
    loop {
        let batch = messages.iter().map(|(_, message)| message.clone()).collect();
        let error = match state.bus.publish_atomic(batch).await {
            Ok(stored) => {
                state.bus.metrics().accepted(path, messages.len());
                return Ok(Published { seen_before, through: Some(stored.last_sequence) });
            }
            Err(error) if error.is_duplicate_in_batch() => error,
            Err(error) => {
                return Err(ApiError::publish_failed(error, || messages.iter().map(|(id, _)| *id).collect()));
            }
        };
        seen_before = true;
        let ids: Vec<Uuid> = messages.iter().map(|(id, _)| *id).collect();
        let stored = stored::stored_ids(&state.pool, &ids).await?;
        messages.retain(|(id, _)| !stored.contains(id));
        if messages.is_empty() {
            return Ok(Published { seen_before, through: None });
        }
        if stored.is_empty() && tokio::time::Instant::now() >= deadline {
            tracing::warn!(%error, "batch holds event ids JetStream has but PostgreSQL does not have yet");
            return Err(ApiError::Conflict {
                code: "duplicate_event_id",
                detail: "Some events of this batch were accepted before and are not stored yet; nothing new was \
                         accepted. Retry the same batch later."
                    .to_owned(),
            });
        }
        if stored.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn answer(in_database: bool, body: Vec<u8>) -> Response {
    let status = if in_database { StatusCode::OK } else { StatusCode::ACCEPTED };
    json_answer(status, body)
}

impl AppState {
    /// Publishes one event's message and counts it accepted through `path` (unless JetStream
    /// had it already).
    pub(super) async fn publish_one(
        &self,
        path: &'static str,
        trace: &TraceContext,
        message: Outgoing,
    ) -> Result<Stored, ApiError> {
        let _admitted = self.admit(path, 1).await?;
        let event_id = message.event_id();
        let stored = self
            .bus
            .publish(message.with_trace(trace))
            .await
            .map_err(|error| ApiError::publish_failed(error, || event_id.into_iter().collect()))?;
        if !stored.duplicate {
            self.bus.metrics().accepted(path, 1);
        }
        Ok(stored)
    }

    /// Room for `events` events in flight, or 503 `overloaded` (counted) after a short wait.
    pub(super) async fn admit(&self, path: &'static str, events: usize) -> Result<Admitted, ApiError> {
        let admitted = self.admission.admit(path, events).await;
        if admitted.is_err() {
            self.bus.metrics().overloaded.get_or_create(&PathLabels { path }).inc();
        }
        admitted
    }

    /// The EVENTS message of an event, refused when it is larger than an event may be.
    pub(super) fn event_message(&self, event: &Event) -> Result<Outgoing, ApiError> {
        let message = codec::encode(event).map_err(|error| ApiError::Internal(error.into()))?;
        if message.payload.len() > self.max_event_bytes {
            return Err(ApiError::EventTooLarge(format!(
                "the event is {} bytes once encoded; the limit is {}",
                message.payload.len(),
                self.max_event_bytes
            )));
        }
        Ok(message)
    }
}

pub async fn get_event(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> Result<Json<StoredEvent>, ApiError> {
    let event_id = Uuid::parse_str(&event_id).map_err(|_| ApiError::NotFound("Event"))?;
    stored::get_event(&state.pool, event_id).await?.map(Json).ok_or(ApiError::NotFound("Event"))
}

#[derive(Serialize)]
pub struct QueryAnswer {
    events: Vec<StoredEvent>,
    total: i64,
    /// False when `total` is a lower bound: the filter matches more events than were counted.
    total_exact: bool,
    limit: i64,
    offset: i64,
    has_more: bool,
}

pub async fn query(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<QueryAnswer>, ApiError> {
    let filter = parse_filter(&body).map_err(ApiError::Validation)?;
    let (events, total) = query::query_events(&state.pool, &filter).await?;
    let has_more = filter.offset + (events.len() as i64) < total.count;
    Ok(Json(QueryAnswer {
        events,
        total: total.count,
        total_exact: total.exact,
        limit: filter.limit,
        offset: filter.offset,
        has_more,
    }))
}

/// Validates the body of `POST /api/v1/events/query`.
pub fn parse_filter(body: &Value) -> Result<EventFilter, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let mut filter = EventFilter {
        user_id: fields.string("user_id", MAX_ID_CHARS),
        event_type: fields.string("event_type", MAX_EVENT_TYPE_CHARS),
        event_source: fields.enumerated("event_source", EventSource::parse, EventSource::expected),
        event_category: fields.enumerated("event_category", EventCategory::parse, EventCategory::expected),
        status: fields.enumerated("status", EventStatus::parse, EventStatus::expected),
        start_time: fields.timestamp("start_time"),
        end_time: fields.timestamp("end_time"),
        data: None,
        limit: 100,
        offset: 0,
    };
    match fields.get("data") {
        None => {}
        Some(Value::Object(data)) => filter.data = Some(Value::Object(data.clone())),
        Some(_) => fields.fail("data", "must be a JSON object (matched by containment)"),
    }
    filter.limit = fields.integer("limit", 1..=1000).unwrap_or(100);
    filter.offset = fields.integer("offset", 0..=i64::MAX).unwrap_or(0);
    if let (Some(start), Some(end)) = (filter.start_time, filter.end_time)
        && end < start
    {
        fields.fail("end_time", "must not be before start_time");
    }
    if errors.is_empty() { Ok(filter) } else { Err(errors) }
}

#[derive(Deserialize)]
pub struct StatisticsParams {
    user_id: Option<String>,
}

pub async fn statistics(
    State(state): State<AppState>,
    Query(params): Query<StatisticsParams>,
) -> Result<Json<Statistics>, ApiError> {
    let user_id = params.user_id.filter(|user| !user.is_empty());
    Ok(Json(statistics::statistics(&state.pool, user_id.as_deref(), Utc::now()).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("prefer", HeaderValue::from_str(value).expect("test header"));
        }
        headers
    }

    fn events() -> Vec<Event> {
        let now = Utc::now();
        let bodies = [
            serde_json::json!({"event_type": "order.placé", "user_id": "u\"1", "data": {"total": 5, "b": [1, "x"]}}),
            serde_json::json!({"event_type": "a", "entity_type": "order", "entity_id": "o-1", "metadata": {"k": null}}),
        ];
        bodies.into_iter().map(|body| crate::domain::parse::parse_event(body, &Defaults::http(now)).unwrap()).collect()
    }

    #[test]
    fn the_answer_spliced_from_the_payloads_is_the_serialized_answer() {
        let events = events();
        let payloads: Vec<Vec<u8>> = events.iter().map(|event| serde_json::to_vec(event).unwrap()).collect();
        let spliced = pending_answer(&events, payloads.iter().map(Vec::as_slice), true).unwrap();
        assert_eq!(spliced, serialized_answer(&events, true).unwrap());
        let views: Vec<Value> = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(views.len(), 2);
        assert_eq!(views[0]["status"], "pending");
        assert_eq!(views[1]["stream_id"], "order:o-1");

        let one = pending_answer(&events[..1], [payloads[0].as_slice()], false).unwrap();
        assert_eq!(one, serialized_answer(&events[..1], false).unwrap());
        assert_eq!(serde_json::from_slice::<Value>(&one).unwrap(), views[0]);
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_serialized_again() {
        let events = events();
        let answer = pending_answer(&events, [&b"{}"[..], &b"[]"[..]], true).unwrap();
        assert_eq!(answer, serialized_answer(&events, true).unwrap());
    }

    #[test]
    fn respond_async_is_found_among_other_preferences() {
        assert!(prefers_async(&prefer(&["respond-async"])));
        assert!(prefers_async(&prefer(&["return=minimal, Respond-Async; wait=0"])));
        assert!(prefers_async(&prefer(&["return=minimal", "respond-async"])));
        assert!(!prefers_async(&prefer(&["return=minimal"])));
        assert!(!prefers_async(&prefer(&["respond-asynchronously"])));
        assert!(!prefers_async(&HeaderMap::new()));
    }
}
