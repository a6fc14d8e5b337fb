//! Subscriptions: what they are, how a request for one is validated, how they are stored
//! (`event.event_subscriptions`), how they match events, the delivery log
//! (`event.delivery_attempts`) and the in-memory snapshot dispatchers and senders use.
//!
//! Reads and writes those tables; publishes and listens to the core-NATS change notification.
//! Guarantees: secrets leave the service only on create and through the dedicated secret
//! endpoint; dispatchers and senders see changes within a second (notification), and within
//! [`RELOAD_EVERY`] even if a notification is lost.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::callback::Guard;
use crate::ingest::{FieldError, Fields};
use crate::model::{Event, EventCategory, EventSource};
use crate::processors::type_matches;
use crate::subject;

pub const RELOAD_EVERY: Duration = Duration::from_secs(15);
const MAX_PATTERNS: usize = 100;
const MAX_RETRIES: i64 = 20;

/// How a subscription retries a failed delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before retry n is `backoff_seconds[n-1]` (the last one repeats), plus up to 20 %
    /// jitter.
    pub backoff_seconds: Vec<f64>,
}

impl Default for RetryPolicy {
    /// Svix's schedule, shortened: 5 s, 5 min, 30 min, 2 h, 5 h.
    fn default() -> Self {
        Self { max_retries: 5, backoff_seconds: vec![5.0, 300.0, 1800.0, 7200.0, 18000.0] }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 = the first retry), without jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let index = (retry.max(1) as usize - 1).min(self.backoff_seconds.len().saturating_sub(1));
        Duration::from_secs_f64(self.backoff_seconds.get(index).copied().unwrap_or(5.0))
    }
}

/// A subscription as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Subscription {
    pub subscription_id: String,
    pub subscriber_name: String,
    pub subscriber_type: String,
    pub event_types: Vec<String>,
    pub event_sources: Option<Vec<String>>,
    pub event_categories: Option<Vec<String>>,
    pub callback_url: Option<String>,
    #[serde(serialize_with = "mask")]
    pub webhook_secret: String,
    pub enabled: bool,
    pub retry_policy: Json<RetryPolicy>,
    pub rate_limit_per_second: Option<i32>,
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn mask<S: serde::Serializer>(_secret: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("whsec_********")
}

impl Subscription {
    /// Enabled, with a callback URL to deliver to.
    pub fn deliverable(&self) -> bool {
        self.enabled && self.callback_url.is_some()
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.event_types.iter().any(|pattern| type_matches(pattern, &event.event_type))
            && self
                .event_sources
                .as_ref()
                .is_none_or(|sources| sources.iter().any(|s| s == event.event_source.as_str()))
            && self
                .event_categories
                .as_ref()
                .is_none_or(|categories| categories.iter().any(|c| c == event.event_category.as_str()))
    }
}

/// A new secret: `whsec_` and 32 random bytes in base64, as Standard Webhooks has them.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// The fields a create or update request may set; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub subscription_id: Option<String>,
    pub subscriber_name: Option<String>,
    pub subscriber_type: Option<String>,
    pub event_types: Option<Vec<String>>,
    /// `Some(None)`: all sources.
    pub event_sources: Option<Option<Vec<String>>>,
    pub event_categories: Option<Option<Vec<String>>>,
    pub callback_url: Option<Option<String>>,
    pub webhook_secret: Option<String>,
    pub enabled: Option<bool>,
    pub retry_policy: Option<RetryPolicy>,
    pub rate_limit_per_second: Option<Option<i32>>,
}

