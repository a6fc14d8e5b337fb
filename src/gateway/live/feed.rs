//! The live feed: one ordered JetStream consumer on EVENTS per gateway, shared by every live
//! tail through a broadcast channel, so a hundred tails cost one consumer and one decode per
//! event. It runs only while a tail listens.
//!
//! Reads EVENTS (from the newest message on, or for one tail's catch-up from a sequence on);
//! writes nothing. Guarantees: events are broadcast in stream order with their sequence; a
//! message that does not decode as an event is skipped (the persister dead-letters it); a
//! receiver that falls more than the channel's capacity behind is told so (`Lagged`) rather
//! than slowing the feed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::domain::Event;
use crate::infra::bus::{Bus, BusError};
use crate::wire::{codec, subjects};

/// Events a tail may fall behind the feed before it is cut off (it resumes with
/// `Last-Event-ID`).
const CAPACITY: usize = 4096;
/// How long one catch-up waits for the next message before it takes what it has.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// One event on the feed: its EVENTS sequence, the event, and its SSE frame (rendered once,
/// shared by every tail that sends it).
#[derive(Debug)]
pub struct LiveEvent {
    pub seq: u64,
    pub event: Event,
    pub shared_frame: Bytes,
}

/// `id: {seq}`, `event: event`, `data: {json}` (compact JSON has no line breaks).
fn frame(seq: u64, json: &str) -> Bytes {
    Bytes::from(format!("id: {seq}\nevent: event\ndata: {json}\n\n"))
}

/// The shared feed of one gateway.
pub struct LiveFeed {
    bus: Bus,
    sender: broadcast::Sender<Arc<LiveEvent>>,
    /// Whether the feed task runs; changed only under this lock, with the receiver count.
    running: Mutex<bool>,
    token: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot read EVENTS: {0}")]
    Read(String),
}

impl LiveFeed {
    pub fn new(bus: Bus, token: CancellationToken) -> Arc<Self> {
        let (sender, _) = broadcast::channel(CAPACITY);
        Arc::new(Self { bus, sender, running: Mutex::new(false), token })
    }

    /// A receiver of every event from now on; starts the feed if it is not running.
    pub fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Arc<LiveEvent>> {
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let receiver = self.sender.subscribe();
        if !*running {
            *running = true;
            let feed = self.clone();
            tokio::spawn(async move { feed.run().await });
        }
        receiver
    }

    /// Tails listening now.
    pub fn listeners(&self) -> usize {
        self.sender.receiver_count()
    }

    /// Whether the feed should stop (nobody listens, or shutdown); if so, marks it stopped.
    fn stop_if_idle(&self) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.sender.receiver_count() == 0 || self.token.is_cancelled() {
            *running = false;
            return true;
        }
        false
    }

    async fn run(self: Arc<Self>) {
        tracing::info!("live feed started");
        // The last sequence broadcast: after an error the feed goes on from there, so the
        // tails listening see no gap.
        let mut last = None;
        while !self.stop_if_idle() {
            if let Err(error) = self.follow(&mut last).await {
                tracing::warn!(%error, "live feed interrupted; starting again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tracing::info!("live feed stopped: no tail listens");
    }

    /// Follows EVENTS after `last` (from the newest message when it is `None`) until nobody
    /// listens or it fails.
    async fn follow(&self, last: &mut Option<u64>) -> Result<(), FeedError> {
        let policy = match *last {
            Some(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
            None => DeliverPolicy::New,
        };
        let mut messages = ordered(&self.events().await?, policy).await?;
        let mut idle = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        if let Ok(info) = message.info() {
                            *last = Some(info.stream_sequence);
                        }
                        if let Some(live) = live_event(&message) {
                            // No receiver is not an error: the idle check stops the feed.
                            let _ = self.sender.send(Arc::new(live));
                        }
                    }
                    Some(Err(error)) => return Err(FeedError::Read(error.to_string())),
                    None => return Err(FeedError::Read("the ordered consumer ended".into())),
                },
                _ = idle.tick() => {}
                _ = self.token.cancelled() => {}
            }
            if self.sender.receiver_count() == 0 || self.token.is_cancelled() {
                return Ok(());
            }
        }
    }

    async fn events(&self) -> Result<Stream<()>, BusError> {
        let name = subjects::streams::EVENTS;
        self.bus
            .jetstream()
            .get_stream_no_info(name)
            .await
            .map_err(|source| BusError::StreamLookup { name: name.to_owned(), source })
    }

    /// The events after `after` up to the newest one now, for a tail resuming with
    /// `Last-Event-ID`: the live feed takes over after the last one.
    pub async fn catch_up(&self, after: u64) -> Result<CatchUp, FeedError> {
        let stream = self.events().await?;
        let newest = stream.get_info().await.map_err(|error| FeedError::Read(error.to_string()))?.state.last_sequence;
        if newest <= after {
            return Ok(CatchUp { messages: None, newest: after });
        }
        let start_sequence = after + 1;
        let messages = ordered(&stream, DeliverPolicy::ByStartSequence { start_sequence }).await?;
        Ok(CatchUp { messages: Some(messages), newest })
    }
}

/// The stored events a resuming tail missed, read from JetStream.
pub struct CatchUp {
    messages: Option<async_nats::jetstream::consumer::pull::Ordered>,
    /// The newest sequence when the catch-up began: it ends there.
    pub newest: u64,
}

impl CatchUp {
    /// The next missed event (undecodable messages skipped); `None` once caught up.
    pub async fn next(&mut self) -> Result<Option<LiveEvent>, FeedError> {
        loop {
            let Some(messages) = self.messages.as_mut() else { return Ok(None) };
            let message = match tokio::time::timeout(CATCH_UP_WAIT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(FeedError::Read(error.to_string())),
                // Not caught up and nothing comes: end the tail rather than skip (the client
                // reconnects with Last-Event-ID).
                Ok(None) | Err(_) => return Err(FeedError::Read("the catch-up stalled".into())),
            };
            let seq = message.info().map(|info| info.stream_sequence).unwrap_or(self.newest);
            if seq >= self.newest {
                self.messages = None;
            }
            if let Some(live) = live_event(&message) {
                return Ok(Some(live));
            }
        }
    }
}

/// An ordered consumer on every event subject.
async fn ordered(
    stream: &Stream<()>,
    deliver_policy: DeliverPolicy,
) -> Result<async_nats::jetstream::consumer::pull::Ordered, FeedError> {
    let config =
        OrderedConfig { filter_subject: subjects::EVENTS_WILDCARD.to_owned(), deliver_policy, ..Default::default() };
    let consumer = stream.create_consumer(config).await.map_err(|error| FeedError::Read(error.to_string()))?;
    consumer.messages().await.map_err(|error| FeedError::Read(error.to_string()))
}

/// The event a message holds, with its sequence and JSON; `None` when it does not decode.
fn live_event(message: &async_nats::jetstream::Message) -> Option<LiveEvent> {
    let incoming = codec::decode(message).ok()?;
    let json = serde_json::to_string(&incoming.event).ok()?;
    Some(LiveEvent { seq: incoming.stream_seq, shared_frame: frame(incoming.stream_seq, &json), event: incoming.event })
}
