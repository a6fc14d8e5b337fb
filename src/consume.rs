//! The one consume loop every stage uses: pulls batches from a durable JetStream consumer,
//! hands them to the stage's handler, and turns each [`Outcome`] into an ack, a NAK with
//! delay, or a dead-letter + term.
//!
//! Reads a pull consumer; writes acks and `deadletter.{stage}`. Guarantees: handlers never
//! ack; a rejected message is terminated only after DEADLETTER acknowledged its copy; the loop
//! survives transient errors (missed heartbeats, reconnects, no responders) and ends only on
//! cancellation or when its consumer is deleted.

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{AckKind, Message};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Bus, Outgoing};
use crate::subject;

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is durable: acknowledge.
    Ack,
    /// Try again later: NAK with this delay.
    Retry { after: Duration },
    /// Cannot ever be handled: dead-letter with the reason, then terminate.
    Reject(Rejection),
}

/// Why a message was rejected: a stable, low-cardinality `code` and a human `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub detail: String,
}

impl Outcome {
    pub fn reject(code: &'static str, detail: impl Into<String>) -> Self {
        Outcome::Reject(Rejection { code, detail: detail.into() })
    }
}

/// A stage's message handler: one outcome per message of the batch, in order.
pub trait BatchHandler: Send + Sync {
    fn handle(&self, batch: &[Message]) -> impl Future<Output = Vec<Outcome>> + Send;

    /// Called when nothing has arrived for [`IDLE_AFTER`]: a chance to catch up on work the
    /// consumer will only redeliver later.
    fn idle(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// How long without a message before [`BatchHandler::idle`] runs.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);
/// Yields without a new message after which a batch is handed over as it is.
const GATHER_YIELDS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("consumer {0} was deleted")]
    ConsumerDeleted(String),
}

/// How a stage consumes.
pub struct ConsumeLoop {
    pub stage: &'static str,
    pub bus: Bus,
    pub consumer: PullConsumer,
    pub max_batch: usize,
    /// The priority group to pull in, for a pinned-client consumer (one active puller).
    pub group: Option<&'static str>,
}

impl ConsumeLoop {
    /// Runs until `token` is cancelled. The batch in hand when that happens is finished and
    /// settled first.
    pub async fn run<H: BatchHandler>(self, handler: &H, token: CancellationToken) -> Result<(), ConsumeError> {
        let stage = self.stage;
        let mut pause = Duration::from_millis(100);
        'connect: while !token.is_cancelled() {
            let stream = self.consumer.stream().max_messages_per_batch(self.max_batch);
            let stream = match self.group {
                // A standby's pulls wait for the pin: short expiries let it notice a free pin soon.
                Some(group) => {
                    stream.group(group).expires(Duration::from_secs(2)).heartbeat(Duration::from_millis(500))
                }
                None => stream.heartbeat(Duration::from_secs(5)).expires(Duration::from_secs(30)),
            };
            let messages = stream.messages().await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(stage, error = %error, "cannot start pulling; retrying");
                    sleep_or_cancel(pause, &token).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            pause = Duration::from_millis(100);
            loop {
                let first = tokio::select! {
                    _ = token.cancelled() => {
                        release_buffered(stage, &mut messages, self.max_batch).await;
                        break 'connect;
                    }
                    next = tokio::time::timeout(IDLE_AFTER, messages.next()) => match next {
                        Ok(next) => next,
                        Err(_) => {
                            handler.idle().await;
                            continue;
                        }
                    },
                };
                let mut batch = Vec::new();
                match first {
                    None => {
                        tracing::warn!(stage, "message stream ended; pulling again");
                        continue 'connect;
                    }
                    Some(Err(error)) => {
                        if error.kind() == MessagesErrorKind::ConsumerDeleted {
                            return Err(ConsumeError::ConsumerDeleted(stage.to_owned()));
                        }
                        tracing::warn!(stage, error = %error, error.kind = ?error.kind(), "pull error");
                        continue;
                    }
                    Some(Ok(message)) => batch.push(message),
                }
                // Take whatever else is already here, without waiting on a timer: batches grow
                // with load and a lone event is not held back. A few yields let the client's
                // reader parse the rest of a socket read that is already in.
                let mut idle_yields = 0;
                while batch.len() < self.max_batch && idle_yields < GATHER_YIELDS {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(message))) => {
                            batch.push(message);
                            idle_yields = 0;
                        }
                        Some(_) => break,
                        None => {
                            idle_yields += 1;
                            tokio::task::yield_now().await;
                        }
                    }
                }
                let outcomes = handler.handle(&batch).await;
                self.settle(&batch, outcomes).await;
            }
        }
        tracing::info!(stage, "consumer stopped");
        Ok(())
    }

    async fn settle(&self, batch: &[Message], outcomes: Vec<Outcome>) {
        debug_assert_eq!(batch.len(), outcomes.len());
        for (message, outcome) in batch.iter().zip(outcomes) {
            let kind = match outcome {
                Outcome::Ack => AckKind::Ack,
                Outcome::Retry { after } => AckKind::Nak(Some(after)),
                Outcome::Reject(rejection) => {
                    match dead_letter(&self.bus, self.stage, Original::of(message), &rejection).await {
                        Ok(()) => AckKind::Term,
                        Err(error) => {
                            tracing::error!(stage = self.stage, error = %error, "cannot dead-letter; will retry");
                            AckKind::Nak(Some(Duration::from_secs(5)))
                        }
                    }
                }
            };
            // A lost ack only means a redelivery, which every effect tolerates (idempotent).
            if let Err(error) = message.ack_with(kind).await {
                tracing::warn!(stage = self.stage, error = %error, "ack failed");
            }
        }
    }
}

