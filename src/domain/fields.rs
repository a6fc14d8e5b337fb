//! Field-by-field validation of JSON requests: [`FieldError`], and [`Fields`], readers over
//! one request object that record every problem instead of stopping at the first.
//!
//! Reads JSON values, writes nothing. Used by every request the service validates (events,
//! processors, subscriptions, projection definitions, replays, queries), so one field is
//! reported the same way wherever it appears.

use std::ops::RangeInclusive;

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::parse::object_contains_nul;
use super::pattern::EventTypePattern;

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// The same error, for a field nested under `prefix` (`"[3]"`, `"events[2]"`).
    pub fn nested(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        Self { field, message: self.message }
    }
}

/// The body as an object, or the one error that says it is not, or that it holds a NUL
/// character somewhere (PostgreSQL can store none, in text or in JSON, nor compare with one).
pub fn object_body(body: &Value) -> Result<&Map<String, Value>, Vec<FieldError>> {
    let map = body.as_object().ok_or_else(|| vec![FieldError::new("body", "must be a JSON object")])?;
    if object_contains_nul(map) {
        return Err(vec![FieldError::new("body", "must not contain NUL (\\u0000) characters")]);
    }
    Ok(map)
}

/// The years a timestamp may be in (UTC): what RFC 3339 can write. Well inside what
/// PostgreSQL keeps (4713 BC to 294276 AD), and far enough inside chrono's range that the
/// difference of two such times can be added to any of them.
pub const TIMESTAMP_YEARS: RangeInclusive<i32> = 0..=9999;

/// Parses a timestamp the way producers send them: RFC 3339, or ISO 8601 without an offset
/// (taken as UTC, as Python's `datetime.isoformat()` writes it), in [`TIMESTAMP_YEARS`].
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let parsed = match DateTime::parse_from_rfc3339(text) {
        Ok(parsed) => parsed.with_timezone(&Utc),
        Err(_) => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())?
            .and_utc(),
    };
    TIMESTAMP_YEARS.contains(&parsed.year()).then_some(parsed)
}

/// Field readers over one request object that record errors as they go. A reader returns
/// `None` both for an absent field and for an invalid one (then with an error recorded).
pub struct Fields<'a> {
    pub body: &'a Map<String, Value>,
    pub errors: &'a mut Vec<FieldError>,
}

