//! The processor registry: what a processor is, how its registration is validated, how it
//! is stored (`event.event_processors`), how it matches events, and the in-memory snapshot
//! the workers run from.
//!
//! Reads and writes `event.event_processors`; publishes and listens to the core-NATS change
//! notification. Guarantees: a registration that its kind cannot run is refused with field
//! errors; workers see registrations, toggles and deletions within a second (notification),
//! and within [`RELOAD_EVERY`] even if a notification is lost.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::callback::Guard;
use crate::ingest::{FieldError, Fields};
use crate::model::{Event, EventCategory, EventSource};
use crate::subject;

/// How often workers reload the registry even without a change notification.
pub const RELOAD_EVERY: Duration = Duration::from_secs(15);
pub const DEFAULT_MAX_RETRIES: i32 = 3;
const MAX_NAME_CHARS: usize = 100;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 60_000;

/// A registered processor, as stored and as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Processor {
    pub processor_id: String,
    pub processor_name: String,
    pub processor_type: String,
    pub enabled: bool,
    pub priority: i32,
    pub filters: Json<Filters>,
    pub config: Json<Map<String, Value>>,
    pub max_retries: i32,
    pub error_count: i64,
    pub last_error: Option<String>,
    pub last_processed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which events a processor takes. Absent filters match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Filters {
    /// Exact, or a NATS-style pattern over the dot-separated type: `user.*`, `order.>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source: Option<EventSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_category: Option<EventCategory>,
}

impl Filters {
    pub fn matches(&self, event: &Event) -> bool {
        self.event_source.is_none_or(|source| source == event.event_source)
            && self.event_category.is_none_or(|category| category == event.event_category)
            && self.event_type.as_deref().is_none_or(|pattern| type_matches(pattern, &event.event_type))
    }
}

