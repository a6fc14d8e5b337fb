//! Subscriptions: what they are, how they are stored (`event.event_subscriptions`), which
//! events they take, and the set dispatchers and senders deliver from.
//!
//! Reads and writes `event.event_subscriptions`. Guarantees: a secret leaves the service only
//! in the create answer, the rotate answer and through the dedicated secret endpoint
//! (everywhere else it is masked, and `Debug` redacts it); after a rotation the replaced
//! secret signs beside the new one until its expiry, then never again.

mod request;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::types::Json;

pub use request::{Changes, parse_changes};

use super::{Registry, Source};
use crate::domain::{Event, EventCategory, EventSource, EventTypePattern, Secret};
use crate::wire::subjects;

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
    pub event_types: Vec<EventTypePattern>,
    pub event_sources: Option<Vec<EventSource>>,
    pub event_categories: Option<Vec<EventCategory>>,
    pub callback_url: Option<String>,
    #[serde(serialize_with = "mask")]
    pub webhook_secret: Secret,
    /// The secret a rotation replaced: deliveries carry its signature too until
    /// `previous_secret_expires_at`.
    #[serde(skip)]
    pub previous_secret: Option<Secret>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub enabled: bool,
    pub retry_policy: Json<RetryPolicy>,
    pub rate_limit_per_second: Option<i32>,
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn mask<S: serde::Serializer>(_secret: &Secret, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("whsec_********")
}

impl Subscription {
    /// The secrets a delivery is signed with at `now`: the current one, and the one a rotation
    /// replaced while its overlap lasts.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let previous = match (&self.previous_secret, self.previous_secret_expires_at) {
            (Some(previous), Some(expires_at)) if now < expires_at => Some(previous.expose()),
            _ => None,
        };
        std::iter::once(self.webhook_secret.expose()).chain(previous).collect()
    }

    /// Enabled, with a callback URL to deliver to.
    pub fn deliverable(&self) -> bool {
        self.enabled && self.callback_url.is_some()
    }

    /// Whether this subscription takes an event of this type (its patterns only).
    pub fn takes_type(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|pattern| pattern.matches(event_type))
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.takes_type(&event.event_type)
            && self.event_sources.as_ref().is_none_or(|sources| sources.contains(&event.event_source))
            && self.event_categories.as_ref().is_none_or(|categories| categories.contains(&event.event_category))
    }
}

/// A new secret: `whsec_` and 32 random bytes in base64, as Standard Webhooks has them.
pub fn new_secret() -> Secret {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    Secret::new(format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key)))
}

const COLUMNS: &str = "subscription_id, subscriber_name, subscriber_type, event_types, event_sources, event_categories, \
                       callback_url, webhook_secret, previous_secret, previous_secret_expires_at, enabled, \
                       retry_policy, rate_limit_per_second, failing_since, disabled_reason, created_at, updated_at";

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

/// Replaces the secret with `new`; the replaced one keeps signing for `overlap` (a rotation
/// during an overlap ends the older secret's overlap at once). `None` when there is no such
/// subscription.
pub async fn rotate_secret(
    pool: &PgPool,
    id: &str,
    new: &Secret,
    overlap: Duration,
) -> Result<Option<Subscription>, sqlx::Error> {
    let sql = format!(
        "UPDATE event.event_subscriptions SET previous_secret = webhook_secret, \
             previous_secret_expires_at = now() + make_interval(secs => $3), webhook_secret = $2, updated_at = now() \
         WHERE subscription_id = $1 RETURNING {COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(new).bind(overlap.as_secs_f64()).fetch_optional(pool).await
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Subscription>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_subscriptions WHERE subscription_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await
}

/// Every subscription, from a pool or from inside a transaction.
pub async fn list<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<Vec<Subscription>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_subscriptions ORDER BY created_at, subscription_id");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(db).await
}

pub async fn delete(pool: &PgPool, id: &str) -> Result<bool, sqlx::Error> {
    let deleted =
        sqlx::query("DELETE FROM event.event_subscriptions WHERE subscription_id = $1").bind(id).execute(pool).await?;
    Ok(deleted.rows_affected() == 1)
}

/// Every subscription, by id, as the stages see them.
#[derive(Debug, Default)]
pub struct SubscriptionSet {
    pub by_id: HashMap<String, Arc<Subscription>>,
    /// Each subscription's callback URL, parsed once per load instead of once per delivery;
    /// absent when it has none or it is not a URL.
    callbacks: HashMap<String, reqwest::Url>,
}

