//! The sender's I/O shell: reads earlier attempts, sends each delivery through the one
//! callback path, records the attempts, announces disabled subscriptions. The decisions are
//! [`super::verdict`]'s.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::STAGE;
use super::rate::Limits;
use super::verdict::{self, Gate};
use crate::domain::DeliveryStatus;
use crate::infra::bus::Bus;
use crate::infra::callback::{self, Callbacks, Posted};
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::infra::metrics::DeliveryLabels;
use crate::infra::settings::DispatcherArgs;
use crate::infra::telemetry;
use crate::registry;
use crate::registry::subscriptions::{Subscription, SubscriptionRegistry, Subscriptions};
use crate::store::deliveries::{self, NewAttempt, Outcomes};
use crate::wire::TraceContext;
use crate::wire::deliveries::{self as delivery, DeliveryKey};
use crate::wire::domain_events::{DomainEvent, SubscriptionDisabled};

pub(super) struct Handler {
    pub pool: PgPool,
    pub bus: Bus,
    pub registry: Arc<SubscriptionRegistry>,
    pub callbacks: Callbacks,
    pub settings: DispatcherArgs,
    pub limits: Limits,
    /// The attempts of a batch whose record failed: when the consume loop hands the same
    /// batch in again, they are recorded as they are instead of being sent a second time.
    pub unrecorded: Mutex<Option<Unrecorded>>,
}

/// Attempts made but not recorded yet, and the batch they belong to.
pub(super) struct Unrecorded {
    /// Stream sequences of the batch's messages, in order.
    batch: Vec<u64>,
    attempted: Vec<Attempted>,
}

/// What one delivery came to.
struct Attempted {
    row: Option<NewAttempt>,
    outcome: Outcome,
    disable: Option<String>,
}

impl Attempted {
    fn unrecorded(outcome: Outcome) -> Self {
        Self { row: None, outcome, disable: None }
    }
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        let sequences: Vec<u64> = batch.messages.iter().map(|m| m.info().map_or(0, |i| i.stream_sequence)).collect();
        let attempted = match self.take_unrecorded(batch.attempt, &sequences) {
            Some(attempted) => attempted,
            None => self.attempt_all(batch).await?,
        };
        if let Err(error) = self.record(&attempted).await {
            self.keep_unrecorded(Unrecorded { batch: sequences, attempted });
            return Err(error);
        }
        Ok(attempted.into_iter().map(|attempted| attempted.outcome).collect())
    }
}

impl Handler {
    /// Sends every delivery of the batch (or decides not to).
    async fn attempt_all(&self, batch: &Batch<'_>) -> Result<Vec<Attempted>, Transient> {
        let set = self.registry.snapshot();
        let keys: Vec<Option<DeliveryKey>> = batch.messages.iter().map(delivery::decode).collect();
        let known: Vec<(String, Uuid)> =
            keys.iter().flatten().map(|k| (k.subscription_id.clone(), k.event_id)).collect();
        let prior = deliveries::latest_attempts(&self.pool, &known)
            .await
            .map_err(|error| Transient::new("cannot read earlier attempts", error))?;
        let work: Vec<_> = batch
            .messages
            .iter()
            .zip(&keys)
            .map(|(message, key)| {
                let (set, prior) = (&set, &prior);
                async move {
                    let Some(key) = key else {
                        let detail = "a delivery needs its subscription and event id headers";
                        return Attempted::unrecorded(Outcome::reject("invalid_delivery", detail));
                    };
                    let Some(subscription) = set.by_id.get(&key.subscription_id) else {
                        // Deleted: nothing to deliver to.
                        return Attempted::unrecorded(Outcome::Ack);
                    };
                    let attempt = prior.get(&(key.subscription_id.clone(), key.event_id)).copied().unwrap_or(0) + 1;
                    let trace = TraceContext::from_nats(message.headers.as_ref())
                        .unwrap_or_else(|| TraceContext::for_event(key.event_id));
                    let span = tracing::info_span!("delivery", subscription_id = %key.subscription_id,
                        event_id = %key.event_id, trace_id = %trace.trace_id_hex());
                    let call = telemetry::within(&span, &trace);
                    self.deliver(subscription, key, attempt, &message.payload, &call).instrument(span).await
                }
            })
            .collect();
        Ok(futures::stream::iter(work).buffered(self.settings.sender_concurrency.max(1)).collect().await)
    }

    /// The attempts of this batch that a failed record left, when it is the same batch again.
    fn take_unrecorded(&self, attempt: u32, sequences: &[u64]) -> Option<Vec<Attempted>> {
        let mut unrecorded = self.unrecorded.lock().ok()?;
        let held = unrecorded.take()?;
        (attempt > 1 && held.batch == sequences).then_some(held.attempted)
    }

    fn keep_unrecorded(&self, held: Unrecorded) {
        if let Ok(mut unrecorded) = self.unrecorded.lock() {
            *unrecorded = Some(held);
        }
    }