/// Validates a create (`creating`) or a PATCH body.
pub fn parse_changes(body: &Value, guard: &Guard, creating: bool) -> Result<Changes, Vec<FieldError>> {
    let Some(map) = body.as_object() else {
        return Err(vec![FieldError::new("body", "must be a JSON object")]);
    };
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
    match fields.get("event_types") {
        None if creating => fields.fail("event_types", "is required: a non-empty list of event types or patterns"),
        None => {}
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_PATTERNS => {
            let patterns: Option<Vec<String>> =
                items.iter().map(|item| item.as_str().filter(|p| valid_pattern(p)).map(str::to_owned)).collect();
            match patterns {
                Some(patterns) => changes.event_types = Some(patterns),
                None => fields.fail("event_types", "must hold event types or patterns like user.* or order.>"),
            }
        }
        Some(_) => fields.fail("event_types", format!("must be a list of 1 to {MAX_PATTERNS} event types or patterns")),
    }
    changes.event_sources =
        enum_list(&mut fields, "event_sources", |s| EventSource::parse(s).is_some(), EventSource::expected);
    changes.event_categories =
        enum_list(&mut fields, "event_categories", |c| EventCategory::parse(c).is_some(), EventCategory::expected);
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
        changes.webhook_secret = fields.string("webhook_secret", 1024);
        if let Some(secret) = &changes.webhook_secret
            && secret.len() < 8
        {
            fields.fail("webhook_secret", "must be at least 8 characters (or leave it out to get one)");
        }
    }
    changes.enabled = match fields.get("enabled") {
        None => None,
        Some(Value::Bool(enabled)) => Some(*enabled),
        Some(_) => {
            fields.fail("enabled", "must be true or false");
            None
        }
    };
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

fn valid_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    !pattern.trim().is_empty()
        && pattern.chars().count() <= 255
        && tokens.iter().enumerate().all(|(index, token)| match *token {
            ">" => index + 1 == tokens.len(),
            "*" => true,
            token => !token.is_empty() && !token.contains('*') && !token.contains('>'),
        })
}

fn enum_list(
    fields: &mut Fields<'_>,
    name: &str,
    valid: fn(&str) -> bool,
    expected: fn() -> String,
) -> Option<Option<Vec<String>>> {
    if !fields.body.contains_key(name) {
        return None;
    }
    match fields.get(name) {
        None => Some(None),
        Some(Value::Array(items)) => {
            let values: Option<Vec<String>> =
                items.iter().map(|item| item.as_str().filter(|v| valid(v)).map(str::to_owned)).collect();
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

const COLUMNS: &str = "subscription_id, subscriber_name, subscriber_type, event_types, event_sources, event_categories, \
                       callback_url, webhook_secret, enabled, retry_policy, rate_limit_per_second, failing_since, \
                       disabled_reason, created_at, updated_at";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a subscription with id {0} already exists")]
    IdTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub async fn create(pool: &PgPool, changes: Changes) -> Result<Subscription, StoreError> {
    let id = changes.subscription_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let sql = format!(
        "INSERT INTO event.event_subscriptions (subscription_id, subscriber_name, subscriber_type, event_types, \
             event_sources, event_categories, callback_url, webhook_secret, enabled, retry_policy, rate_limit_per_second) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
    );
    let created = sqlx::query_as::<_, Subscription>(sqlx::AssertSqlSafe(sql))
        .bind(&id)
        .bind(changes.subscriber_name.unwrap_or_else(|| "default_subscriber".to_owned()))
        .bind(changes.subscriber_type.unwrap_or_else(|| "service".to_owned()))
        .bind(changes.event_types.unwrap_or_default())
        .bind(changes.event_sources.flatten())
        .bind(changes.event_categories.flatten())
        .bind(changes.callback_url.flatten())
        .bind(changes.webhook_secret.unwrap_or_else(new_secret))
        .bind(changes.enabled.unwrap_or(true))
        .bind(Json(changes.retry_policy.unwrap_or_default()))
        .bind(changes.rate_limit_per_second.flatten())
        .fetch_one(pool)
        .await;
    match created {
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(StoreError::IdTaken(id)),
        other => Ok(other?),
    }
}

/// Applies a PATCH; `None` when there is no such subscription. Enabling clears the failure
/// record.
pub async fn update(pool: &PgPool, id: &str, changes: Changes) -> Result<Option<Subscription>, sqlx::Error> {
    let sql = format!(
        "UPDATE event.event_subscriptions SET \
             subscriber_name = COALESCE($2, subscriber_name), subscriber_type = COALESCE($3, subscriber_type), \
             event_types = COALESCE($4, event_types), \
             event_sources = CASE WHEN $5 THEN $6 ELSE event_sources END, \
             event_categories = CASE WHEN $7 THEN $8 ELSE event_categories END, \
             callback_url = CASE WHEN $9 THEN $10 ELSE callback_url END, \
             enabled = COALESCE($11, enabled), retry_policy = COALESCE($12, retry_policy), \
             rate_limit_per_second = CASE WHEN $13 THEN $14 ELSE rate_limit_per_second END, \
             failing_since = CASE WHEN $11 THEN NULL ELSE failing_since END, \
             disabled_reason = CASE WHEN $11 THEN NULL ELSE disabled_reason END, \
             updated_at = now() \
         WHERE subscription_id = $1 RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(changes.subscriber_name)
        .bind(changes.subscriber_type)
        .bind(changes.event_types)
        .bind(changes.event_sources.is_some())
        .bind(changes.event_sources.flatten())
        .bind(changes.event_categories.is_some())
        .bind(changes.event_categories.flatten())
        .bind(changes.callback_url.is_some())
        .bind(changes.callback_url.flatten())
        .bind(changes.enabled)
        .bind(changes.retry_policy.map(Json))
        .bind(changes.rate_limit_per_second.is_some())
        .bind(changes.rate_limit_per_second.flatten())
        .fetch_optional(pool)
        .await
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Subscription>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_subscriptions WHERE subscription_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await
}

pub async fn list(pool: &PgPool) -> Result<Vec<Subscription>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_subscriptions ORDER BY created_at, subscription_id");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await
}

pub async fn delete(pool: &PgPool, id: &str) -> Result<bool, sqlx::Error> {
    let deleted =
        sqlx::query("DELETE FROM event.event_subscriptions WHERE subscription_id = $1").bind(id).execute(pool).await?;
    Ok(deleted.rows_affected() == 1)
}

/// Delivery counts of one subscription.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct DeliveryStats {
    pub delivered: i64,
    pub failed: i64,
    pub retrying: i64,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// Delivery counts per subscription (events whose latest attempt has each status).
pub async fn stats(pool: &PgPool) -> Result<HashMap<String, DeliveryStats>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        subscription_id: String,
        #[sqlx(flatten)]
        stats: DeliveryStats,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT subscription_id, count(*) FILTER (WHERE status = 'delivered') AS delivered, \
                count(*) FILTER (WHERE status IN ('failed', 'refused')) AS failed, \
                count(*) FILTER (WHERE status = 'retry') AS retrying, max(attempted_at) AS last_attempt_at \
         FROM (SELECT DISTINCT ON (subscription_id, event_id) subscription_id, status, attempted_at \
               FROM event.delivery_attempts ORDER BY subscription_id, event_id, attempt DESC) latest \
         GROUP BY subscription_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|row| (row.subscription_id, row.stats)).collect())
}

