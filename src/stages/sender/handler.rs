//! The sender's I/O shell: reads earlier attempts, sends each delivery through the one
//! callback path, records the attempts, announces disabled subscriptions. The decisions are
//! [`super::verdict`]'s.
//!
//! Deliveries are handed in one at a time, many at once ([`ConsumeLoop::run_each`]); their
//! reads and records go through group commits, so a burst still costs a few round trips.
//!
//! [`ConsumeLoop::run_each`]: crate::infra::consume::ConsumeLoop::run_each

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use super::STAGE;
use super::lanes::{Lanes, Slot};
use super::rate::Limits;
use super::verdict::{self, Gate};
use crate::domain::DeliveryStatus;
use crate::infra::bus::Bus;
use crate::infra::callback::{self, Callbacks, Posted};
use crate::infra::coalesce::Coalescer;
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

/// Group-commit calls to PostgreSQL at once, per kind (attempt reads, attempt records). Two
/// keep one call gathering while the other runs; more only make each call smaller (four cost
/// about 15 % more PostgreSQL CPU per delivery in the fan-out bench).
const DB_CALLS: usize = 2;

pub(super) struct Handler {
    pub registry: Arc<SubscriptionRegistry>,
    pub callbacks: Callbacks,
    pub limits: Limits,
    pub lanes: Lanes,
    /// Webhook calls at once (`EVENT_SENDER_CONCURRENCY`); deliveries waiting on PostgreSQL
    /// do not hold one.
    pub calls: tokio::sync::Semaphore,
    /// The highest attempt recorded for a (subscription, event), 0 for none.
    pub prior: Coalescer<(String, Uuid), i32>,
    pub recorder: Coalescer<Record, ()>,
    /// The attempts of batches whose record failed, by the batch's stream sequences: when the
    /// consume loop hands the same batch in again, they are recorded as they are instead of
    /// being sent a second time.
    pub unrecorded: Mutex<HashMap<Vec<u64>, Vec<Attempted>>>,
}

impl Handler {
    pub fn new(
        pool: PgPool,
        bus: Bus,
        registry: Arc<SubscriptionRegistry>,
        callbacks: Callbacks,
        settings: &DispatcherArgs,
    ) -> Self {
        let timeout = Duration::from_millis(settings.delivery_timeout_ms);
        let group = settings.sender_concurrency.max(1) * 2;
        let reads = pool.clone();
        let prior = Coalescer::spawn(group, DB_CALLS, move |keys: Vec<(String, Uuid)>| {
            let pool = reads.clone();
            async move {
                let found = deliveries::latest_attempts(&pool, &keys).await?;
                Ok::<_, sqlx::Error>(keys.iter().map(|key| found.get(key).copied().unwrap_or(0)).collect())
            }
        });
        let (writes, announcer, disable_after) = (pool, bus.clone(), settings.disable_after_secs);
        let recorder = Coalescer::spawn(group, DB_CALLS, move |records: Vec<Record>| {
            let (pool, bus) = (writes.clone(), announcer.clone());
            async move {
                record(&pool, &bus, disable_after, &records).await?;
                Ok::<_, sqlx::Error>(vec![(); records.len()])
            }
        });
        Self {
            registry,
            callbacks,
            limits: Limits::default(),
            lanes: Lanes::new(usize::from(settings.sender_subscription_concurrency), timeout),
            calls: tokio::sync::Semaphore::new(settings.sender_concurrency.max(1)),
            prior,
            recorder,
            unrecorded: Default::default(),
        }
    }
}

/// Where a delivery goes: its subscription, and its callback URL as the set parsed it.
struct Target<'a> {
    subscription: &'a Subscription,
    callback: Option<&'a reqwest::Url>,
}

/// One attempt to record, and the reason to disable its subscription, if any.
#[derive(Clone)]
pub(super) struct Record {
    row: NewAttempt,
    disable: Option<String>,
}

/// What one delivery came to.
#[derive(Clone)]
pub(super) struct Attempted {
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
            None => self.attempt_all(batch).await,
        };
        let records = attempted.iter().filter_map(|attempted| {
            let row = attempted.row.clone()?;
            Some(self.recorder.call(Record { row, disable: attempted.disable.clone() }))
        });
        let recorded: Result<Vec<()>, _> = futures::future::join_all(records).await.into_iter().collect();
        if let Err(failure) = recorded {
            self.keep_unrecorded(sequences, attempted);
            return Err(Transient::new("cannot record deliveries", failure));
        }
        Ok(attempted.into_iter().map(|attempted| attempted.outcome).collect())
    }
}

