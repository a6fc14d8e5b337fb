//! Validation of `POST /api/v1/events/processors`: the request becomes a [`Registration`]
//! with every field error reported at once.
//!
//! Reads JSON; writes nothing.

use serde_json::{Map, Value};

use super::Filters;
use super::action::Action;
use crate::domain::fields::object_body;
use crate::domain::{EventCategory, EventSource, FieldError, Fields};
use crate::infra::callback::Guard;

pub const DEFAULT_MAX_RETRIES: i32 = 3;
const MAX_NAME_CHARS: usize = 100;

/// A validated registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub processor_id: Option<String>,
    pub processor_name: String,
    pub processor_type: String,
    pub enabled: bool,
    pub priority: i32,
    pub filters: Filters,
    pub config: Map<String, Value>,
    pub max_retries: i32,
}

/// Validates `POST /api/v1/events/processors`.
pub fn parse_registration(body: &Value, guard: &Guard) -> Result<Registration, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let processor_id = fields.string("processor_id", MAX_NAME_CHARS);
    if let Some(id) = &processor_id
        && !is_name(id)
    {
        fields.fail("processor_id", "may hold letters, digits, '_', '-' and '.' only");
    }
    let processor_name = fields.required_string("processor_name", MAX_NAME_CHARS);
    if let Some(name) = &processor_name
        && !is_name(name)
    {
        fields.fail("processor_name", "must be 1 to 100 letters, digits, '_', '-' or '.', not starting with '.'");
    }
    let processor_type = fields.required_string("processor_type", MAX_NAME_CHARS);
    if processor_type.as_ref().is_some_and(|kind| kind.trim().is_empty()) {
        fields.fail("processor_type", "must not be blank");
    }
    let enabled = fields.boolean("enabled").unwrap_or(true);
    let priority = fields.integer("priority", -1_000_000..=1_000_000).unwrap_or(0) as i32;
    let max_retries = fields.integer("max_retries", 0..=100).map_or(DEFAULT_MAX_RETRIES, |n| n as i32);
    let filters = parse_filters(&mut fields);
    let config = fields.object("config");
    if let (Some(name), Some(kind)) = (&processor_name, &processor_type)
        && is_name(name)
        && let Err(more) = Action::of(name, kind, &config, guard)
    {
        errors.extend(more);
    }
    match (processor_name, processor_type) {
        (Some(processor_name), Some(processor_type)) if errors.is_empty() => Ok(Registration {
            processor_id,
            processor_name,
            processor_type: processor_type.trim().to_owned(),
            enabled,
            priority,
            filters,
            config,
            max_retries,
        }),
        _ => Err(errors),
    }
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && !text.starts_with('.')
        && !text.ends_with('.')
        && !text.contains("..")
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn parse_filters(fields: &mut Fields<'_>) -> Filters {
    let filters = match fields.get("filters") {
        None => return Filters::default(),
        Some(Value::Object(map)) => map.clone(),
        Some(_) => {
            fields.fail("filters", "must be a JSON object");
            return Filters::default();
        }
    };
    let mut errors = Vec::new();
    let mut inner = Fields { body: &filters, errors: &mut errors };
    let parsed = Filters {
        event_type: inner.pattern("event_type"),
        event_source: inner.enumerated("event_source", EventSource::parse, EventSource::expected),
        event_category: inner.enumerated("event_category", EventCategory::parse, EventCategory::expected),
    };
    fields.errors.extend(errors.into_iter().map(|error| error.nested("filters")));
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registrations_are_validated() {
        let guard = Guard::default();
        let ok = json!({"processor_name": "crm_sync", "processor_type": "webhook",
                        "config": {"url": "https://crm.example.com/hook"}, "filters": {"event_type": "user.*"}});
        let registration = parse_registration(&ok, &guard).unwrap();
        assert_eq!((registration.enabled, registration.priority, registration.max_retries), (true, 0, 3));
        let fields = |body: Value| -> Vec<String> {
            parse_registration(&body, &guard).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields(json!({})), ["processor_name", "processor_type"]);
        assert_eq!(fields(json!({"processor_name": "a", "processor_type": "webhook"})), ["config.url"]);
        assert_eq!(
            fields(
                json!({"processor_name": "a", "processor_type": "webhook", "config": {"url": "http://169.254.169.254/"}})
            ),
            ["config.url"]
        );
        assert_eq!(fields(json!({"processor_name": "a", "processor_type": "publish"})), ["config.subject"]);
        assert_eq!(
            fields(
                json!({"processor_name": "a", "processor_type": "publish", "config": {"subject": "events.{event_type}"}})
            ),
            ["config.subject"]
        );
        assert_eq!(
            fields(json!({"processor_name": "a b", "processor_type": "internal", "filters": {"event_type": "a.>.b"}})),
            ["processor_name", "filters.event_type"]
        );
        assert_eq!(
            fields(json!({"processor_name": "a", "processor_type": "x", "config": {"kind": "ftp", "timeout_ms": 0}})),
            ["config.kind", "config.timeout_ms"]
        );
        // The one pattern rule: empty tokens are refused here as everywhere.
        assert_eq!(
            fields(json!({"processor_name": "a", "processor_type": "x", "filters": {"event_type": "user..created"}})),
            ["filters.event_type"]
        );
    }
}
