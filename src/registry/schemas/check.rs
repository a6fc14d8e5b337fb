//! Checking one event against its type's schema: validation of `data`, the mode's outcome,
//! redaction, and the version in the event's metadata.
//!
//! Reads and changes the event in hand; nothing else. Guarantees: an event is validated before
//! it is redacted (a rule may make it no longer match); a refused event is left as it was; an
//! accepted one carries `metadata.schema_version`, and in `flag` mode `metadata.schema_errors`.

use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{RedactAction, Redaction, SchemaMode, SchemaVersion};
use crate::domain::{Event, FieldError};

/// Errors reported per event at most.
const MAX_ERRORS: usize = 20;

/// A schema ready to check events with.
pub struct Active {
    pub version: i32,
    pub mode: SchemaMode,
    pub redact: Vec<Redaction>,
    validator: jsonschema::Validator,
}

/// What checking an event came to.
#[derive(Debug, PartialEq)]
pub enum Checked {
    /// Valid: the event goes on (with its version, redacted).
    Valid,
    /// Invalid in `flag` mode: the event goes on with its errors.
    Flagged,
    /// Invalid in `reject` mode: why.
    Refused(Vec<SchemaError>),
}

impl Checked {
    /// The outcome as a metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Checked::Valid => "valid",
            Checked::Flagged => "flagged",
            Checked::Refused(_) => "refused",
        }
    }
}

/// One way an event fails its schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaError {
    /// Where in the event: `data.amount`.
    pub field: String,
    /// The schema keyword that failed: `minimum`, `required`, `type`, ...
    pub keyword: String,
    /// The validator's message; it quotes the value, so it goes only to the producer (the
    /// HTTP answer), never into stored metadata or dead-letter headers.
    #[serde(skip)]
    pub message: String,
}

impl SchemaError {
    /// As a field error of the HTTP answer.
    pub fn to_field_error(&self) -> FieldError {
        FieldError::new(&self.field, &self.message)
    }

    /// Without the value: for what is stored or logged.
    pub fn summary(&self) -> String {
        format!("{} fails `{}`", self.field, self.keyword)
    }
}

/// Compiles a draft 2020-12 schema. Patterns use the linear-time `regex` engine, so no
/// registered pattern can make a check backtrack for long on the ingest path (patterns that
/// need backtracking, such as back-references, are refused when the schema is registered).
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
        .map_err(|error| error.to_string())
}

impl Active {
    pub fn compile(stored: &SchemaVersion) -> Result<Self, String> {
        Ok(Self {
            version: stored.version,
            mode: stored.mode,
            redact: stored.redact.0.clone(),
            validator: compile(&stored.schema)?,
        })
    }

    /// Checks `event`, and on acceptance records the version (and the errors when flagged)
    /// and applies the redaction rules.
    pub fn check(&self, event: &mut Event) -> Checked {
        let data = Value::Object(std::mem::take(&mut event.data));
        let errors: Vec<SchemaError> = self
            .validator
            .iter_errors(&data)
            .take(MAX_ERRORS)
            .map(|error| SchemaError {
                field: field_of(error.instance_path().as_str()),
                keyword: error.schema_path().as_str().rsplit('/').next().unwrap_or_default().to_owned(),
                message: error.to_string(),
            })
            .collect();
        event.data = match data {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        if !errors.is_empty() && self.mode == SchemaMode::Reject {
            return Checked::Refused(errors);
        }
        event.metadata.insert("schema_version".to_owned(), json!(self.version));
        let flagged = !errors.is_empty();
        if flagged {
            event.metadata.insert("schema_errors".to_owned(), json!(errors));
        }
        for rule in &self.redact {
            redact(&mut event.data, &rule.path, rule.action);
        }
        if flagged { Checked::Flagged } else { Checked::Valid }
    }
}

/// A JSON pointer into `data` as a field name: `/items/0/sku` → `data.items.0.sku`.
fn field_of(pointer: &str) -> String {
    let mut field = String::from("data");
    for token in pointer.split('/').skip(1) {
        field.push('.');
        field.push_str(&token.replace("~1", "/").replace("~0", "~"));
    }
    field
}

/// Applies one rule to a dotted path; a path that is not there changes nothing.
pub fn redact(data: &mut Map<String, Value>, path: &str, action: RedactAction) {
    let mut tokens: Vec<&str> = path.split('.').collect();
    let Some(last) = tokens.pop() else { return };
    let mut here = data;
    for token in tokens {
        match here.get_mut(token) {
            Some(Value::Object(inner)) => here = inner,
            _ => return,
        }
    }
    match action {
        RedactAction::Drop => {
            here.remove(last);
        }
        RedactAction::Hash => {
            if let Some(value) = here.get_mut(last) {
                let digest = Sha256::digest(value.to_string().as_bytes());
                *value = Value::String(hex::encode(digest));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse::{Defaults, parse_event};

    fn active(mode: SchemaMode, redact: Vec<Redaction>) -> Active {
        let schema = json!({"type": "object", "required": ["order_id"],
                            "properties": {"order_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}}});
        Active { version: 3, mode, redact, validator: compile(&schema).unwrap() }
    }

    fn event(data: Value) -> Event {
        parse_event(json!({"event_type": "order.placed", "data": data}), &Defaults::http(chrono::Utc::now())).unwrap()
    }

    #[test]
    fn reject_mode_refuses_with_the_failing_paths_and_leaves_the_event_alone() {
        let mut bad = event(json!({"amount": -1}));
        let Checked::Refused(errors) = active(SchemaMode::Reject, vec![]).check(&mut bad) else { panic!("accepted") };
        let mut keywords: Vec<&str> = errors.iter().map(|error| error.keyword.as_str()).collect();
        keywords.sort();
        assert_eq!(keywords, ["minimum", "required"]);
        assert!(errors.iter().all(|error| !error.summary().contains("-1")), "no value in the summary");
        let mut fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        fields.sort();
        assert_eq!(fields, ["data", "data.amount"], "{errors:?}");
        assert_eq!(bad.data["amount"], -1);
        assert!(bad.metadata.get("schema_version").is_none());
        let mut good = event(json!({"order_id": "o-1"}));
        assert_eq!(active(SchemaMode::Reject, vec![]).check(&mut good), Checked::Valid);
        assert_eq!(good.metadata["schema_version"], 3);
    }

    #[test]
    fn flag_mode_stores_the_errors_and_redaction_comes_after_validation() {
        let rules = vec![
            Redaction { path: "card.number".into(), action: RedactAction::Hash },
            Redaction { path: "email".into(), action: RedactAction::Drop },
            Redaction { path: "missing.path".into(), action: RedactAction::Drop },
        ];
        let mut flagged = event(json!({"amount": 5, "email": "a@b.c", "card": {"number": "4111"}}));
        assert_eq!(active(SchemaMode::Flag, rules).check(&mut flagged), Checked::Flagged);
        assert_eq!(flagged.metadata["schema_errors"][0], json!({"field": "data", "keyword": "required"}));
        assert!(flagged.data.get("email").is_none());
        assert_eq!(flagged.data["card"]["number"], hex::encode(Sha256::digest(b"\"4111\"")));
        assert_eq!(flagged.data["amount"], 5);
    }
}
