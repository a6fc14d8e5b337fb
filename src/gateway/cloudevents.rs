//! `POST /api/v1/events/cloudevents`: CloudEvents 1.0 over the HTTP protocol binding, in
//! structured mode (`application/cloudevents+json`), binary mode (`ce-*` headers, the body is
//! the data) and batched mode (`application/cloudevents-batch+json`).
//!
//! Reads HTTP; writes `events.>`. Guarantees: `id`, `source`, `specversion` (1.0) and `type`
//! are required, and a request missing any gets a 422 naming each; `source` + `id` give a
//! stable event id, so a producer resending an event stores it once; a batch is validated
//! whole and published all or nothing, as `POST /api/v1/events/batch` is. The answer (200)
//! comes once JetStream has the events.
//!
//! Mapping: `type` is the event type, `time` the timestamp, `data` the data (an object as it
//! is; any other JSON value as `{"value": ...}`; `data_base64` or a non-JSON binary body as
//! `{"data_base64": ...}`); `subject`, `datacontenttype`, `dataschema`, `id`, `source` and
//! every extension attribute are kept in metadata as `ce_{name}`. Source `external_api`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::{RawBody, parse_json};
use crate::domain::parse::{self, Defaults};
use crate::domain::{Event, EventSource, FieldError, event_id_from_key};
use crate::wire::TraceContext;

const STRUCTURED: &str = "application/cloudevents+json";
const BATCHED: &str = "application/cloudevents-batch+json";
/// Attributes with a place of their own in the event (the others go to metadata).
const MAPPED: [&str; 4] = ["type", "time", "data", "data_base64"];

#[derive(Serialize)]
pub struct Accepted {
    status: &'static str,
    event_ids: Vec<Uuid>,
}

pub async fn ingest(
    State(state): State<AppState>,
    trace: TraceContext,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Accepted>, ApiError> {
    let media_type = media_type(&headers);
    let attributes: Vec<Map<String, Value>> = match media_type.as_str() {
        BATCHED => match parse_json(&body)? {
            Value::Array(items) => items.into_iter().map(as_object).collect::<Result<_, _>>()?,
            _ => return Err(ApiError::field("body", "must be a JSON array of CloudEvents")),
        },
        STRUCTURED => vec![as_object(parse_json(&body)?)?],
        _ => vec![binary(&headers, &media_type, &body)],
    };
    if attributes.len() > state.max_batch_events {
        let detail = format!("holds {} events; the limit is {}", attributes.len(), state.max_batch_events);
        return Err(ApiError::field("body", detail));
    }
    let now = Utc::now();
    let mut events = Vec::with_capacity(attributes.len());
    let mut errors = Vec::new();
    let batched = media_type == BATCHED;
    for (index, attributes) in attributes.into_iter().enumerate() {
        match to_event(attributes, now) {
            Ok(event) => events.push(event),
            Err(found) if batched => errors.extend(found.into_iter().map(|e| e.nested(&format!("[{index}]")))),
            Err(found) => errors.extend(found),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    state.conform_all(&mut events)?;
    let mut messages = Vec::with_capacity(events.len());
    for event in &events {
        messages.push((event.event_id, state.event_message(event)?));
    }
    let event_ids = messages.iter().map(|(id, _)| *id).collect();
    super::events::publish_new(&state, "cloudevents", &trace, messages).await?;
    Ok(Json(Accepted { status: "accepted", event_ids }))
}

/// The request's media type, lower case, without parameters.
fn media_type(headers: &HeaderMap) -> String {
    let value = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

fn as_object(value: Value) -> Result<Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::field("body", "a CloudEvent must be a JSON object")),
    }
}

/// A binary-mode event: attributes from the `ce-*` headers (percent-decoded), the body as
/// the data, its content type as `datacontenttype`.
fn binary(headers: &HeaderMap, media_type: &str, body: &[u8]) -> Map<String, Value> {
    let mut attributes = Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else { continue };
        if let Ok(text) = value.to_str() {
            attributes.insert(attribute.to_owned(), Value::String(percent_decoded(text)));
        }
    }
    if !media_type.is_empty() {
        attributes.insert("datacontenttype".into(), Value::String(media_type.to_owned()));
    }
    if !body.is_empty() {
        let json = media_type == "application/json" || media_type.ends_with("+json");
        let data = match serde_json::from_slice::<Value>(body) {
            Ok(value) if json || media_type.is_empty() => value,
            _ => match std::str::from_utf8(body) {
                Ok(text) if media_type.starts_with("text/") => Value::String(text.to_owned()),
                _ => {
                    attributes.insert("data_base64".into(), Value::String(BASE64.encode(body)));
                    return attributes;
                }
            },
        };
        attributes.insert("data".into(), data);
    }
    attributes
}

