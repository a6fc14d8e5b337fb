//! Subscription delivery: the dispatcher (EVENTS → DELIVERIES) and the sender (DELIVERIES →
//! subscriber webhooks).
//!
//! The dispatcher reads the durable `dispatcher` consumer of EVENTS and queues one message per
//! (event, matching subscription) on `deliveries.{subscription_id}`, deduplicated by
//! `Nats-Msg-Id` = `{event_id}.{subscription_id}`, and acks once every PubAck is in.
//!
//! The sender reads the durable `sender` consumer of DELIVERIES and POSTs the event JSON with
//! Standard Webhooks headers (`webhook-id` is the same on every attempt). Guarantees:
//! - 2xx: delivered. 5xx, 408, timeouts and connection errors: retried on the subscription's
//!   schedule plus jitter (NAK with delay); 429 and 503 wait for `Retry-After` when given. 410
//!   disables the subscription. Other 4xx fail at once. Past the last retry: failed, recorded
//!   and dead-lettered (`deadletter.sender`).
//! - Every attempt is recorded in `event.delivery_attempts` before its message is settled.
//! - A delivery for a deleted subscription is dropped; for a disabled one it is recorded as
//!   skipped (so `recover` can queue it again); a refused address is recorded, not retried.
//! - `rate_limit_per_second` holds per sender process (a delivery over it waits in JetStream).
//! - A subscription whose deliveries all fail for the configured window is disabled and
//!   `event.subscription.disabled` is announced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::Message;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{Bus, BusError, Outgoing};
use crate::callback::{self, Guard};
use crate::consume::{BatchHandler, ConsumeLoop, Outcome};
use crate::model::Event;
use crate::persister::decode_message;
use crate::settings::{CallbackArgs, DispatcherArgs};
use crate::subject;
use crate::subscriptions::{self, Registry, Subscription};

pub const DISPATCH_STAGE: &str = "dispatcher";
pub const SEND_STAGE: &str = "sender";
const SUBSCRIPTION_HEADER: &str = "Event-Service-Subscription";
const EVENT_ID_HEADER: &str = "Event-Service-Event-Id";
/// Attempts already made when this delivery was queued (a resend starts a new budget).
const BASE_HEADER: &str = "Event-Service-Attempt-Base";
const OUTAGE_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
const MAX_ERROR_CHARS: usize = 500;

/// The delivery message of one event for one subscription.
pub fn delivery_message(
    subscription_id: &str,
    event_id: Uuid,
    payload: Bytes,
    base: i32,
    message_id: &str,
) -> Outgoing {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    headers.insert(SUBSCRIPTION_HEADER, subscription_id);
    headers.insert(EVENT_ID_HEADER, event_id.to_string().as_str());
    headers.insert(BASE_HEADER, base.to_string().as_str());
    Outgoing { subject: subject::delivery_subject(subscription_id), headers, payload }
}

/// Dispatcher and sender of one process, sharing the subscription list.
pub struct Dispatching {
    dispatch: ConsumeLoop,
    dispatcher: Dispatcher,
    send: ConsumeLoop,
    sender: Sender,
    registry: Arc<Registry>,
    bus: Bus,
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot load the subscriptions")]
    Database(#[from] sqlx::Error),
    #[error("cannot build the HTTP client")]
    Http(#[from] reqwest::Error),
}

impl Dispatching {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        settings: &DispatcherArgs,
        callbacks: &CallbackArgs,
    ) -> Result<Self, DispatchError> {
        let registry = Registry::load(pool.clone()).await?;
        let guard = Guard::new(callbacks);
        let http = guard.client(Duration::from_millis(settings.delivery_timeout_ms))?;
        let dispatch = ConsumeLoop {
            stage: DISPATCH_STAGE,
            bus: bus.clone(),
            consumer: bus.consumer("EVENTS", DISPATCH_STAGE).await?,
            max_batch: 500,
            group: None,
        };
        let send = ConsumeLoop {
            stage: SEND_STAGE,
            bus: bus.clone(),
            consumer: bus.consumer("DELIVERIES", SEND_STAGE).await?,
            max_batch: settings.sender_concurrency.max(1) * 2,
            group: None,
        };
        let dispatcher = Dispatcher { bus: bus.clone(), registry: registry.clone() };
        let sender = Sender {
            pool,
            bus: bus.clone(),
            registry: registry.clone(),
            guard,
            http,
            settings: settings.clone(),
            limits: Mutex::new(HashMap::new()),
        };
        Ok(Self { dispatch, dispatcher, send, sender, registry, bus })
    }

    pub async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(stage = DISPATCH_STAGE, "dispatcher and sender running");
        let watch = tokio::spawn(self.registry.clone().watch(self.bus.clone(), token.clone()));
        let (dispatched, sent) = tokio::join!(
            self.dispatch.run(&self.dispatcher, token.clone()),
            self.send.run(&self.sender, token.clone())
        );
        watch.abort();
        dispatched?;
        sent?;
        Ok(())
    }
}