/// NATS wildcard semantics over dot-separated tokens: `*` is one token, a final `>` one or more.
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    if !pattern.contains('*') && !pattern.contains('>') {
        return pattern == event_type;
    }
    let mut tokens = event_type.split('.');
    for (index, wanted) in pattern.split('.').enumerate() {
        if wanted == ">" {
            return tokens.next().is_some() || index == 0 && event_type.is_empty();
        }
        match tokens.next() {
            Some(token) if wanted == "*" || wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// What running a processor does.
#[derive(Debug, Clone)]
pub enum Action {
    /// POST the event JSON to `url`, Standard-Webhooks-signed when there is a secret.
    Webhook { url: reqwest::Url, secret: Option<String>, timeout: Duration },
    /// NATS request-reply on `subject`.
    Request { subject: String, timeout: Duration },
    /// Publish the event to a subject built from `template` (`{event_type}`, `{source}`,
    /// `{category}`), with PubAck when a stream captures it.
    Publish { template: String },
}

/// Subjects a processor may not send to: they would feed the pipeline its own output.
const RESERVED_PREFIXES: &[&str] =
    &["events.", "event.", "deadletter.", "jobs.", "$JS.", "$SYS.", "_INBOX.", "_EVSVC."];

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
        let timeout = match fields.get("timeout_ms") {
            None => Duration::from_millis(DEFAULT_TIMEOUT_MS),
            Some(value) => match value.as_u64() {
                Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
                _ => {
                    fields.fail("timeout_ms", format!("must be an integer from 1 to {MAX_TIMEOUT_MS}"));
                    Duration::ZERO
                }
            },
        };
        let action = match kind.as_str() {
            "webhook" => {
                let secret = fields.string("secret", 1024);
                match fields.string("url", 2048) {
                    None if !fields.present("url") => {
                        fields.fail("url", "is required for a webhook processor");
                        None
                    }
                    None => None,
                    Some(url) => match guard.check_registration(&url) {
                        Ok(url) => Some(Action::Webhook { url, secret, timeout }),
                        Err(error) => {
                            fields.fail("url", error.to_string());
                            None
                        }
                    },
                }
            }
            "publish" => match fields.string("subject", 255) {
                None if !fields.present("subject") => {
                    fields.fail("subject", "is required for a publish processor");
                    None
                }
                None => None,
                Some(template) => match check_subject(&render(&template, "t", "s", "c")) {
                    Ok(()) => Some(Action::Publish { template }),
                    Err(message) => {
                        fields.fail("subject", message);
                        None
                    }
                },
            },
            "" => None,
            _ => {
                let subject = fields.string("subject", 255).unwrap_or_else(|| format!("processors.{name}"));
                match check_subject(&subject) {
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

fn render(template: &str, event_type: &str, source: &str, category: &str) -> String {
    let event_type: Vec<String> = event_type.split('.').map(subject::sanitize_token).collect();
    template
        .replace("{event_type}", &event_type.join("."))
        .replace("{source}", &subject::sanitize_token(source))
        .replace("{category}", &subject::sanitize_token(category))
}

fn check_subject(subject: &str) -> Result<(), String> {
    let valid = !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    if !valid {
        return Err("must be a NATS subject without wildcards (dot-separated, non-empty tokens)".to_owned());
    }
    if let Some(prefix) = RESERVED_PREFIXES.iter().find(|prefix| subject.starts_with(**prefix)) {
        return Err(format!("may not start with {prefix} (reserved for the service)"));
    }
    Ok(())
}

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
    let Some(map) = body.as_object() else {
        return Err(vec![FieldError::new("body", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let processor_id = fields.string("processor_id", MAX_NAME_CHARS);
    if let Some(id) = &processor_id
        && !is_name(id)
    {
        fields.fail("processor_id", "may hold letters, digits, '_', '-' and '.' only");
    }
    let processor_name = fields.string("processor_name", MAX_NAME_CHARS);
    match &processor_name {
        None if !fields.present("processor_name") => fields.fail("processor_name", "is required"),
        Some(name) if !is_name(name) => {
            fields.fail("processor_name", "must be 1 to 100 letters, digits, '_', '-' or '.', not starting with '.'")
        }
        _ => {}
    }
    let processor_type = fields.string("processor_type", MAX_NAME_CHARS);
    match &processor_type {
        None if !fields.present("processor_type") => fields.fail("processor_type", "is required"),
        Some(kind) if kind.trim().is_empty() => fields.fail("processor_type", "must not be blank"),
        _ => {}
    }
    let enabled = match fields.get("enabled") {
        None => true,
        Some(Value::Bool(enabled)) => *enabled,
        Some(_) => {
            fields.fail("enabled", "must be true or false");
            true
        }
    };
    let priority = integer(&mut fields, "priority", 0, -1_000_000, 1_000_000);
    let max_retries = integer(&mut fields, "max_retries", DEFAULT_MAX_RETRIES, 0, 100);
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

fn integer(fields: &mut Fields<'_>, name: &str, default: i32, min: i32, max: i32) -> i32 {
    match fields.get(name) {
        None => default,
        Some(value) => match value.as_i64() {
            Some(number) if (i64::from(min)..=i64::from(max)).contains(&number) => number as i32,
            _ => {
                fields.fail(name, format!("must be an integer from {min} to {max}"));
                default
            }
        },
    }
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
    let event_type = inner.string("event_type", 255);
    if let Some(pattern) = &event_type
        && !valid_pattern(pattern)
    {
        inner.fail("event_type", "must be an event type or a pattern like user.* or order.> ('>' only last)");
    }
    let parsed = Filters {
        event_type,
        event_source: inner.enumerated("event_source", EventSource::parse, EventSource::expected),
        event_category: inner.enumerated("event_category", EventCategory::parse, EventCategory::expected),
    };
    fields.errors.extend(errors.into_iter().map(|error| error.nested("filters")));
    parsed
}

fn valid_pattern(pattern: &str) -> bool {
    if pattern.trim().is_empty() {
        return false;
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens.iter().enumerate().all(|(index, token)| match *token {
        ">" => index + 1 == tokens.len(),
        "*" => true,
        token => !token.contains('*') && !token.contains('>'),
    })
}

/// Why a registration could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("a processor named {0} already exists")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "processor_id, processor_name, processor_type, enabled, priority, filters, config, max_retries, \
                       error_count, last_error, last_processed_at, created_at, updated_at";

/// Stores a registration: a new processor, or a replacement of the one with the same
/// `processor_id` (its counters are kept).
pub async fn register(pool: &PgPool, registration: Registration) -> Result<Processor, RegisterError> {
    let processor_id = registration.processor_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let sql = format!(
        "INSERT INTO event.event_processors \
             (processor_id, processor_name, processor_type, enabled, priority, filters, config, max_retries) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (processor_id) DO UPDATE SET processor_name = EXCLUDED.processor_name, \
             processor_type = EXCLUDED.processor_type, enabled = EXCLUDED.enabled, priority = EXCLUDED.priority, \
             filters = EXCLUDED.filters, config = EXCLUDED.config, max_retries = EXCLUDED.max_retries, \
             updated_at = now() \
         RETURNING {COLUMNS}"
    );
    let stored = sqlx::query_as::<_, Processor>(sqlx::AssertSqlSafe(sql))
        .bind(&processor_id)
        .bind(&registration.processor_name)
        .bind(&registration.processor_type)
        .bind(registration.enabled)
        .bind(registration.priority)
        .bind(Json(&registration.filters))
        .bind(Json(&registration.config))
        .bind(registration.max_retries)
        .fetch_one(pool)
        .await;
    match stored {
        Err(sqlx::Error::Database(error)) if error.constraint() == Some("event_processors_processor_name_key") => {
            Err(RegisterError::NameTaken(registration.processor_name))
        }
        other => Ok(other?),
    }
}

pub async fn list(pool: &PgPool) -> Result<Vec<Processor>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_processors ORDER BY priority DESC, processor_name");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await
}

pub async fn get(pool: &PgPool, processor_id: &str) -> Result<Option<Processor>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_processors WHERE processor_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(processor_id).fetch_optional(pool).await
}

/// Turns a processor on or off; false when there is no such processor.
pub async fn set_enabled(pool: &PgPool, processor_id: &str, enabled: bool) -> Result<bool, sqlx::Error> {
    let updated =
        sqlx::query("UPDATE event.event_processors SET enabled = $2, updated_at = now() WHERE processor_id = $1")
            .bind(processor_id)
            .bind(enabled)
            .execute(pool)
            .await?;
    Ok(updated.rows_affected() == 1)
}

/// Removes a processor (its results stay); false when there is no such processor.
pub async fn delete(pool: &PgPool, processor_id: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM event.event_processors WHERE processor_id = $1")
        .bind(processor_id)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Tells every worker to reload the registry. Best effort: workers also reload on a timer.
pub async fn announce_change(bus: &Bus) {
    if let Err(error) = bus.notify(subject::PROCESSORS_CHANGED.to_owned(), bytes::Bytes::new()).await {
        tracing::warn!(error = %error, "cannot announce a processor change; workers pick it up on their next reload");
    }
}

/// A processor ready to run.
#[derive(Debug)]
pub struct Runnable {
    pub processor: Processor,
    pub action: Action,
}

impl Runnable {
    pub fn name(&self) -> &str {
        &self.processor.processor_name
    }

    /// Enabled, and its filters match the event.
    pub fn takes(&self, event: &Event) -> bool {
        self.processor.enabled && self.processor.filters.matches(event)
    }
}

/// The registry as workers see it: every processor whose config is runnable, highest
/// priority first.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub processors: Vec<Arc<Runnable>>,
}

impl Snapshot {
    /// The enabled processors that take this event, in the order they run.
    pub fn matching(&self, event: &Event) -> Vec<Arc<Runnable>> {
        self.processors.iter().filter(|runnable| runnable.takes(event)).cloned().collect()
    }

    /// Whether any enabled processor takes this event.
    pub fn takes(&self, event: &Event) -> bool {
        self.processors.iter().any(|runnable| runnable.takes(event))
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Runnable>> {
        self.processors.iter().find(|runnable| runnable.name() == name).cloned()
    }
}

/// The live registry of one worker process.
pub struct Registry {
    pool: PgPool,
    guard: Guard,
    current: RwLock<Arc<Snapshot>>,
}

impl Registry {
    pub async fn load(pool: PgPool, guard: Guard) -> Result<Arc<Self>, sqlx::Error> {
        let registry = Arc::new(Self { pool, guard, current: RwLock::new(Arc::default()) });
        registry.reload().await?;
        Ok(registry)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let mut processors = Vec::new();
        for processor in list(&self.pool).await? {
            match Action::of(&processor.processor_name, &processor.processor_type, &processor.config, &self.guard) {
                Ok(action) => processors.push(Arc::new(Runnable { processor, action })),
                Err(errors) => tracing::warn!(processor = %processor.processor_name, ?errors,
                    "processor config cannot run; skipping it"),
            }
        }
        let snapshot = Arc::new(Snapshot { processors });
        match self.current.write() {
            Ok(mut current) => *current = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        Ok(())
    }

    /// Reloads on every change notification and every [`RELOAD_EVERY`], until cancelled.
    pub async fn watch(self: Arc<Self>, bus: Bus, token: CancellationToken) {
        let mut changes = match bus.client().subscribe(subject::PROCESSORS_CHANGED).await {
            Ok(changes) => Some(changes),
            Err(error) => {
                tracing::warn!(error = %error, "cannot subscribe to processor changes; reloading on a timer only");
                None
            }
        };
        let mut timer = tokio::time::interval(RELOAD_EVERY);
        timer.tick().await;
        loop {
            let next = async {
                match changes.as_mut() {
                    Some(changes) => changes.next().await.is_some(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = timer.tick() => {}
                alive = next => if !alive { changes = None },
            }
            if let Err(error) = self.reload().await {
                tracing::warn!(error = %error, "cannot reload the processor registry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_patterns() {
        assert!(type_matches("user.created", "user.created"));
        assert!(!type_matches("user.created", "user.created.v2"));
        assert!(type_matches("user.*", "user.created"));
        assert!(!type_matches("user.*", "user.created.v2"));
        assert!(!type_matches("user.*", "user"));
        assert!(type_matches("order.>", "order.placed"));
        assert!(type_matches("order.>", "order.placed.eu"));
        assert!(!type_matches("order.>", "order"));
        assert!(type_matches("*.created", "user.created"));
        assert!(type_matches(">", "anything.at.all"));
    }

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
        // Unknown types run as NATS request-reply on processors.{name}.
        let internal = json!({"processor_name": "scorer", "processor_type": "internal"});
        let registration = parse_registration(&internal, &guard).unwrap();
        let action = Action::of("scorer", &registration.processor_type, &registration.config, &guard).unwrap();
        assert!(matches!(action, Action::Request { subject, .. } if subject == "processors.scorer"));
    }
}