impl Handler {
    /// Sends every delivery of the batch (or decides not to).
    async fn attempt_all(&self, batch: &Batch<'_>) -> Vec<Attempted> {
        let set = self.registry.snapshot();
        let keys: Vec<Option<DeliveryKey>> = batch.messages.iter().map(delivery::decode).collect();
        let work: Vec<_> = batch
            .messages
            .iter()
            .zip(&keys)
            .map(|(message, key)| {
                let set = &set;
                async move {
                    let Some(key) = key else {
                        let detail = "a delivery needs its subscription and event id headers";
                        return Attempted::unrecorded(Outcome::reject("invalid_delivery", detail));
                    };
                    let Some(subscription) = set.by_id.get(&key.subscription_id) else {
                        // Deleted: nothing to deliver to.
                        return Attempted::unrecorded(Outcome::Ack);
                    };
                    let lane = match self.lanes.enter(&key.subscription_id) {
                        Ok(lane) => lane,
                        // Its lane is full (a slow endpoint): back to JetStream, sent later.
                        Err(wait) => {
                            return Attempted::unrecorded(Outcome::Retry { after: wait.mul_f64(1.0 + jitter()) });
                        }
                    };
                    let delivered = message.info().map_or(0, |info| info.delivered);
                    let prior = match verdict::known_prior(delivered, key.base) {
                        Some(prior) => prior,
                        None => match self.prior.call((key.subscription_id.clone(), key.event_id)).await {
                            Ok(prior) => prior,
                            Err(error) => {
                                tracing::warn!(stage = STAGE, error = %error, "cannot read earlier attempts; retrying");
                                return Attempted::unrecorded(Outcome::Retry { after: Duration::from_secs(1) });
                            }
                        },
                    };
                    let attempt = prior + 1;
                    let trace = TraceContext::from_nats(message.headers.as_ref())
                        .unwrap_or_else(|| TraceContext::for_event(key.event_id));
                    let span = tracing::info_span!("delivery", subscription_id = %key.subscription_id,
                        event_id = %key.event_id, trace_id = %trace.trace_id_hex());
                    let call = telemetry::within(&span, &trace);
                    let to = Target { subscription, callback: set.callback(&key.subscription_id) };
                    self.deliver(to, key, attempt, &message.payload, &call, lane).instrument(span).await
                }
            })
            .collect();
        futures::future::join_all(work).await
    }

    /// The attempts of this batch that a failed record left, when it is the same batch again.
    fn take_unrecorded(&self, attempt: u32, sequences: &[u64]) -> Option<Vec<Attempted>> {
        let held = self.unrecorded.lock().ok()?.remove(sequences)?;
        (attempt > 1).then_some(held)
    }

    fn keep_unrecorded(&self, sequences: Vec<u64>, attempted: Vec<Attempted>) {
        if let Ok(mut unrecorded) = self.unrecorded.lock() {
            unrecorded.insert(sequences, attempted);
        }
    }

    /// One attempt (or the decision not to make one).
    async fn deliver(
        &self,
        to: Target<'_>,
        key: &DeliveryKey,
        attempt: i32,
        body: &Bytes,
        trace: &TraceContext,
        mut lane: Slot,
    ) -> Attempted {
        let Target { subscription, callback } = to;
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
        let url = match verdict::gate(subscription, callback) {
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
            url,
            body,
            headers,
            timeout: None,
            signed: Some((subscription.signing_secrets(Utc::now()), webhook_id.as_str())),
        };
        let call = self.calls.acquire().await;
        let posted = self.callbacks.post(request).await;
        drop(call);
        if let Posted::Answered(answer) = &posted {
            lane.took(Duration::from_secs_f64(answer.duration_ms / 1000.0));
        }
        drop(lane);
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
}

/// Records attempts and the subscriptions' failure records in one transaction, then announces
/// the subscriptions that were disabled.
async fn record(pool: &PgPool, bus: &Bus, disable_after_secs: u64, records: &[Record]) -> Result<(), sqlx::Error> {
    let mut outcomes = Outcomes::default();
    for Record { row, disable } in records {
        match row.status {
            DeliveryStatus::Delivered => outcomes.delivered.insert(row.subscription_id.clone()),
            DeliveryStatus::Skipped => false,
            _ => outcomes.failed.insert(row.subscription_id.clone()),
        };
        if let Some(reason) = disable {
            outcomes.disable.push((row.subscription_id.clone(), reason.clone()));
        }
        outcomes.attempts.push(row.clone());
    }
    let disabled = deliveries::record(pool, &outcomes, disable_after_secs).await?;
    let metrics = bus.metrics();
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
    bus.announce(messages).await;
    registry::announce_change::<Subscriptions>(bus).await;
    Ok(())
}

/// A fraction from 0 to 0.2, so retries of many deliveries spread out. Taken for every
/// delivery: from the standard library's per-thread random hash keys, not a system call.
fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let spread = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (spread % 1000) as f64 / 5000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn jitter_spreads_within_a_fifth() {
        let drawn: Vec<f64> = (0..200).map(|_| super::jitter()).collect();
        assert!(drawn.iter().all(|jitter| (0.0..0.2).contains(jitter)));
        assert!(drawn.iter().any(|jitter| *jitter != drawn[0]), "it varies from call to call");
    }
}
