//! The DELIVERIES message: one event for one subscription, as the dispatcher (or a resend)
//! queues it and the sender reads it.
//!
//! Reads and writes nothing. Format: subject `deliveries.{subscription_id}`, the event's JSON
//! as the payload, the subscription, the event id and the attempt base in headers, and a
//! `Nats-Msg-Id` chosen by the caller (`{event_id}.{subscription_id}` for the first queueing,
//! so a redelivered event is queued once).

use async_nats::jetstream::Message;
use bytes::Bytes;
use uuid::Uuid;

use super::message::Outgoing;
use super::{headers, subjects};

/// What a delivery message is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryKey {
    pub subscription_id: String,
    pub event_id: Uuid,
    /// Attempts already made when it was queued (a resend starts a new budget).
    pub base: i32,
}

/// The delivery message of one event for one subscription.
pub fn encode(key: &DeliveryKey, payload: Bytes, message_id: &str) -> Outgoing {
    Outgoing::with_id(subjects::delivery_subject(&key.subscription_id), message_id, payload)
        .with_header(headers::SUBSCRIPTION, &key.subscription_id)
        .with_header(headers::EVENT_ID, &key.event_id.to_string())
        .with_header(headers::ATTEMPT_BASE, &key.base.to_string())
}

/// The message id of the first queueing of an event for a subscription.
pub fn first_message_id(key: &DeliveryKey) -> String {
    format!("{}.{}", key.event_id, key.subscription_id)
}

/// The key of a delivery message; `None` when its headers do not say.
pub fn decode(message: &Message) -> Option<DeliveryKey> {
    let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let event_id = header(headers::EVENT_ID).and_then(|id| Uuid::parse_str(&id).ok())?;
    let subscription_id = header(headers::SUBSCRIPTION)?;
    let base = header(headers::ATTEMPT_BASE).and_then(|base| base.parse().ok()).unwrap_or(0);
    Some(DeliveryKey { subscription_id, event_id, base })
}
