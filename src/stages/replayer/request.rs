//! Validation of `POST /api/v1/events/replay`: the request becomes a [`ReplayRequest`], with
//! every field error reported at once.
//!
//! Reads JSON; writes nothing.

use serde_json::Value;
use uuid::Uuid;

use crate::domain::fields::object_body;
use crate::domain::{FieldError, Fields, MAX_ID_CHARS};
use crate::store::replay_jobs::Selector;

const MAX_EVENT_IDS: usize = 10_000;
const MAX_PAGE: i64 = 1000;

/// A validated `POST /api/v1/events/replay`.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub selector: Selector,
    pub target_service: Option<String>,
    pub dry_run: bool,
    pub processors: Option<Vec<String>>,
    /// The page of event ids a dry run shows.
    pub limit: i64,
    pub offset: i64,
    /// Set by a redrive of a processor's dead letter (never by the HTTP request).
    pub dead_letter_seq: Option<u64>,
}

pub fn parse_request(body: &Value) -> Result<ReplayRequest, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let event_ids = event_ids(&mut fields);
    let stream_id = fields.string("stream_id", MAX_ID_CHARS * 2 + 1);
    let start_time = fields.timestamp("start_time");
    let end_time = fields.timestamp("end_time");
    match (fields.present("start_time"), fields.present("end_time")) {
        (true, false) => fields.fail("end_time", "is required with start_time"),
        (false, true) => fields.fail("start_time", "is required with end_time"),
        _ => {}
    }
    if let (Some(start), Some(end)) = (start_time, end_time)
        && end < start
    {
        fields.fail("end_time", "must not be before start_time");
    }
    let target_service = fields.string("target_service", 100);
    if let Some(target) = &target_service
        && (target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        fields.fail("target_service", "must be 1 to 100 letters, digits, '_' or '-'");
    }
    let dry_run = fields.boolean("dry_run").unwrap_or(false);
    let processors = processor_names(&mut fields);
    let limit = fields.integer("limit", 1..=MAX_PAGE).unwrap_or(100);
    let offset = fields.integer("offset", 0..=i64::MAX).unwrap_or(0);
    let selector = Selector { event_ids, stream_id, start_time, end_time };
    if errors.is_empty()
        && selector.event_ids.is_none()
        && selector.stream_id.is_none()
        && selector.start_time.is_none()
    {
        errors.push(FieldError::new("body", "needs a selector: event_ids, stream_id, or start_time and end_time"));
    }
    if errors.is_empty() {
        Ok(ReplayRequest { selector, target_service, dry_run, processors, limit, offset, dead_letter_seq: None })
    } else {
        Err(errors)
    }
}

fn event_ids(fields: &mut Fields<'_>) -> Option<Vec<Uuid>> {
    match fields.get("event_ids") {
        None => None,
        Some(Value::Array(items)) if items.len() > MAX_EVENT_IDS => {
            let message = format!("holds {} ids; the limit is {MAX_EVENT_IDS}", items.len());
            fields.fail("event_ids", message);
            None
        }
        Some(Value::Array(items)) => {
            let parsed: Option<Vec<Uuid>> =
                items.iter().map(|item| item.as_str().and_then(|text| Uuid::parse_str(text).ok())).collect();
            if parsed.is_none() {
                fields.fail("event_ids", "must be an array of event ids (UUIDs)");
            }
            parsed
        }
        Some(_) => {
            fields.fail("event_ids", "must be an array of event ids (UUIDs)");
            None
        }
    }
}

fn processor_names(fields: &mut Fields<'_>) -> Option<Vec<String>> {
    match fields.get("processors") {
        None => None,
        Some(Value::Array(items)) if !items.is_empty() => {
            let names: Option<Vec<String>> = items.iter().map(|item| item.as_str().map(str::to_owned)).collect();
            if names.is_none() {
                fields.fail("processors", "must be an array of processor names");
            }
            names
        }
        Some(_) => {
            fields.fail("processors", "must be a non-empty array of processor names");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_need_a_selector_and_valid_fields() {
        let ok = parse_request(&json!({"stream_id": "order:1", "dry_run": true, "limit": 5})).unwrap();
        assert_eq!((ok.dry_run, ok.limit, ok.offset), (true, 5, 0));
        let fields = |body: Value| -> Vec<String> {
            parse_request(&body).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields(json!({})), ["body"]);
        assert_eq!(fields(json!({"start_time": "2026-01-01T00:00:00Z"})), ["end_time"]);
        assert_eq!(fields(json!({"event_ids": ["x"], "limit": 0, "offset": -1})), ["event_ids", "limit", "offset"]);
        assert_eq!(
            fields(json!({"stream_id": "a:b", "processors": [], "target_service": "a b"})),
            ["target_service", "processors"]
        );
    }
}