struct Dispatcher {
    bus: Bus,
    registry: Arc<Registry>,
}

impl BatchHandler for Dispatcher {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let snapshot = self.registry.snapshot();
        if !snapshot.delivers() {
            // Nobody to deliver to: nothing to decode either.
            return vec![Outcome::Ack; batch.len()];
        }
        let mut outgoing = Vec::new();
        let mut owners = Vec::new();
        for (position, message) in batch.iter().enumerate() {
            let (seq, published) = match message.info() {
                Ok(info) => (info.stream_sequence, info.published),
                Err(_) => (0, Utc::now()),
            };
            // Undecodable events are the persister's to dead-letter.
            let Ok(incoming) =
                decode_message(&message.subject, message.headers.as_ref(), &message.payload, seq, published)
            else {
                continue;
            };
            let mut matching = snapshot.matching(&incoming.event).peekable();
            if matching.peek().is_none() {
                continue;
            }
            let Ok(payload) = serde_json::to_vec(&incoming.event) else { continue };
            let payload = Bytes::from(payload);
            for subscription in matching {
                let id = &subscription.subscription_id;
                let message_id = format!("{}.{id}", incoming.event.event_id);
                outgoing.push(delivery_message(id, incoming.event.event_id, payload.clone(), 0, &message_id));
                owners.push(position);
            }
        }
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        for (owner, result) in owners.into_iter().zip(self.bus.publish_all(outgoing).await) {
            if let Err(error) = result {
                tracing::warn!(stage = DISPATCH_STAGE, error = %error, "cannot queue a delivery; retrying the event");
                outcomes[owner] = Outcome::Retry { after: OUTAGE_RETRY };
            }
        }
        outcomes
    }
}

struct Sender {
    pool: PgPool,
    bus: Bus,
    registry: Arc<Registry>,
    guard: Guard,
    http: reqwest::Client,
    settings: DispatcherArgs,
    limits: Mutex<HashMap<String, Bucket>>,
}

/// A token bucket holding one token: deliveries are spaced at least `1/rate` apart.
struct Bucket {
    rate: f64,
    next_free: Instant,
}

/// What one delivery attempt came to.
struct Attempted {
    row: Option<Value>,
    outcome: Outcome,
    /// The subscription to disable, and why.
    disable: Option<(String, String)>,
    delivered: Option<String>,
    failed: Option<String>,
}