impl SubscriptionSet {
    pub fn new(subscriptions: impl IntoIterator<Item = Subscription>) -> Self {
        let by_id: HashMap<String, Arc<Subscription>> = subscriptions
            .into_iter()
            .map(|subscription| (subscription.subscription_id.clone(), Arc::new(subscription)))
            .collect();
        let callbacks = by_id
            .iter()
            .filter_map(|(id, subscription)| {
                let url = reqwest::Url::parse(subscription.callback_url.as_deref()?).ok()?;
                Some((id.clone(), url))
            })
            .collect();
        Self { by_id, callbacks }
    }

    /// The subscription's callback URL, parsed; `None` when it has none or it is not a URL.
    pub fn callback(&self, subscription_id: &str) -> Option<&reqwest::Url> {
        self.callbacks.get(subscription_id)
    }

    /// Enabled subscriptions with a callback URL that take this event.
    pub fn matching<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = &'a Arc<Subscription>> + 'a {
        self.by_id.values().filter(move |subscription| subscription.deliverable() && subscription.matches(event))
    }

    /// Whether any subscription would take any event.
    pub fn delivers(&self) -> bool {
        self.by_id.values().any(|subscription| subscription.deliverable())
    }
}

/// Subscriptions as a [`Source`] of the live registry.
pub struct Subscriptions;

impl Source for Subscriptions {
    type Set = SubscriptionSet;
    const NAME: &'static str = "subscriptions";
    const CHANGED: &'static str = subjects::SUBSCRIPTIONS_CHANGED;

    async fn load(&self, pool: &PgPool) -> Result<SubscriptionSet, sqlx::Error> {
        Ok(SubscriptionSet::new(list(pool).await?))
    }
}

/// The live subscription set of one process.
pub type SubscriptionRegistry = Registry<Subscriptions>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn secrets_are_new_each_time_and_masked() {
        let secret = new_secret();
        assert!(secret.expose().starts_with("whsec_"));
        assert_ne!(secret, new_secret());
        assert_eq!(format!("{secret:?}"), "[redacted]");
    }

    /// A subscription with this id and callback URL, enabled, every other field empty.
    pub(crate) fn subscription(id: &str, callback_url: Option<&str>) -> Subscription {
        let now = Utc::now();
        Subscription {
            subscription_id: id.into(),
            subscriber_name: "n".into(),
            subscriber_type: "service".into(),
            event_types: vec![],
            event_sources: None,
            event_categories: None,
            callback_url: callback_url.map(str::to_owned),
            webhook_secret: Secret::new("new-secret"),
            previous_secret: None,
            previous_secret_expires_at: None,
            enabled: true,
            retry_policy: Json(RetryPolicy::default()),
            rate_limit_per_second: None,
            failing_since: None,
            disabled_reason: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn a_set_parses_each_callback_url_once() {
        let set = SubscriptionSet::new([
            subscription("a", Some("https://hooks.example.com/in?x=1")),
            subscription("b", Some("not a url")),
            subscription("c", None),
        ]);
        assert_eq!(set.callback("a").map(reqwest::Url::as_str), Some("https://hooks.example.com/in?x=1"));
        assert_eq!((set.callback("b"), set.callback("c"), set.callback("gone")), (None, None, None));
        assert_eq!(set.by_id.len(), 3, "a subscription without a usable URL is still in the set");
    }

    #[test]
    fn a_replaced_secret_signs_until_its_overlap_ends() {
        let now = Utc::now();
        let mut subscription = subscription("s", None);
        assert_eq!(subscription.signing_secrets(now), ["new-secret"]);
        subscription.previous_secret = Some(Secret::new("old-secret"));
        subscription.previous_secret_expires_at = Some(now + chrono::Duration::seconds(60));
        assert_eq!(subscription.signing_secrets(now), ["new-secret", "old-secret"]);
        assert_eq!(subscription.signing_secrets(now + chrono::Duration::seconds(60)), ["new-secret"]);
        let shown = serde_json::to_value(&subscription).expect("serializes");
        assert!(shown.get("previous_secret").is_none(), "the old secret is never shown");
        assert!(shown["previous_secret_expires_at"].is_string());
    }
}