    /// One attempt (or the decision not to make one).
    async fn deliver(
        &self,
        subscription: &Subscription,
        key: &DeliveryKey,
        attempt: i32,
        body: &Bytes,
        trace: &TraceContext,
    ) -> Attempted {
        let id = &subscription.subscription_id;
        let webhook_id = format!("msg_{}", key.event_id.simple());
        let row = |status, code, duration_ms, error, retry_in: Option<std::time::Duration>| NewAttempt {
            subscription_id: id.clone(),
            event_id: key.event_id,
            webhook_id: webhook_id.clone(),
            attempt,
            status,
            status_code: code,
            duration_ms,
            error,
            next_attempt_at: retry_in.map(|wait| Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default()),
        };
        let url = match verdict::gate(subscription) {
            Gate::Send(url) => url,
            Gate::Skip(reason) => {
                let row = row(DeliveryStatus::Skipped, None, 0.0, Some(reason.to_owned()), None);
                return Attempted { row: Some(row), outcome: Outcome::Ack, disable: None };
            }
        };
        if let Some(wait) = self.limits.wait(id, subscription.rate_limit_per_second, Instant::now()) {
            // Past the free slot, spread so waiting deliveries do not all return at once.
            let wait = (wait + std::time::Duration::from_millis(5)).mul_f64(1.0 + jitter());
            return Attempted::unrecorded(Outcome::Retry { after: wait });
        }
        let trace_headers = trace.headers();
        let mut headers = vec![("event-service-subscription", id.as_str())];
        headers.extend(trace_headers.iter().map(|(name, value)| (*name, value.as_str())));
        let request = callback::Request {
            url: &url,
            body,
            headers,
            timeout: None,
            signed: Some((subscription.webhook_secret.expose(), webhook_id.as_str())),
        };
        let posted = self.callbacks.post(request).await;
        let label = format!("subscription {id}, attempt {attempt}");
        let retries_used = attempt - key.base - 1;
        let decision = verdict::decide(&posted, &subscription.retry_policy.0, retries_used, &label, jitter());
        let (code, duration_ms, error) = match &posted {
            Posted::Refused(error) => (None, 0.0, Some(format!("callback_url {error}"))),
            Posted::Answered(answer) => {
                let error = (decision.status != DeliveryStatus::Delivered).then(|| answer.detail.clone());
                (answer.status, answer.duration_ms, error)
            }
        };
        if decision.status != DeliveryStatus::Delivered {
            tracing::info!(stage = STAGE, subscription_id = %id, event_id = %key.event_id, trace_id = %trace.trace_id_hex(),
                attempt, status = %decision.status, error = error.as_deref().unwrap_or(""), "delivery did not succeed");
        }
        let row = row(decision.status, code, duration_ms, error, decision.retry_in);
        let disable = decision.disable.map(|reason| format!("{reason} on {}", Utc::now().to_rfc3339()));
        Attempted { row: Some(row), outcome: decision.outcome, disable }
    }

    /// Records the attempts and the subscriptions' failure records in one transaction, then
    /// announces the subscriptions that were disabled.
    async fn record(&self, attempted: &[Attempted]) -> Result<(), Transient> {
        let mut outcomes = Outcomes::default();
        for item in attempted {
            let Some(row) = &item.row else { continue };
            match row.status {
                DeliveryStatus::Delivered => outcomes.delivered.insert(row.subscription_id.clone()),
                DeliveryStatus::Skipped => false,
                _ => outcomes.failed.insert(row.subscription_id.clone()),
            };
            if let Some(reason) = &item.disable {
                outcomes.disable.push((row.subscription_id.clone(), reason.clone()));
            }
            outcomes.attempts.push(row.clone());
        }
        let disabled = deliveries::record(&self.pool, &outcomes, self.settings.disable_after_secs)
            .await
            .map_err(|error| Transient::new("cannot record deliveries", error))?;
        let metrics = self.bus.metrics();
        for row in &outcomes.attempts {
            metrics.deliveries.get_or_create(&DeliveryLabels { outcome: row.status.as_str() }).inc();
        }
        metrics.subscriptions_disabled.inc_by(disabled.len() as u64);
        if disabled.is_empty() {
            return Ok(());
        }
        let mut messages = Vec::new();
        for (id, reason) in &disabled {
            tracing::warn!(stage = STAGE, subscription_id = %id, %reason, "subscription disabled");
            let announced = SubscriptionDisabled { subscription_id: id, reason, timestamp: Utc::now() };
            messages.extend(announced.to_message());
        }
        self.bus.announce(messages).await;
        registry::announce_change::<Subscriptions>(&self.bus).await;
        Ok(())
    }
}

/// A fraction from 0 to 0.2, so retries of many deliveries spread out.
fn jitter() -> f64 {
    (Uuid::new_v4().as_u128() % 1000) as f64 / 5000.0
}
