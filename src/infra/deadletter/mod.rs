//! Dead letters: a copy of a message a stage cannot handle goes to `deadletter.{stage}`
//! (stream DEADLETTER) with the reason in headers, so nothing is silently dropped; operators
//! read, delete and redrive them ([`letters`], [`redrive`]).
//!
//! Writes DEADLETTER. Guarantees: returns `Ok` only once JetStream acknowledged the copy; the
//! copy's `Nats-Msg-Id` is derived from the original's stream and position, so dead-lettering
//! the same message twice stores it once. The original's own `Nats-Msg-Id` and, when the
//! stage knows it, the event id travel in headers, so a redrive lands as the original would
//! have.

pub mod letters;
pub mod redrive;

use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use bytes::Bytes;

use super::bus::{Bus, BusError};
use super::metrics::DeadLetterLabels;
use crate::wire::{Outgoing, Rejection, TraceContext, headers, subjects};

/// The message being dead-lettered, wherever it was read from.
pub struct Original<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    pub stream: &'a str,
    pub sequence: u64,
}

impl<'a> Original<'a> {
    /// A message as a consumer delivered it.
    pub fn of(message: &'a Message) -> Self {
        let (stream, sequence) = match message.info() {
            Ok(info) => (info.stream, info.stream_sequence),
            Err(_) => ("", 0),
        };
        Self {
            subject: message.subject.as_str(),
            headers: message.headers.as_ref(),
            payload: &message.payload,
            stream,
            sequence,
        }
    }
}

/// Copies a message to `deadletter.{stage}` with the reason in headers and waits for the
/// PubAck.
pub async fn publish(bus: &Bus, stage: &str, original: Original<'_>, rejection: &Rejection) -> Result<(), BusError> {
    let mut copied = HeaderMap::new();
    if let Some(headers_in) = original.headers {
        for (name, values) in headers_in.iter() {
            for value in values {
                copied.append(name.clone(), value.clone());
            }
        }
    }
    let sequence = original.sequence;
    if copied.get(headers::ORIGINAL_MSG_ID).is_none()
        && let Some(id) = copied.get(async_nats::header::NATS_MESSAGE_ID).cloned()
    {
        copied.insert(headers::ORIGINAL_MSG_ID, id);
    }
    // The stage knows which event it refused; a header the producer set does not.
    if let Some(event_id) = rejection.event_id {
        copied.insert(headers::EVENT_ID, event_id.to_string().as_str());
    }
    copied.insert(async_nats::header::NATS_MESSAGE_ID, format!("{stage}.{}.{sequence}", original.stream).as_str());
    copied.insert(headers::STAGE, stage);
    copied.insert(headers::REASON_CODE, rejection.code);
    copied.insert(headers::REASON, headers::safe_value(&rejection.detail).as_str());
    copied.insert(headers::ORIGINAL_SUBJECT, original.subject);
    copied.insert(headers::ORIGINAL_SEQUENCE, sequence.to_string().as_str());
    let trace_id = TraceContext::from_nats(original.headers).map(|trace| trace.trace_id_hex()).unwrap_or_default();
    tracing::warn!(stage, subject = %original.subject, stream_seq = sequence, reason = rejection.code,
        detail = %rejection.detail, trace_id, "dead-lettered");
    let copy =
        Outgoing { subject: subjects::deadletter_subject(stage), headers: copied, payload: original.payload.clone() };
    bus.publish(copy).await?;
    let stage = subjects::deadletter_stage(stage);
    bus.metrics().dead_letters.get_or_create(&DeadLetterLabels { stage, reason: rejection.code }).inc();
    Ok(())
}