/// The message being dead-lettered, wherever it was read from.
pub struct Original<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a bytes::Bytes,
    pub stream: &'a str,
    pub sequence: u64,
}

impl<'a> Original<'a> {
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
/// PubAck. The copy's `Nats-Msg-Id` is derived from the original's position, so dead-lettering
/// the same message twice stores it once.
pub async fn dead_letter(
    bus: &Bus,
    stage: &str,
    original: Original<'_>,
    rejection: &Rejection,
) -> Result<(), bus::BusError> {
    let mut headers = HeaderMap::new();
    if let Some(headers_in) = original.headers {
        for (name, values) in headers_in.iter() {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    let sequence = original.sequence;
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{stage}.{}.{sequence}", original.stream).as_str());
    headers.insert(bus::STAGE_HEADER, stage);
    headers.insert(bus::REASON_CODE_HEADER, rejection.code);
    headers.insert(bus::REASON_HEADER, header_safe(&rejection.detail).as_str());
    headers.insert(bus::ORIGINAL_SUBJECT_HEADER, original.subject);
    headers.insert(bus::ORIGINAL_SEQUENCE_HEADER, sequence.to_string().as_str());
    tracing::warn!(stage, subject = %original.subject, stream_seq = sequence, reason = rejection.code,
        detail = %rejection.detail, "dead-lettered");
    bus.publish(Outgoing { subject: subject::deadletter_subject(stage), headers, payload: original.payload.clone() })
        .await
        .map(|_| ())
}

/// Header values cannot hold line breaks; keep them short too.
fn header_safe(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1024).collect()
}

/// Hands back what was pulled but not handled, so another instance gets it now instead of
/// after the ack wait.
async fn release_buffered(stage: &str, messages: &mut async_nats::jetstream::consumer::pull::Stream, limit: usize) {
    // Bounded: the stream keeps pulling while we drain, and what we NAK may come straight back.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut released = 0;
    while released < limit {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, messages.next()).await else { break };
        let _ = message.ack_with(AckKind::Nak(None)).await;
        released += 1;
    }
    if released > 0 {
        tracing::info!(stage, released, "released unhandled messages");
    }
}

async fn sleep_or_cancel(duration: Duration, token: &CancellationToken) {
    tokio::select! {
        _ = token.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}