impl BatchHandler for Sender {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let snapshot = self.registry.snapshot();
        let mut keys = Vec::with_capacity(batch.len());
        for message in batch {
            let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
            let event_id = header(EVENT_ID_HEADER).and_then(|id| Uuid::parse_str(&id).ok());
            let base: i32 = header(BASE_HEADER).and_then(|base| base.parse().ok()).unwrap_or(0);
            keys.push(
                header(SUBSCRIPTION_HEADER).zip(event_id).map(|(subscription, event)| (subscription, event, base)),
            );
        }
        let (subscription_ids, event_ids): (Vec<String>, Vec<Uuid>) =
            keys.iter().flatten().map(|(subscription, event, _)| (subscription.clone(), *event)).unzip();
        let prior: HashMap<(String, Uuid), i32> = match sqlx::query_as::<_, (String, Uuid, i32)>(
            "SELECT subscription_id, event_id, max(attempt) FROM event.delivery_attempts \
             WHERE (subscription_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[])) GROUP BY 1, 2",
        )
        .bind(&subscription_ids)
        .bind(&event_ids)
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows.into_iter().map(|(s, e, attempt)| ((s, e), attempt)).collect(),
            Err(error) => {
                tracing::warn!(stage = SEND_STAGE, error = %error, "cannot read earlier attempts; retrying the batch");
                return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
            }
        };
        let work: Vec<_> = batch
            .iter()
            .zip(&keys)
            .map(|(message, key)| {
                let snapshot = &snapshot;
                let prior = &prior;
                async move {
                    let Some((subscription_id, event_id, base)) = key else {
                        return Attempted {
                            row: None,
                            outcome: Outcome::reject(
                                "invalid_delivery",
                                "a delivery needs its subscription and event id headers",
                            ),
                            disable: None,
                            delivered: None,
                            failed: None,
                        };
                    };
                    let attempt = prior.get(&(subscription_id.clone(), *event_id)).copied().unwrap_or(0) + 1;
                    match snapshot.by_id.get(subscription_id) {
                        None => {
                            Attempted { row: None, outcome: Outcome::Ack, disable: None, delivered: None, failed: None }
                        }
                        Some(subscription) => {
                            self.deliver(subscription, *event_id, attempt, attempt - base - 1, &message.payload).await
                        }
                    }
                }
            })
            .collect();
        let attempted: Vec<Attempted> =
            futures::stream::iter(work).buffered(self.settings.sender_concurrency.max(1)).collect().await;
        if let Err(error) = self.record(&attempted).await {
            tracing::warn!(stage = SEND_STAGE, error = %error, "cannot record deliveries; retrying the batch");
            return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
        }
        attempted.into_iter().map(|attempted| attempted.outcome).collect()
    }
}

