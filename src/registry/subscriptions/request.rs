//! Validation of subscription create and PATCH bodies: they become [`Changes`], with every
//! field error reported at once.
//!
//! Reads JSON; writes nothing.

use serde_json::Value;

use super::RetryPolicy;
use crate::domain::fields::object_body;
use crate::domain::{EventCategory, EventSource, EventTypePattern, FieldError, Fields, Secret};
use crate::infra::callback::Guard;

const MAX_PATTERNS: usize = 100;
const MAX_RETRIES: i64 = 20;

/// The fields a create or update request may set; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub subscription_id: Option<String>,
    pub subscriber_name: Option<String>,
    pub subscriber_type: Option<String>,
    pub event_types: Option<Vec<EventTypePattern>>,
    /// `Some(None)`: all sources.
    pub event_sources: Option<Option<Vec<EventSource>>>,
    pub event_categories: Option<Option<Vec<EventCategory>>>,
    pub callback_url: Option<Option<String>>,
    pub webhook_secret: Option<Secret>,
    pub enabled: Option<bool>,
    pub retry_policy: Option<RetryPolicy>,
    pub rate_limit_per_second: Option<Option<i32>>,
}

/// Validates a create (`creating`) or a PATCH body.
pub fn parse_changes(body: &Value, guard: &Guard, creating: bool) -> Result<Changes, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let mut changes = Changes {
        subscription_id: if creating { fields.string("subscription_id", 100) } else { None },
        subscriber_name: fields.string("subscriber_name", 255),
        subscriber_type: fields.string("subscriber_type", 100),
        ..Changes::default()
    };
    if let Some(id) = &changes.subscription_id
        && (id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        fields.fail("subscription_id", "must be 1 to 100 letters, digits, '_' or '-'");
    }
    changes.event_types = fields.patterns("event_types", MAX_PATTERNS, creating);
    changes.event_sources = enum_list(&mut fields, "event_sources", EventSource::parse, EventSource::expected);
    changes.event_categories =
        enum_list(&mut fields, "event_categories", EventCategory::parse, EventCategory::expected);
    if fields.body.contains_key("callback_url") {
        changes.callback_url = Some(match fields.string("callback_url", 2048) {
            None => None,
            Some(url) => match guard.check_registration(&url) {
                Ok(_) => Some(url),
                Err(error) => {
                    fields.fail("callback_url", error.to_string());
                    None
                }
            },
        });
    }
    if creating {
        let webhook_type = changes.subscriber_type.as_deref() == Some("webhook");
        if webhook_type && changes.callback_url.as_ref().is_none_or(Option::is_none) {
            fields.fail("callback_url", "is required for webhook subscriptions");
        }
        changes.webhook_secret = fields.string("webhook_secret", 1024).map(Secret::from);
        if changes.webhook_secret.as_ref().is_some_and(|secret| secret.expose().len() < 8) {
            fields.fail("webhook_secret", "must be at least 8 characters (or leave it out to get one)");
        }
    }
    changes.enabled = fields.boolean("enabled");
    if let Some(policy) = fields.get("retry_policy").cloned() {
        changes.retry_policy = parse_retry_policy(&policy, &mut fields);
    }
    if fields.body.contains_key("rate_limit_per_second") {
        changes.rate_limit_per_second = Some(match fields.get("rate_limit_per_second") {
            None => None,
            Some(value) => match value.as_i64() {
                Some(rate) if (1..=100_000).contains(&rate) => Some(rate as i32),
                _ => {
                    fields.fail("rate_limit_per_second", "must be an integer from 1 to 100000, or null for no limit");
                    None
                }
            },
        });
    }
    if errors.is_empty() { Ok(changes) } else { Err(errors) }
}

/// A list of names of a closed vocabulary; `Some(None)` for `null` or an empty list (all).
fn enum_list<T>(
    fields: &mut Fields<'_>,
    name: &str,
    parse: fn(&str) -> Option<T>,
    expected: fn() -> String,
) -> Option<Option<Vec<T>>> {
    if !fields.body.contains_key(name) {
        return None;
    }
    match fields.get(name) {
        None => Some(None),
        Some(Value::Array(items)) => {
            let values: Option<Vec<T>> = items.iter().map(|item| item.as_str().and_then(parse)).collect();
            match values {
                Some(values) if !values.is_empty() => Some(Some(values)),
                Some(_) => Some(None),
                None => {
                    fields.fail(name, format!("must be a list of: {}", expected()));
                    None
                }
            }
        }
        Some(_) => {
            fields.fail(name, format!("must be a list of: {} (or null for all)", expected()));
            None
        }
    }
}

fn parse_retry_policy(value: &Value, fields: &mut Fields<'_>) -> Option<RetryPolicy> {
    let Some(map) = value.as_object() else {
        fields.fail("retry_policy", "must be an object: {max_retries, backoff_seconds}");
        return None;
    };
    let mut policy = RetryPolicy::default();
    let mut ok = true;
    match map.get("max_retries").filter(|v| !v.is_null()) {
        None => {}
        Some(value) => match value.as_i64() {
            Some(retries) if (0..=MAX_RETRIES).contains(&retries) => policy.max_retries = retries as u32,
            _ => {
                fields.fail("retry_policy.max_retries", format!("must be an integer from 0 to {MAX_RETRIES}"));
                ok = false;
            }
        },
    }
    match map.get("backoff_seconds").filter(|v| !v.is_null()) {
        None => {}
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 50 => {
            let delays: Option<Vec<f64>> =
                items.iter().map(|item| item.as_f64().filter(|d| (0.001..=86_400.0).contains(d))).collect();
            match delays {
                Some(delays) => policy.backoff_seconds = delays,
                None => {
                    fields.fail("retry_policy.backoff_seconds", "must hold delays from 0.001 to 86400 seconds");
                    ok = false;
                }
            }
        }
        Some(_) => {
            fields.fail("retry_policy.backoff_seconds", "must be a list of 1 to 50 delays in seconds");
            ok = false;
        }
    }
    ok.then_some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn requests_are_validated() {
        let guard = Guard::default();
        let ok = json!({"event_types": ["user.*"], "callback_url": "https://hooks.example.com/in",
                        "event_sources": ["backend"], "retry_policy": {"max_retries": 2, "backoff_seconds": [0.5]}});
        let changes = parse_changes(&ok, &guard, true).unwrap();
        assert_eq!(changes.retry_policy.unwrap().delay(3), Duration::from_millis(500));
        assert_eq!(changes.event_sources, Some(Some(vec![EventSource::Backend])));
        let fields = |body: Value| -> Vec<String> {
            parse_changes(&body, &guard, true).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields(json!({})), ["event_types"]);
        assert_eq!(fields(json!({"event_types": []})), ["event_types"]);
        assert_eq!(fields(json!({"event_types": ["user..created"]})), ["event_types"]);
        assert_eq!(fields(json!({"event_types": ["a"], "callback_url": "ftp://x"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "callback_url": "http://169.254.169.254/"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "subscriber_type": "webhook"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "event_sources": ["mars"]})), ["event_sources"]);
        assert_eq!(
            fields(json!({"event_types": ["a"], "retry_policy": {"max_retries": -1, "backoff_seconds": [0]}})),
            ["retry_policy.max_retries", "retry_policy.backoff_seconds"]
        );
        assert_eq!(fields(json!({"event_types": ["a"], "rate_limit_per_second": 0})), ["rate_limit_per_second"]);
        assert!(parse_changes(&json!({"enabled": false}), &guard, false).is_ok(), "a PATCH needs no event_types");
    }
}