/// `%XX` escapes, as the HTTP binding writes non-ASCII header values.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes.get(index + 1..index + 3).and_then(|pair| std::str::from_utf8(pair).ok());
        match (bytes[index], hex.and_then(|pair| u8::from_str_radix(pair, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

/// One CloudEvent as an event, or every required attribute it lacks.
fn to_event(mut attributes: Map<String, Value>, now: chrono::DateTime<Utc>) -> Result<Event, Vec<FieldError>> {
    let text = |attributes: &Map<String, Value>, name: &str| {
        attributes.get(name).and_then(Value::as_str).filter(|text| !text.is_empty()).map(str::to_owned)
    };
    let mut errors = Vec::new();
    for name in ["id", "source", "specversion", "type"] {
        if text(&attributes, name).is_none() {
            errors.push(FieldError::new(name, "is required (a non-empty string)"));
        }
    }
    if let Some(version) = text(&attributes, "specversion").filter(|version| version != "1.0") {
        errors.push(FieldError::new("specversion", format!("must be 1.0, not {version}")));
    }
    let (Some(id), Some(source), Some(event_type)) =
        (text(&attributes, "id"), text(&attributes, "source"), text(&attributes, "type"))
    else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let data = match (attributes.remove("data"), attributes.remove("data_base64")) {
        (Some(Value::Object(data)), _) => Value::Object(data),
        (Some(Value::Null) | None, Some(encoded)) => json!({"data_base64": encoded}),
        (Some(Value::Null) | None, None) => json!({}),
        (Some(other), _) => json!({"value": other}),
    };
    let mut metadata = Map::new();
    for (name, value) in &attributes {
        if !MAPPED.contains(&name.as_str()) {
            metadata.insert(format!("ce_{name}"), value.clone());
        }
    }
    let request = json!({
        "event_id": event_id_from_key("cloudevents", &format!("{source}\u{1f}{id}")),
        "event_type": event_type,
        "event_source": EventSource::ExternalApi.as_str(),
        "data": data,
        "metadata": metadata,
        "timestamp": attributes.get("time"),
    });
    parse::parse_event(request, &Defaults::http(now)).map_err(|errors| {
        errors
            .into_iter()
            .map(|error| if error.field == "event_type" { FieldError { field: "type".into(), ..error } } else { error })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn required_attributes_are_named() {
        let errors = to_event(object(json!({"specversion": "0.3", "data": {}})), Utc::now()).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        assert_eq!(fields, ["id", "source", "type", "specversion"]);
    }

    #[test]
    fn attributes_map_onto_the_event() {
        let event = to_event(
            object(
                json!({"specversion": "1.0", "id": "a-1", "source": "/shop/orders", "type": "com.shop.order.placed",
                          "subject": "order-7", "time": "2026-01-02T03:04:05Z", "tenant": "eu",
                          "data": {"total": 3}}),
            ),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(event.event_type, "com.shop.order.placed");
        assert_eq!(event.event_source, EventSource::ExternalApi);
        assert_eq!(event.data["total"], 3);
        assert_eq!(event.metadata["ce_subject"], "order-7");
        assert_eq!(event.metadata["ce_tenant"], "eu");
        assert_eq!(event.metadata["ce_source"], "/shop/orders");
        assert_eq!(event.timestamp.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let again = to_event(
            object(json!({"specversion": "1.0", "id": "a-1", "source": "/shop/orders", "type": "other"})),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(event.event_id, again.event_id, "source + id name the event");
        let scalar = to_event(
            object(json!({"specversion": "1.0", "id": "b", "source": "s", "type": "t", "data": [1, 2]})),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(Value::Object(scalar.data), json!({"value": [1, 2]}));
    }

    #[test]
    fn binary_mode_reads_headers_and_the_body() {
        let mut headers = HeaderMap::new();
        for (name, value) in [("ce-id", "x-1"), ("ce-source", "/s"), ("ce-specversion", "1.0"), ("ce-type", "t.%C3%A9")]
        {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let attributes = binary(&headers, "application/json", br#"{"a": 1}"#);
        assert_eq!(attributes["type"], "t.é");
        assert_eq!(attributes["data"], json!({"a": 1}));
        let opaque = binary(&headers, "application/octet-stream", &[0xff, 0x00]);
        assert_eq!(opaque["data_base64"], "/wA=");
        assert_eq!(percent_decoded("100%"), "100%");
    }
}
