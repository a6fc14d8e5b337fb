//! The one consume loop every stage uses: pulls batches from a durable JetStream consumer,
//! hands them to the stage's handler, and settles each message by the handler's [`Outcome`]:
//! an ack, a NAK with delay, or a dead-letter + term.
//!
//! Reads a pull consumer; writes acks and `deadletter.{stage}`. Guarantees:
//! - Handlers never ack. While a batch is in hand (handled, or held after a transient
//!   failure) the loop keeps it alive with progress acks, so a slow handler is not redelivered
//!   to another instance meanwhile.
//! - A handler that returns [`Transient`] (a dependency is down) gets the same batch again,
//!   after a growing pause, until it succeeds or the loop is cancelled (then the batch is
//!   handed back): nothing is lost, nothing is reordered, no delivery is spent.
//! - A rejected message is terminated only after DEADLETTER acknowledged its copy.
//! - [`ConsumeLoop::run`] hands over batches one after the other; [`ConsumeLoop::run_each`]
//!   hands each message over as a batch of its own, up to a window at once, and settles each
//!   as soon as it is handled: a slow message holds only its own slot.
//! - The loop survives transient errors (missed heartbeats, reconnects, no responders) and
//!   ends only on cancellation or when its consumer is deleted. It counts every outcome, batch
//!   and hold, and times every handling ([`crate::infra::metrics`]).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::StreamError;
use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind, Stream as MessageStream};
use async_nats::jetstream::{AckKind, Message};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::bus::{Bus, BusError};
use super::deadletter::{self, Original};
use super::metrics::{OutcomeLabels, StageLabels};
use crate::wire::Rejection;

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

impl Outcome {
    pub fn reject(code: &'static str, detail: impl Into<String>) -> Self {
        Outcome::Reject(Rejection::new(code, detail))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A dependency (PostgreSQL, NATS) failed in a way that passes: the whole batch is handled
/// again later, as it is.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Transient {
    what: &'static str,
    #[source]
    source: BoxError,
}

impl Transient {
    pub fn new(what: &'static str, source: impl Into<BoxError>) -> Self {
        Self { what, source: source.into() }
    }
}

/// One outcome per message of the batch, in order; or the batch must wait.
pub type Handled = Result<Vec<Outcome>, Transient>;

/// A batch in hand.
pub struct Batch<'a> {
    pub messages: &'a [Message],
    /// 1 on the first try; more when the batch is handled again after a [`Transient`] (some of
    /// its effects may already be durable).
    pub attempt: u32,
}

/// A stage's message handler.
pub trait BatchHandler: Send + Sync {
    fn handle(&self, batch: &Batch<'_>) -> impl Future<Output = Handled> + Send;

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
    stage: &'static str,
    bus: Bus,
    consumer: PullConsumer,
    max_batch: usize,
    /// The priority group to pull in, for a pinned-client consumer (one active puller).
    group: Option<&'static str>,
    /// How often a batch in hand gets a progress ack: a third of the consumer's ack wait.
    heartbeat: Duration,
}

impl ConsumeLoop {
    /// The loop of `stage` over its durable consumer on `stream` (named after the stage),
    /// which must exist.
    pub async fn build(bus: &Bus, stream: &str, stage: &'static str, max_batch: usize) -> Result<Self, BusError> {
        let consumer = bus.consumer(stream, stage).await?;
        let heartbeat = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_secs(1));
        bus.metrics().watch_consumer(stream, stage, consumer.clone());
        Ok(Self { stage, bus: bus.clone(), consumer, max_batch: max_batch.max(1), group: None, heartbeat })
    }

    /// Pulls in a priority group of a pinned-client consumer: one instance active, the others
    /// standing by.
    pub fn pinned(mut self, group: &'static str) -> Self {
        self.group = Some(group);
        self
    }

