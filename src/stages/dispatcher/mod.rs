//! The dispatcher stage: queues one delivery per (event, matching subscription) on
//! DELIVERIES, for the [`crate::stages::sender`] to send.
//!
//! Reads the durable `dispatcher` consumer of EVENTS and the subscription registry; writes
//! `deliveries.{subscription_id}`. Guarantees: a delivery is queued with `Nats-Msg-Id` =
//! `{event_id}.{subscription_id}`, so a redelivered event is queued once; an event is acked
//! once every one of its deliveries has its PubAck. One subscriber's slowness never slows this
//! stage: it only queues. While no subscription can take an event, its consumer takes none
//! ([`crate::stages::interest`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StageError;
use crate::domain::Event;
use crate::infra::bus::{Bus, BusError};
use crate::infra::consume::{Batch, BatchHandler, ConsumeLoop, Handled, Outcome};
use crate::registry::subscriptions::{SubscriptionRegistry, SubscriptionSet};
use crate::store::deliveries;
use crate::wire::deliveries::{self as delivery, DeliveryKey};
use crate::wire::subjects::streams;
use crate::wire::{Outgoing, TraceContext, codec};

pub const STAGE: &str = "dispatcher";
/// Most events matched in one batch.
const MAX_BATCH: usize = 500;
const OUTAGE_RETRY: Duration = Duration::from_secs(2);

/// A built dispatcher, ready to run.
pub struct Dispatcher {
    consume: ConsumeLoop,
    handler: Handler,
}

impl Dispatcher {
    pub async fn build(bus: Bus, registry: Arc<SubscriptionRegistry>) -> Result<Self, StageError> {
        let consume = ConsumeLoop::build(&bus, streams::EVENTS, STAGE, MAX_BATCH).await?;
        Ok(Self { consume, handler: Handler { bus, registry } })
    }

    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        tracing::info!(stage = STAGE, "dispatcher running");
        Ok(self.consume.run(&self.handler, token).await?)
    }
}

struct Handler {
    bus: Bus,
    registry: Arc<SubscriptionRegistry>,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        let set = self.registry.snapshot();
        let mut outcomes = vec![Outcome::Ack; batch.messages.len()];
        if !set.delivers() {
            // Nobody to deliver to: nothing to decode either.
            return Ok(outcomes);
        }
        let mut outgoing = Vec::new();
        let mut owners = Vec::new();
        for (position, message) in batch.messages.iter().enumerate() {
            // Undecodable events are the persister's to dead-letter.
            let Ok(incoming) = codec::decode(message) else { continue };
            for delivery in deliveries_of(&set, &incoming.event, &incoming.trace) {
                outgoing.push(delivery);
                owners.push(position);
            }
        }
        for (owner, result) in owners.into_iter().zip(self.bus.publish_all(outgoing).await) {
            if let Err(error) = result {
                tracing::warn!(stage = STAGE, error = %error, "cannot queue a delivery; retrying the event");
                outcomes[owner] = Outcome::Retry { after: OUTAGE_RETRY };
            }
        }
        Ok(outcomes)
    }
}

/// The first delivery of an event to every subscription that takes it, within the event's
/// trace.
fn deliveries_of(set: &SubscriptionSet, event: &Event, trace: &TraceContext) -> Vec<Outgoing> {
    let mut matching = set.matching(event).peekable();
    if matching.peek().is_none() {
        return Vec::new();
    }
    let Ok(payload) = serde_json::to_vec(event) else { return Vec::new() };
    let payload = Bytes::from(payload);
    matching
        .map(|subscription| {
            let key = DeliveryKey {
                subscription_id: subscription.subscription_id.clone(),
                event_id: event.event_id,
                base: 0,
            };
            delivery::encode(&key, payload.clone(), &delivery::first_message_id(&key)).with_trace(trace)
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("cannot read earlier attempts")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot encode an event")]
    Encode(#[from] serde_json::Error),
}

/// Queues events again for one subscription (resend, recover), each with a fresh retry
/// budget counted from its latest attempt. Fails, queueing nothing, when the attempts cannot
/// be read; returns how many were queued.
pub async fn requeue(bus: &Bus, pool: &PgPool, subscription_id: &str, events: &[Event]) -> Result<usize, RequeueError> {
    let resend = |event: &Event| format!("{}.{subscription_id}.resend.{}", event.event_id, uuid::Uuid::now_v7());
    requeue_as(bus, pool, subscription_id, events, resend).await
}

/// [`requeue`] with the caller's `Nats-Msg-Id` for each event (a redrive's is derived from
/// its dead letter, so redriving it twice queues it once).
pub async fn requeue_as(
    bus: &Bus,
    pool: &PgPool,
    subscription_id: &str,
    events: &[Event],
    message_id: impl Fn(&Event) -> String,
) -> Result<usize, RequeueError> {
    let keys: Vec<(String, uuid::Uuid)> =
        events.iter().map(|event| (subscription_id.to_owned(), event.event_id)).collect();
    let latest = deliveries::latest_attempts(pool, &keys).await?;
    let mut messages = Vec::with_capacity(events.len());
    for event in events {
        let base = latest.get(&(subscription_id.to_owned(), event.event_id)).copied().unwrap_or(0);
        let key = DeliveryKey { subscription_id: subscription_id.to_owned(), event_id: event.event_id, base };
        messages.push(delivery::encode(&key, Bytes::from(serde_json::to_vec(event)?), &message_id(event)));
    }
    let mut queued = 0;
    for result in bus.publish_all(messages).await {
        result?;
        queued += 1;
    }
    Ok(queued)
}