impl Sender {
    /// One attempt (or the decision not to make one).
    async fn deliver(
        &self,
        subscription: &Subscription,
        event_id: Uuid,
        attempt: i32,
        retries_used: i32,
        body: &Bytes,
    ) -> Attempted {
        let id = subscription.subscription_id.clone();
        let webhook_id = format!("msg_{}", event_id.simple());
        let row = |status: &str,
                   code: Option<u16>,
                   duration: f64,
                   error: Option<String>,
                   next: Option<chrono::DateTime<Utc>>| {
            json!({"subscription_id": id, "event_id": event_id, "webhook_id": webhook_id, "attempt": attempt,
                   "status": status, "status_code": code, "duration_ms": duration, "error": error,
                   "next_attempt_at": next})
        };
        let skipped = |reason: &str| Attempted {
            row: Some(row("skipped", None, 0.0, Some(reason.to_owned()), None)),
            outcome: Outcome::Ack,
            disable: None,
            delivered: None,
            failed: None,
        };
        if !subscription.enabled {
            return skipped("subscription disabled");
        }
        let Some(url) = subscription.callback_url.as_deref().and_then(|url| reqwest::Url::parse(url).ok()) else {
            return skipped("subscription has no callback_url");
        };
        if let Some(wait) = self.rate_limited(subscription) {
            return Attempted {
                row: None,
                outcome: Outcome::Retry { after: wait },
                disable: None,
                delivered: None,
                failed: None,
            };
        }
        if let Err(error) = self.guard.check_resolved(&url).await {
            let reason = format!("callback_url {error}");
            return Attempted {
                row: Some(row("refused", None, 0.0, Some(reason.clone()), None)),
                outcome: Outcome::reject("callback_refused", reason),
                disable: None,
                delivered: None,
                failed: Some(id.clone()),
            };
        }
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("event-service-subscription", id.as_str())
            .body(body.clone());
        for (name, value) in callback::sign(&subscription.webhook_secret, &webhook_id, Utc::now().timestamp(), body) {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let sent = request.send().await;
        let duration = started.elapsed().as_secs_f64() * 1000.0;
        let (code, retry_after, error) = match sent {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|text| text.trim().parse::<f64>().ok())
                    .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                    .map(|seconds| Duration::from_secs_f64(seconds).min(MAX_RETRY_AFTER));
                if status.is_success() {
                    return Attempted {
                        row: Some(row("delivered", Some(status.as_u16()), duration, None, None)),
                        outcome: Outcome::Ack,
                        disable: None,
                        delivered: Some(id.clone()),
                        failed: None,
                    };
                }
                let text = response.text().await.unwrap_or_default();
                (Some(status.as_u16()), retry_after, clip(&format!("HTTP {}: {}", status.as_u16(), text.trim())))
            }
            Err(error) => (None, None, clip(&describe(&error))),
        };
        let retryable = match code {
            None | Some(408 | 429) => true,
            Some(code) => code >= 500,
        };
        if code == Some(410) {
            let reason = format!("the endpoint answered 410 Gone on {}", Utc::now().to_rfc3339());
            return Attempted {
                row: Some(row("failed", code, duration, Some(error.clone()), None)),
                outcome: Outcome::reject("endpoint_gone", error),
                disable: Some((id.clone(), reason)),
                delivered: None,
                failed: Some(id.clone()),
            };
        }
        let policy = &subscription.retry_policy.0;
        if retryable && retries_used < policy.max_retries as i32 {
            let scheduled = jitter(policy.delay(retries_used as u32 + 1));
            let wait = match (code, retry_after) {
                (Some(429 | 503), Some(retry_after)) => retry_after,
                _ => scheduled,
            };
            let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            return Attempted {
                row: Some(row("retry", code, duration, Some(error), Some(next))),
                outcome: Outcome::Retry { after: wait },
                disable: None,
                delivered: None,
                failed: Some(id.clone()),
            };
        }
        let code_name = if retryable { "delivery_failed" } else { "delivery_rejected" };
        Attempted {
            row: Some(row("failed", code, duration, Some(error.clone()), None)),
            outcome: Outcome::reject(code_name, format!("subscription {id}, attempt {attempt}: {error}")),
            disable: None,
            delivered: None,
            failed: Some(id.clone()),
        }
    }

    /// How long to wait before this subscription may get another delivery; `None`: now.
    fn rate_limited(&self, subscription: &Subscription) -> Option<Duration> {
        let rate = f64::from(subscription.rate_limit_per_second?);
        let mut limits = self.limits.lock().ok()?;
        let now = Instant::now();
        let bucket = limits.entry(subscription.subscription_id.clone()).or_insert(Bucket { rate, next_free: now });
        bucket.rate = rate;
        if bucket.next_free > now {
            // Wait a little past the free slot, spread so waiting deliveries do not all return at once.
            return Some(jitter(bucket.next_free - now + Duration::from_millis(5)));
        }
        bucket.next_free = now + Duration::from_secs_f64(1.0 / bucket.rate);
        None
    }

    /// Records the attempts, keeps the failure record of each subscription and disables the
    /// ones that asked for it or have failed too long; one transaction.
    async fn record(&self, attempted: &[Attempted]) -> Result<(), sqlx::Error> {
        let rows: Vec<&Value> = attempted.iter().filter_map(|a| a.row.as_ref()).collect();
        if rows.is_empty() {
            return Ok(());
        }
        let delivered: Vec<&str> = attempted.iter().filter_map(|a| a.delivered.as_deref()).collect();
        let failed: Vec<&str> = attempted
            .iter()
            .filter_map(|a| a.failed.as_deref())
            .filter(|id| !delivered.contains(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO event.delivery_attempts (subscription_id, event_id, webhook_id, attempt, status, status_code, \
                 duration_ms, error, next_attempt_at) \
             SELECT subscription_id, event_id, webhook_id, attempt, status, status_code, duration_ms, error, next_attempt_at \
             FROM jsonb_to_recordset($1) AS a(subscription_id text, event_id uuid, webhook_id text, attempt int, \
                  status text, status_code int, duration_ms float8, error text, next_attempt_at timestamptz) \
             ON CONFLICT (subscription_id, event_id, attempt) DO UPDATE SET status = EXCLUDED.status, \
                 status_code = EXCLUDED.status_code, duration_ms = EXCLUDED.duration_ms, error = EXCLUDED.error, \
                 next_attempt_at = EXCLUDED.next_attempt_at, attempted_at = now()",
        )
        .bind(sqlx::types::Json(&rows))
        .execute(&mut *tx)
        .await?;
        if !delivered.is_empty() {
            sqlx::query(
                "UPDATE event.event_subscriptions SET failing_since = NULL \
                 WHERE subscription_id = ANY($1) AND failing_since IS NOT NULL",
            )
            .bind(&delivered)
            .execute(&mut *tx)
            .await?;
        }
        let mut disable: Vec<(String, String)> = attempted.iter().filter_map(|a| a.disable.clone()).collect();
        if !failed.is_empty() {
            sqlx::query(
                "UPDATE event.event_subscriptions SET failing_since = now() \
                 WHERE subscription_id = ANY($1) AND failing_since IS NULL",
            )
            .bind(&failed)
            .execute(&mut *tx)
            .await?;
            let window = self.settings.disable_after_secs as f64;
            let stale: Vec<(String, chrono::DateTime<Utc>)> = sqlx::query_as(
                "SELECT subscription_id, failing_since FROM event.event_subscriptions \
                 WHERE subscription_id = ANY($1) AND enabled AND failing_since < now() - make_interval(secs => $2)",
            )
            .bind(&failed)
            .bind(window)
            .fetch_all(&mut *tx)
            .await?;
            disable.extend(
                stale
                    .into_iter()
                    .map(|(id, since)| (id, format!("every delivery has failed since {}", since.to_rfc3339()))),
            );
        }
        let mut disabled = Vec::new();
        for (id, reason) in &disable {
            let changed = sqlx::query(
                "UPDATE event.event_subscriptions SET enabled = false, disabled_reason = $2, updated_at = now() \
                 WHERE subscription_id = $1 AND enabled",
            )
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            if changed.rows_affected() == 1 {
                disabled.push((id.clone(), reason.clone()));
            }
        }
        tx.commit().await?;
        for (id, reason) in disabled {
            tracing::warn!(stage = SEND_STAGE, subscription_id = %id, %reason, "subscription disabled");
            let mut body = Map::new();
            body.insert("subscription_id".into(), json!(id));
            body.insert("reason".into(), json!(reason));
            body.insert("timestamp".into(), json!(Utc::now()));
            subscriptions::announce(
                &self.bus,
                subject::EVENT_SUBSCRIPTION_DISABLED,
                format!("disabled.{id}.{}", Uuid::now_v7()),
                body,
            )
            .await;
            subscriptions::announce_change(&self.bus).await;
        }
        Ok(())
    }
}

