//! What running a processor does, as its type and config describe it, checked when it is
//! registered and again when workers load it.
//!
//! Reads a processor's config; writes nothing.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::domain::{Event, FieldError, Fields, Secret};
use crate::infra::callback::Guard;
use crate::wire::subjects;

const DEFAULT_TIMEOUT_MS: i64 = 10_000;
const MAX_TIMEOUT_MS: i64 = 60_000;

/// What running a processor does.
#[derive(Debug, Clone)]
pub enum Action {
    /// POST the event JSON to `url`, Standard-Webhooks-signed when there is a secret.
    Webhook { url: reqwest::Url, secret: Option<Secret>, timeout: Duration },
    /// NATS request-reply on `subject`.
    Request { subject: String, timeout: Duration },
    /// Publish the event to a subject built from `template` (`{event_type}`, `{source}`,
    /// `{category}`), with PubAck when a stream captures it.
    Publish { template: String },
}

impl Action {
    /// The action a processor's type and config describe, or why they cannot run.
    /// `webhook`, `nats` and `publish` are the kinds; any other type runs as `nats` on
    /// `processors.{name}` unless `config.kind` names a kind.
    pub fn of(
        name: &str,
        processor_type: &str,
        config: &Map<String, Value>,
        guard: &Guard,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut fields = Fields { body: config, errors: &mut errors };
        let kind = match fields.get("kind") {
            None => processor_type.to_owned(),
            Some(Value::String(kind)) if matches!(kind.as_str(), "webhook" | "nats" | "publish") => kind.clone(),
            Some(_) => {
                fields.fail("kind", "must be one of: webhook, nats, publish");
                String::new()
            }
        };
        let timeout = Duration::from_millis(
            fields.integer("timeout_ms", 1..=MAX_TIMEOUT_MS).unwrap_or(DEFAULT_TIMEOUT_MS).unsigned_abs(),
        );
        let action = match kind.as_str() {
            "webhook" => webhook(&mut fields, guard, timeout),
            "publish" => publish(&mut fields),
            "" => None,
            _ => {
                let subject = fields.string("subject", 255).unwrap_or_else(|| subjects::processor_subject(name));
                match subjects::check_outgoing_subject(&subject) {
                    Ok(()) => Some(Action::Request { subject, timeout }),
                    Err(message) => {
                        fields.fail("subject", message);
                        None
                    }
                }
            }
        };
        match action {
            Some(action) if errors.is_empty() => Ok(action),
            _ => Err(errors.into_iter().map(|error| error.nested("config")).collect()),
        }
    }

    /// The subject a publish processor sends this event to.
    pub fn publish_subject(template: &str, event: &Event) -> String {
        render(template, &event.event_type, event.event_source.as_str(), event.event_category.as_str())
    }
}

fn webhook(fields: &mut Fields<'_>, guard: &Guard, timeout: Duration) -> Option<Action> {
    let secret = fields.string("secret", 1024).map(Secret::from);
    // `webhook_url` is the name older clients send.
    let name = if !fields.present("url") && fields.present("webhook_url") { "webhook_url" } else { "url" };
    if !fields.present(name) {
        fields.fail("url", "is required for a webhook processor (or webhook_url)");
        return None;
    }
    let url = fields.string(name, 2048)?;
    match guard.check_registration(&url) {
        Ok(url) => Some(Action::Webhook { url, secret, timeout }),
        Err(error) => {
            fields.fail(name, error.to_string());
            None
        }
    }
}

fn publish(fields: &mut Fields<'_>) -> Option<Action> {
    if !fields.present("subject") {
        fields.fail("subject", "is required for a publish processor");
        return None;
    }
    let template = fields.string("subject", 255)?;
    match subjects::check_outgoing_subject(&render(&template, "t", "s", "c")) {
        Ok(()) => Some(Action::Publish { template }),
        Err(message) => {
            fields.fail("subject", message);
            None
        }
    }
}

fn render(template: &str, event_type: &str, source: &str, category: &str) -> String {
    template
        .replace("{event_type}", &subjects::type_tokens(event_type))
        .replace("{source}", &subjects::sanitize_token(source))
        .replace("{category}", &subjects::sanitize_token(category))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action(processor_type: &str, config: Value) -> Result<Action, Vec<String>> {
        let config = config.as_object().cloned().unwrap_or_default();
        Action::of("scorer", processor_type, &config, &Guard::default())
            .map_err(|errors| errors.into_iter().map(|error| error.field).collect())
    }

    #[test]
    fn kinds_and_their_checks() {
        assert!(
            matches!(action("internal", json!({})), Ok(Action::Request { subject, .. }) if subject == "processors.scorer")
        );
        assert!(matches!(
            action("webhook", json!({"url": "https://x.example/h", "secret": "s"})),
            Ok(Action::Webhook { secret: Some(_), .. })
        ));
        assert!(matches!(
            action("publish", json!({"subject": "out.{source}.{event_type}"})),
            Ok(Action::Publish { .. })
        ));
        assert_eq!(action("webhook", json!({})).unwrap_err(), ["config.url"]);
        assert!(matches!(action("webhook", json!({"webhook_url": "https://x.example/h"})), Ok(Action::Webhook { .. })));
        assert_eq!(action("webhook", json!({"webhook_url": "ftp://x"})).unwrap_err(), ["config.webhook_url"]);
        assert_eq!(action("publish", json!({"subject": "events.{event_type}"})).unwrap_err(), ["config.subject"]);
        assert_eq!(
            action("x", json!({"kind": "ftp", "timeout_ms": 0})).unwrap_err(),
            ["config.kind", "config.timeout_ms"]
        );
    }

    #[test]
    fn publish_subjects_keep_type_tokens() {
        let event = crate::domain::parse::parse_event(
            json!({"event_type": "order.placed now", "event_source": "backend"}),
            &crate::domain::parse::Defaults::http(chrono::Utc::now()),
        )
        .unwrap();
        assert_eq!(Action::publish_subject("out.{source}.{event_type}", &event), "out.backend.order.placed_now");
    }
}