impl Fields<'_> {
    /// The field's value, treating an explicit `null` like an absent field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.body.get(name).filter(|value| !value.is_null())
    }

    pub fn present(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    pub fn string(&mut self, name: &str, max_chars: usize) -> Option<String> {
        match self.get(name)? {
            Value::String(text) if text.chars().count() > max_chars => {
                self.fail(name, format!("must be at most {max_chars} characters"));
                None
            }
            Value::String(text) => Some(text.clone()),
            _ => {
                self.fail(name, "must be a string");
                None
            }
        }
    }

    /// A string that must be there.
    pub fn required_string(&mut self, name: &str, max_chars: usize) -> Option<String> {
        if !self.present(name) {
            self.fail(name, "is required");
            return None;
        }
        self.string(name, max_chars)
    }

    pub fn object(&mut self, name: &str) -> Map<String, Value> {
        match self.get(name) {
            Some(Value::Object(map)) => map.clone(),
            _ => {
                self.check_object(name);
                Map::new()
            }
        }
    }

    /// Records an error unless the field is absent, `null` or an object.
    pub fn check_object(&mut self, name: &str) {
        if self.get(name).is_some_and(|value| !value.is_object()) {
            self.fail(name, "must be a JSON object");
        }
    }

    pub fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Value::Bool(value) => Some(*value),
            _ => {
                self.fail(name, "must be true or false");
                None
            }
        }
    }

    /// An integer within `range`.
    pub fn integer(&mut self, name: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let value = self.get(name)?;
        match value.as_i64().filter(|number| range.contains(number)) {
            Some(number) => Some(number),
            None if *range.end() == i64::MAX => {
                self.fail(name, format!("must be an integer ≥ {}", range.start()));
                None
            }
            None => {
                self.fail(name, format!("must be an integer from {} to {}", range.start(), range.end()));
                None
            }
        }
    }

    pub fn enumerated<T>(&mut self, name: &str, parse: fn(&str) -> Option<T>, expected: fn() -> String) -> Option<T> {
        let parsed = self.get(name)?.as_str().and_then(parse);
        if parsed.is_none() {
            self.fail(name, format!("must be one of: {}", expected()));
        }
        parsed
    }

    pub fn uuid(&mut self, name: &str) -> Option<Uuid> {
        let parsed = self.get(name)?.as_str().and_then(|text| Uuid::parse_str(text).ok());
        if parsed.is_none() {
            self.fail(name, "must be a UUID");
        }
        parsed
    }

    pub fn timestamp(&mut self, name: &str) -> Option<DateTime<Utc>> {
        let parsed = self.get(name)?.as_str().and_then(parse_timestamp);
        if parsed.is_none() {
            self.fail(name, "must be an ISO 8601 / RFC 3339 timestamp");
        }
        parsed
    }

    /// One event type or pattern (`user.*`, `order.>`).
    pub fn pattern(&mut self, name: &str) -> Option<EventTypePattern> {
        let text = self.string(name, EventTypePattern::MAX_CHARS)?;
        match EventTypePattern::parse(&text) {
            Ok(pattern) => Some(pattern),
            Err(problem) => {
                self.fail(name, problem.to_string());
                None
            }
        }
    }

    /// A non-empty list of at most `max` event types or patterns; `required` says whether an
    /// absent field is an error.
    pub fn patterns(&mut self, name: &str, max: usize, required: bool) -> Option<Vec<EventTypePattern>> {
        let expected = format!("must be a list of 1 to {max} event types or patterns like user.* or order.>");
        let items = match self.get(name) {
            None if required => {
                self.fail(name, format!("is required: {}", expected.trim_start_matches("must be ")));
                return None;
            }
            None => return None,
            Some(Value::Array(items)) if !items.is_empty() && items.len() <= max => items.clone(),
            Some(_) => {
                self.fail(name, expected);
                return None;
            }
        };
        let mut patterns = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let parsed = match item.as_str() {
                Some(text) => EventTypePattern::parse(text).map_err(|problem| problem.to_string()),
                None => Err("must be a string".to_owned()),
            };
            match parsed {
                Ok(pattern) => patterns.push(pattern),
                Err(message) => self.fail(name, format!("item {index} ({item}) {message}")),
            }
        }
        (patterns.len() == items.len()).then_some(patterns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_field_names() {
        assert_eq!(FieldError::new("event_type", "x").nested("[3]").field, "[3].event_type");
        assert_eq!(FieldError::new("", "x").nested("[3]").field, "[3]");
        assert_eq!(FieldError::new("[1]", "x").nested("events").field, "events[1]");
    }

    #[test]
    fn request_bodies_are_objects_without_nul() {
        assert!(object_body(&json!({"a": ["b", {"c": "d"}]})).is_ok());
        for bad in [json!([1]), json!({"a": ["b\u{0}"]}), json!({"a\u{0}": 1})] {
            let errors = object_body(&bad).unwrap_err();
            assert_eq!(errors[0].field, "body", "{bad}");
        }
    }

    #[test]
    fn readers_record_what_is_wrong() {
        let body = json!({"n": 7, "flag": "yes", "types": ["a.*", "a..b"], "none": null});
        let map = body.as_object().unwrap();
        let mut errors = Vec::new();
        let mut fields = Fields { body: map, errors: &mut errors };
        assert_eq!(fields.integer("n", 1..=10), Some(7));
        assert_eq!(fields.integer("n", 8..=i64::MAX), None);
        assert_eq!(fields.boolean("flag"), None);
        assert_eq!(fields.boolean("none"), None);
        assert_eq!(fields.patterns("types", 10, true), None);
        assert_eq!(fields.required_string("missing", 10), None);
        let named: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        assert_eq!(named, ["n", "flag", "types", "missing"]);
        assert!(errors[2].message.starts_with("item 1 (\"a..b\")"), "{}", errors[2].message);
        assert_eq!(errors[0].message, "must be an integer ≥ 8");
    }
}