/// Up to 20 % more, so retries of many deliveries spread out.
fn jitter(delay: Duration) -> Duration {
    let fraction = (Uuid::new_v4().as_u128() % 1000) as f64 / 5000.0;
    delay.mul_f64(1.0 + fraction)
}

fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() { format!("timed out: {text}") } else { text }
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_ERROR_CHARS).collect()
}

/// Queues an event again for one subscription (resend, recover), with a fresh retry budget.
pub async fn requeue(bus: &Bus, pool: &PgPool, subscription_id: &str, events: &[Event]) -> Result<usize, BusError> {
    let mut messages = Vec::with_capacity(events.len());
    for event in events {
        let base: i32 = sqlx::query_scalar(
            "SELECT COALESCE(max(attempt), 0) FROM event.delivery_attempts WHERE subscription_id = $1 AND event_id = $2",
        )
        .bind(subscription_id)
        .bind(event.event_id)
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        let Ok(payload) = serde_json::to_vec(event) else { continue };
        let message_id = format!("{}.{subscription_id}.resend.{}", event.event_id, Uuid::now_v7());
        messages.push(delivery_message(subscription_id, event.event_id, Bytes::from(payload), base, &message_id));
    }
    let mut queued = 0;
    for result in bus.publish_all(messages).await {
        result?;
        queued += 1;
    }
    Ok(queued)
}