/// One row of the delivery log.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Attempt {
    pub subscription_id: String,
    pub event_id: uuid::Uuid,
    pub webhook_id: String,
    pub attempt: i32,
    pub status: String,
    pub status_code: Option<i32>,
    pub duration_ms: f64,
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempted_at: DateTime<Utc>,
}

/// The delivery log of a subscription, newest first.
pub async fn attempts(pool: &PgPool, id: &str, limit: i64, offset: i64) -> Result<(Vec<Attempt>, i64), sqlx::Error> {
    let rows = sqlx::query_as(
        "SELECT subscription_id, event_id, webhook_id, attempt, status, status_code, duration_ms, error, \
                next_attempt_at, attempted_at \
         FROM event.delivery_attempts WHERE subscription_id = $1 \
         ORDER BY attempted_at DESC, attempt_id DESC LIMIT $2 OFFSET $3",
    )
    .bind(id)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM event.delivery_attempts WHERE subscription_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok((rows, total))
}

/// Events of a subscription whose latest attempt in the window failed (or was refused or
/// skipped): what `recover` queues again.
pub async fn failed_in_window(
    pool: &PgPool,
    id: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT event_id FROM ( \
             SELECT DISTINCT ON (event_id) event_id, status, attempted_at FROM event.delivery_attempts \
             WHERE subscription_id = $1 ORDER BY event_id, attempt DESC \
         ) latest WHERE status IN ('failed', 'refused', 'skipped') AND attempted_at BETWEEN $2 AND $3 \
         ORDER BY attempted_at LIMIT 10000",
    )
    .bind(id)
    .bind(since)
    .bind(until)
    .fetch_all(pool)
    .await
}