    /// Runs until `token` is cancelled. The batch in hand when that happens is finished and
    /// settled first.
    pub async fn run<H: BatchHandler>(self, handler: &H, token: CancellationToken) -> Result<(), ConsumeError> {
        let stage = self.stage;
        'connect: while let Some(mut messages) = self.connect(&token).await {
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
                let mut batch = match pulled(stage, first)? {
                    Pulled::Message(message) => vec![message],
                    Pulled::Reconnect => continue 'connect,
                    Pulled::Nothing => continue,
                };
                gather(&mut messages, &mut batch, self.max_batch).await;
                self.handle(handler, &batch, &token).await;
            }
        }
        tracing::info!(stage, "consumer stopped");
        Ok(())
    }

    /// Like [`Self::run`], but each message is a batch of its own and up to `window` are in
    /// hand at once, each settled when it is done. For handlers whose messages are independent
    /// and may take long (the sender's webhook calls). Messages may settle out of order. On
    /// cancellation, nothing more is taken and the messages in hand are finished first.
    pub async fn run_each<H: BatchHandler>(
        self,
        handler: &H,
        window: usize,
        token: CancellationToken,
    ) -> Result<(), ConsumeError> {
        let stage = self.stage;
        let window = window.max(1);
        let mut in_hand = futures::stream::FuturesUnordered::new();
        'connect: while let Some(mut messages) = self.connect(&token).await {
            loop {
                tokio::select! {
                    _ = token.cancelled() => {
                        release_buffered(stage, &mut messages, self.max_batch).await;
                        break 'connect;
                    }
                    Some(()) = in_hand.next(), if !in_hand.is_empty() => {}
                    next = messages.next(), if in_hand.len() < window => match pulled(stage, next)? {
                        Pulled::Message(message) => {
                            let (this, token) = (&self, &token);
                            in_hand.push(async move { this.handle(handler, std::slice::from_ref(&message), token).await });
                        }
                        Pulled::Reconnect => continue 'connect,
                        Pulled::Nothing => {}
                    },
                }
            }
        }
        while in_hand.next().await.is_some() {}
        tracing::info!(stage, "consumer stopped");
        Ok(())
    }

    /// Starts pulling, trying again after a growing pause until it works; `None` once
    /// cancelled.
    async fn connect(&self, token: &CancellationToken) -> Option<MessageStream> {
        let mut connect_pauses = pauses();
        while !token.is_cancelled() {
            match self.pull().await {
                Ok(messages) => return Some(messages),
                Err(error) => {
                    let pause = connect_pauses.next().unwrap_or(MAX_PAUSE);
                    tracing::warn!(stage = self.stage, error = %error, retry_in_ms = pause.as_millis() as u64,
                        "cannot start pulling; retrying");
                    sleep_or_cancel(pause, token).await;
                }
            }
        }
        None
    }

    /// Starts pulling: continuous pull requests of up to a batch each.
    async fn pull(&self) -> Result<MessageStream, StreamError> {
        let stream = self.consumer.stream().max_messages_per_batch(self.max_batch);
        let stream = match self.group {
            // A standby's pulls wait for the pin: short expiries let it notice a free pin soon.
            Some(group) => stream.group(group).expires(Duration::from_secs(2)).heartbeat(Duration::from_millis(500)),
            None => stream.heartbeat(Duration::from_secs(5)).expires(Duration::from_secs(30)),
        };
        stream.messages().await
    }

    /// Handles one batch to the end: again after each transient failure, kept alive all along,
    /// then settled. Handed back (NAK) when cancelled while held.
    async fn handle<H: BatchHandler>(&self, handler: &H, messages: &[Message], token: &CancellationToken) {
        let stage = self.stage;
        let mut pauses = pauses();
        let mut attempt = 1;
        let metrics = self.bus.metrics();
        let labels = StageLabels { stage };
        loop {
            let started = std::time::Instant::now();
            let handled = self.keep_alive(messages, handler.handle(&Batch { messages, attempt })).await;
            metrics.stage_handle_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            match handled {
                Ok(outcomes) => {
                    metrics.stage_batches.get_or_create(&labels).inc();
                    self.settle(messages, outcomes).await;
                    return;
                }
                Err(transient) => {
                    metrics.stage_held.get_or_create(&labels).inc();
                    let pause = pauses.next().unwrap_or(MAX_PAUSE);
                    tracing::warn!(stage, attempt, error = %transient,
                        cause = %std::error::Error::source(&transient).map(ToString::to_string).unwrap_or_default(),
                        retry_in_ms = pause.as_millis() as u64, "dependency unavailable; holding the batch");
                    let cancelled = self
                        .keep_alive(messages, async {
                            tokio::select! {
                                _ = token.cancelled() => true,
                                _ = tokio::time::sleep(pause) => false,
                            }
                        })
                        .await;
                    if cancelled {
                        let outcomes = vec![Outcome::Retry { after: Duration::ZERO }; messages.len()];
                        self.settle(messages, outcomes).await;
                        return;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Runs `work`, sending a progress ack for every message of the batch each heartbeat.
    async fn keep_alive<T>(&self, messages: &[Message], work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut beats = tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = beats.tick() => {
                    for message in messages {
                        // A lost progress ack at worst means a redelivery, which effects tolerate.
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    async fn settle(&self, batch: &[Message], outcomes: Vec<Outcome>) {
        debug_assert_eq!(batch.len(), outcomes.len());
        for (message, outcome) in batch.iter().zip(outcomes) {
            let (kind, counted) = match outcome {
                Outcome::Ack => (AckKind::Ack, "ack"),
                Outcome::Retry { after } => (AckKind::Nak(Some(after)), "retry"),
                Outcome::Reject(rejection) => {
                    match deadletter::publish(&self.bus, self.stage, Original::of(message), &rejection).await {
                        Ok(()) => (AckKind::Term, "dead_letter"),
                        Err(error) => {
                            tracing::error!(stage = self.stage, error = %error, "cannot dead-letter; will retry");
                            (AckKind::Nak(Some(Duration::from_secs(5))), "retry")
                        }
                    }
                }
            };
            let labels = OutcomeLabels { stage: self.stage, outcome: counted };
            self.bus.metrics().stage_messages.get_or_create(&labels).inc();
            // A lost ack only means a redelivery, which every effect tolerates (idempotent).
            if let Err(error) = message.ack_with(kind).await {
                tracing::warn!(stage = self.stage, error = %error, "ack failed");
            }
        }
    }
}

/// What the message stream gave.
#[expect(clippy::large_enum_variant, reason = "lives for one match; boxing would allocate per message")]
enum Pulled {
    Message(Message),
    /// The stream ended: pull again.
    Reconnect,
    /// A passing pull error (logged).
    Nothing,
}

fn pulled(stage: &'static str, next: Option<Result<Message, MessagesError>>) -> Result<Pulled, ConsumeError> {
    match next {
        None => {
            tracing::warn!(stage, "message stream ended; pulling again");
            Ok(Pulled::Reconnect)
        }
        Some(Err(error)) if error.kind() == MessagesErrorKind::ConsumerDeleted => {
            Err(ConsumeError::ConsumerDeleted(stage.to_owned()))
        }
        Some(Err(error)) => {
            tracing::warn!(stage, error = %error, error.kind = ?error.kind(), "pull error");
            Ok(Pulled::Nothing)
        }
        Some(Ok(message)) => Ok(Pulled::Message(message)),
    }
}

/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Pauses between tries: 100 ms doubling to [`MAX_PAUSE`], with jitter, never ending.
fn pauses() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_PAUSE)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Takes whatever else is already here, without waiting on a timer: batches grow with load and
/// a lone event is not held back. A few yields let the client's reader parse the rest of a
/// socket read that is already in.
async fn gather(messages: &mut MessageStream, batch: &mut Vec<Message>, max_batch: usize) {
    let mut idle_yields = 0;
    while batch.len() < max_batch && idle_yields < GATHER_YIELDS {
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
}

/// Hands back what was pulled but not handled, so another instance gets it now instead of
/// after the ack wait.
async fn release_buffered(stage: &str, messages: &mut MessageStream, limit: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_bound_and_never_end() {
        let taken: Vec<Duration> = pauses().take(50).collect();
        assert_eq!(taken.len(), 50);
        assert!(taken[0] >= Duration::from_millis(100) && taken[0] < Duration::from_millis(250), "{:?}", taken[0]);
        assert!(taken.iter().all(|pause| *pause <= MAX_PAUSE * 2), "jitter stays bounded");
        assert!(taken[49] >= MAX_PAUSE);
    }
}