/// Tells every dispatcher and sender to reload. Best effort: they also reload on a timer.
pub async fn announce_change(bus: &Bus) {
    if let Err(error) = bus.notify(subject::SUBSCRIPTIONS_CHANGED.to_owned(), bytes::Bytes::new()).await {
        tracing::warn!(error = %error, "cannot announce a subscription change; stages pick it up on their next reload");
    }
}

/// Publishes a domain event about a subscription on EVENT_SERVICE; failures are logged.
pub async fn announce(bus: &Bus, subject: &str, message_id: String, body: Map<String, Value>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
    let payload = bytes::Bytes::from(Value::Object(body).to_string());
    let message = crate::bus::Outgoing { subject: subject.to_owned(), headers, payload };
    if let Err(error) = bus.publish(message).await {
        tracing::warn!(error = %error, subject, "cannot announce a subscription event");
    }
}

/// Every subscription, by id, as the stages see them.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub by_id: HashMap<String, Arc<Subscription>>,
}

impl Snapshot {
    /// Enabled subscriptions with a callback URL that take this event.
    pub fn matching<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = &'a Arc<Subscription>> + 'a {
        self.by_id.values().filter(move |subscription| subscription.deliverable() && subscription.matches(event))
    }

    /// Whether any subscription would take any event.
    pub fn delivers(&self) -> bool {
        self.by_id.values().any(|subscription| subscription.deliverable())
    }
}

/// The live subscription list of one process.
pub struct Registry {
    pool: PgPool,
    current: RwLock<Arc<Snapshot>>,
}

impl Registry {
    pub async fn load(pool: PgPool) -> Result<Arc<Self>, sqlx::Error> {
        let registry = Arc::new(Self { pool, current: RwLock::new(Arc::default()) });
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
        let by_id = list(&self.pool)
            .await?
            .into_iter()
            .map(|subscription| (subscription.subscription_id.clone(), Arc::new(subscription)))
            .collect();
        let snapshot = Arc::new(Snapshot { by_id });
        match self.current.write() {
            Ok(mut current) => *current = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        Ok(())
    }

    /// Reloads on every change notification and every [`RELOAD_EVERY`], until cancelled.
    pub async fn watch(self: Arc<Self>, bus: Bus, token: CancellationToken) {
        let mut changes = bus.client().subscribe(subject::SUBSCRIPTIONS_CHANGED).await.ok();
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
                tracing::warn!(error = %error, "cannot reload the subscriptions");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_are_validated() {
        let guard = Guard::default();
        let ok = json!({"event_types": ["user.*"], "callback_url": "https://hooks.example.com/in",
                        "event_sources": ["backend"], "retry_policy": {"max_retries": 2, "backoff_seconds": [0.5]}});
        let changes = parse_changes(&ok, &guard, true).unwrap();
        assert_eq!(changes.retry_policy.unwrap().delay(3), Duration::from_millis(500));
        let fields = |body: Value| -> Vec<String> {
            parse_changes(&body, &guard, true).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields(json!({})), ["event_types"]);
        assert_eq!(fields(json!({"event_types": []})), ["event_types"]);
        assert_eq!(fields(json!({"event_types": ["a"], "callback_url": "ftp://x"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "callback_url": "http://169.254.169.254/"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "subscriber_type": "webhook"})), ["callback_url"]);
        assert_eq!(fields(json!({"event_types": ["a"], "event_sources": ["mars"]})), ["event_sources"]);
        assert_eq!(
            fields(json!({"event_types": ["a"], "retry_policy": {"max_retries": -1, "backoff_seconds": [0]}})),
            ["retry_policy.max_retries", "retry_policy.backoff_seconds"]
        );
        assert_eq!(fields(json!({"event_types": ["a"], "rate_limit_per_second": 0})), ["rate_limit_per_second"]);
        assert!(new_secret().starts_with("whsec_"));
        assert_ne!(new_secret(), new_secret());
    }
}
