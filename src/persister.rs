//! The persister stage: stores every event of EVENTS in PostgreSQL, in stream order.
//!
//! Reads the durable `persister` consumer of EVENTS, and the processor registry. Writes
//! `event.events`, stream versions, rollups and its stream position (one transaction per
//! batch), then the position on `_EVSVC.persisted` (core NATS, for [`crate::watermark`]),
//! then `event.stored` on EVENT_SERVICE, then tells waiting gateways (core NATS) that their
//! events are stored, then acks.
//!
//! Guarantees:
//! - An event that some enabled processor takes is stored `pending`, for the processor stage.
//!   One that none takes has nothing to wait for and is stored `processed` (`processors: []`)
//!   in the same write, instead of being rewritten a moment later. Where the registry changes
//!   in between, the processor stage's view wins: it runs what matches then and writes the
//!   status itself.
//! - An event is acked only after its row is committed and its `event.stored` acknowledged.
//!   Storing is idempotent by event id; what cannot be parsed or validated goes to
//!   `deadletter.persister`.
//! - Events are stored strictly in JetStream sequence order, so entity-stream versions follow
//!   that order. The position stored with each batch says how far it got; a delivery at or
//!   below it is a redelivery, and a gap before a batch (a message whose delivery was lost to
//!   a crash and will only come back after the ack wait) is filled by reading the stream
//!   directly instead of waiting.
//! - While PostgreSQL is unreachable the batch in hand is held and retried with backoff
//!   (keeping the messages alive with progress acks) rather than NAKed: nothing new is pulled
//!   meanwhile, so nothing is lost and nothing is reordered.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{self, Bus, BusError, Outgoing};
use crate::callback::Guard;
use crate::consume::{self, BatchHandler, ConsumeLoop, Original, Outcome, Rejection};
use crate::ingest::{self, Defaults};
use crate::model::{EventCategory, EventSource, EventStatus, event_id_from_key};
use crate::processors::Registry;
use crate::settings::{CallbackArgs, PersisterArgs};
use crate::store::{self, Advance, Incoming, InsertOutcome};
use crate::{db, subject};

pub const STAGE: &str = "persister";
const STREAM: &str = "EVENTS";
/// Most missing messages read from the stream in one go.
const MAX_GAP_FILL: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum PersisterError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot read the persister position or the processor registry")]
    Database(#[from] sqlx::Error),
}

/// A built persister, ready to run.
pub struct Persister {
    consume: ConsumeLoop,
    handler: Handler,
}

impl Persister {
    /// Checks that the stream and the durable consumer exist (fails loudly if the topology is
    /// missing) and that the stored position fits the stream.
    pub async fn build(bus: Bus, pool: PgPool, settings: &PersisterArgs) -> Result<Self, PersisterError> {
        let consumer = bus.consumer(STREAM, STAGE).await?;
        let mut events = bus
            .jetstream()
            .get_stream(STREAM)
            .await
            .map_err(|source| BusError::StreamLookup { name: STREAM.to_owned(), source })?;
        let position = store::persisted_position(&pool, STREAM).await?;
        if let Ok(info) = events.info().await
            && info.state.last_sequence < position
        {
            // The stream was recreated and numbers from 1 again.
            tracing::error!(
                stage = STAGE,
                position,
                stream_last = info.state.last_sequence,
                "EVENTS is behind the stored position; starting over from its beginning"
            );
            store::reset_position(&pool, STREAM, info.state.first_sequence.saturating_sub(1)).await?;
        }
        let consume = ConsumeLoop {
            stage: STAGE,
            bus: bus.clone(),
            consumer,
            max_batch: settings.batch_size.max(1),
            group: None,
        };
        // Only which processors take an event matters here, never how they call out.
        let processors = Registry::load(pool.clone(), Guard::new(&CallbackArgs::default())).await?;
        let handler = Handler { pool, bus, events, processors, token: CancellationToken::new() };
        Ok(Self { consume, handler })
    }

    pub async fn run(mut self, token: CancellationToken) -> anyhow::Result<()> {
        self.handler.token = token.clone();
        tracing::info!(stage = STAGE, "persister running");
        let watch = tokio::spawn(self.handler.processors.clone().watch(self.handler.bus.clone(), token.clone()));
        let result = self.consume.run(&self.handler, token).await;
        watch.abort();
        Ok(result?)
    }
}

struct Handler {
    pool: PgPool,
    bus: Bus,
    events: Stream,
    processors: std::sync::Arc<Registry>,
    token: CancellationToken,
}

/// One EVENTS message, from the consumer or read straight from the stream.
struct Envelope<'a> {
    /// Index in the batch; `None` for a message read to fill a gap.
    position: Option<usize>,
    subject: &'a str,
    headers: Option<&'a HeaderMap>,
    payload: &'a Bytes,
    seq: u64,
    published: DateTime<Utc>,
    redelivered: bool,
}

impl<'a> Envelope<'a> {
    fn original(&self) -> Original<'a> {
        Original {
            subject: self.subject,
            headers: self.headers,
            payload: self.payload,
            stream: STREAM,
            sequence: self.seq,
        }
    }
}

/// A stored (or already stored) event to announce and report.
struct Done<'a> {
    position: Option<usize>,
    incoming: Incoming,
    redelivered: bool,
    notify: Option<&'a str>,
}

enum Attempt {
    Finished,
    /// The position moved under us: read it again.
    Again,
    /// Cancelled or the stream could not be read: hand the batch back.
    GiveBack(Duration),
}

impl BatchHandler for Handler {
    /// A pull request of a stopped or crashed instance may have taken messages with it; the
    /// consumer would hand them out again only after the ack wait. When nothing arrives but
    /// EVENTS holds more than is stored, read the rest from the stream directly.
    async fn idle(&self) {
        let Ok(info) = self.events.get_info().await else { return };
        let Ok(position) = store::persisted_position(&self.pool, STREAM).await else { return };
        if info.state.last_sequence > position {
            tracing::info!(
                stage = STAGE,
                position,
                stream_last = info.state.last_sequence,
                "catching up from the stream"
            );
            let _ = self.attempt(&[], &[], &mut [], info.state.last_sequence).await;
        }
    }

    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut envelopes = Vec::with_capacity(batch.len());
        for (position, message) in batch.iter().enumerate() {
            match message.info() {
                Ok(info) => envelopes.push(Envelope {
                    position: Some(position),
                    subject: message.subject.as_str(),
                    headers: message.headers.as_ref(),
                    payload: &message.payload,
                    seq: info.stream_sequence,
                    published: info.published,
                    redelivered: info.delivered > 1,
                }),
                Err(error) => outcomes[position] = Outcome::reject("no_metadata", error.to_string()),
            }
        }
        envelopes.sort_by_key(|envelope| envelope.seq);
        loop {
            let mut attempt_outcomes = outcomes.clone();
            match self.attempt(batch, &envelopes, &mut attempt_outcomes, 0).await {
                Attempt::Finished => return attempt_outcomes,
                Attempt::Again => continue,
                Attempt::GiveBack(after) => {
                    for envelope in &envelopes {
                        if let Some(position) = envelope.position {
                            outcomes[position] = Outcome::Retry { after };
                        }
                    }
                    return outcomes;
                }
            }
        }
    }
}

impl Handler {
    /// Stores the batch (and anything before it that is missing), or when `catch_up_to` is
    /// beyond it, everything up to that sequence.
    async fn attempt(
        &self,
        batch: &[Message],
        envelopes: &[Envelope<'_>],
        outcomes: &mut [Outcome],
        catch_up_to: u64,
    ) -> Attempt {
        let Some(Ok(stored_up_to)) =
            self.through_outages(batch, || store::persisted_position(&self.pool, STREAM)).await
        else {
            return Attempt::GiveBack(Duration::from_secs(1));
        };
        let mut done = Vec::new();
        // Redeliveries of what is already stored: nothing to write, only to answer for.
        for envelope in envelopes.iter().filter(|envelope| envelope.seq <= stored_up_to) {
            self.decoded(envelope, outcomes, &mut done);
        }
        let fresh: Vec<&Envelope> = envelopes.iter().filter(|envelope| envelope.seq > stored_up_to).collect();
        let last = fresh.last().map_or(catch_up_to, |envelope| envelope.seq.max(catch_up_to));
        if last <= stored_up_to {
            self.finish(batch, &done, &HashSet::new(), outcomes).await;
            return Attempt::Finished;
        }

        let (filled, covered) = match self.fill_gaps(stored_up_to, &fresh, last).await {
            Ok(filled) => filled,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot read EVENTS to fill a gap; handing the batch back");
                return Attempt::GiveBack(Duration::from_secs(1));
            }
        };
        let filled: Vec<Envelope> = filled.iter().map(Envelope::from).collect();
        let mut ordered: Vec<&Envelope> = fresh.into_iter().chain(filled.iter()).collect();
        ordered.sort_by_key(|envelope| envelope.seq);
        // A gap too long to fill at once: store up to where it is filled, the rest later.
        let last = last.min(covered);
        let (within, beyond): (Vec<&Envelope>, Vec<&Envelope>) = ordered.into_iter().partition(|e| e.seq <= last);
        for envelope in beyond {
            if let Some(position) = envelope.position {
                outcomes[position] = Outcome::Retry { after: Duration::ZERO };
            }
        }

        let processors = self.processors.snapshot();
        let mut to_store = Vec::with_capacity(within.len());
        for envelope in within {
            match decode(envelope) {
                Ok(mut incoming) => {
                    if !processors.takes(&incoming.event) {
                        incoming.status = EventStatus::Processed;
                    }
                    to_store.push((envelope, incoming));
                }
                Err(rejection) => match envelope.position {
                    Some(position) => outcomes[position] = Outcome::Reject(rejection),
                    // Read from the stream: dead-letter it now, before the position passes it.
                    None => {
                        if consume::dead_letter(&self.bus, STAGE, envelope.original(), &rejection).await.is_err() {
                            return Attempt::GiveBack(Duration::from_secs(1));
                        }
                    }
                },
            }
        }
        let incoming: Vec<&Incoming> = to_store.iter().map(|(_, incoming)| incoming).collect();
        let advance = Advance { stream: STREAM, from: stored_up_to, to: last };
        let written = self.through_outages(batch, || store::insert_batch(&self.pool, &incoming, Some(advance))).await;
        let new_ids = match written {
            None => return Attempt::GiveBack(Duration::ZERO),
            Some(Ok(InsertOutcome::Stored(new_ids))) => new_ids,
            Some(Ok(InsertOutcome::Conflict)) => return Attempt::Again,
            Some(Err(error)) => match self.store_one_by_one(batch, &to_store, advance, outcomes, error).await {
                Some(Ok(new_ids)) => new_ids,
                Some(Err(attempt)) => return attempt,
                None => return Attempt::GiveBack(Duration::ZERO),
            },
        };
        // The stages that wait for rows (processor, projector) go on now. Best effort: they
        // also read the position themselves.
        if let Err(error) = self.bus.notify(subject::PERSISTED.to_owned(), Bytes::from(last.to_string())).await {
            tracing::debug!(stage = STAGE, error = %error, "cannot announce the position");
        }
        for (envelope, incoming) in to_store {
            if envelope.position.is_some_and(|position| outcomes[position] != Outcome::Ack) {
                continue;
            }
            done.push(Done {
                position: envelope.position,
                incoming,
                redelivered: envelope.redelivered,
                notify: notify_subject(envelope),
            });
        }
        self.finish(batch, &done, &new_ids, outcomes).await;
        Attempt::Finished
    }

    /// A batch PostgreSQL refuses for its content: store the events one by one so that only
    /// the offending ones are rejected, then move the position past all of them.
    async fn store_one_by_one(
        &self,
        batch: &[Message],
        to_store: &[(&Envelope<'_>, Incoming)],
        advance: Advance<'_>,
        outcomes: &mut [Outcome],
        error: sqlx::Error,
    ) -> Option<Result<HashSet<Uuid>, Attempt>> {
        tracing::warn!(stage = STAGE, error = %error, "batch refused; storing events one by one");
        let mut new_ids = HashSet::new();
        for (envelope, incoming) in to_store {
            let single = &[incoming];
            match self.through_outages(batch, || store::insert_batch(&self.pool, single, None)).await? {
                Ok(InsertOutcome::Stored(ids)) => new_ids.extend(ids),
                Ok(InsertOutcome::Conflict) => return Some(Err(Attempt::Again)),
                Err(error) => {
                    let rejection = Rejection { code: "store_refused", detail: error.to_string() };
                    match envelope.position {
                        Some(position) => outcomes[position] = Outcome::Reject(rejection),
                        None => {
                            if consume::dead_letter(&self.bus, STAGE, envelope.original(), &rejection).await.is_err() {
                                return Some(Err(Attempt::GiveBack(Duration::from_secs(1))));
                            }
                        }
                    }
                }
            }
        }
        match self.through_outages(batch, || store::insert_batch(&self.pool, &[], Some(advance))).await? {
            Ok(InsertOutcome::Stored(_)) => Some(Ok(new_ids)),
            Ok(InsertOutcome::Conflict) => Some(Err(Attempt::Again)),
            Err(_) => Some(Err(Attempt::GiveBack(Duration::from_secs(1)))),
        }
    }

    /// Decodes an already-stored redelivery: poison is rejected again (its first dead-letter
    /// may have failed), the rest is answered for.
    fn decoded<'a>(&self, envelope: &Envelope<'a>, outcomes: &mut [Outcome], done: &mut Vec<Done<'a>>) {
        match decode(envelope) {
            Ok(incoming) => done.push(Done {
                position: envelope.position,
                incoming,
                redelivered: envelope.redelivered,
                notify: notify_subject(envelope),
            }),
            Err(rejection) => {
                if let Some(position) = envelope.position {
                    outcomes[position] = Outcome::Reject(rejection);
                }
            }
        }
    }

    /// Reads the messages up to `last` that the consumer has not delivered (yet): a lost
    /// delivery comes back only after the ack wait. Returns what it read and the sequence up
    /// to which nothing is missing any more.
    async fn fill_gaps(
        &self,
        stored_up_to: u64,
        fresh: &[&Envelope<'_>],
        last: u64,
    ) -> Result<(Vec<OwnedEnvelope>, u64), BusError> {
        let have: HashSet<u64> = fresh.iter().map(|envelope| envelope.seq).collect();
        let missing: Vec<u64> =
            (stored_up_to + 1..=last).filter(|seq| !have.contains(seq)).take(MAX_GAP_FILL as usize).collect();
        let covered = match (missing.len() as u64 == MAX_GAP_FILL, missing.last()) {
            (true, Some(&checked)) => checked,
            _ => last,
        };
        if missing.is_empty() {
            return Ok((Vec::new(), covered));
        }
        tracing::info!(stage = STAGE, from = missing[0], count = missing.len(), "filling a gap from the stream");
        let mut filled = Vec::with_capacity(missing.len());
        for seq in missing {
            match self.events.direct_get(seq).await {
                Ok(message) => filled.push(OwnedEnvelope::from(message)),
                // Removed by retention or a purge: there is nothing to store.
                Err(error) if error.kind() == DirectGetErrorKind::NotFound => {}
                Err(error) => {
                    return Err(BusError::Request(async_nats::RequestError::with_source(
                        async_nats::client::RequestErrorKind::Other,
                        error,
                    )));
                }
            }
        }
        Ok((filled, covered))
    }

    /// Runs a database step, waiting out outages. `None` when cancelled meanwhile.
    async fn through_outages<T, F, Fut>(&self, batch: &[Message], mut step: F) -> Option<Result<T, sqlx::Error>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let mut pause = Duration::from_millis(100);
        let mut last_progress = Instant::now();
        loop {
            match step().await {
                Err(error) if db::is_transient(&error) => {
                    tracing::warn!(stage = STAGE, error = %error, retry_in_ms = pause.as_millis() as u64,
                        "database unavailable; holding the batch");
                    if last_progress.elapsed() > Duration::from_secs(10) {
                        for message in batch {
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                        last_progress = Instant::now();
                    }
                    tokio::select! {
                        _ = self.token.cancelled() => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return Some(other),
            }
        }
    }

    async fn finish(&self, batch: &[Message], done: &[Done<'_>], new_ids: &HashSet<Uuid>, outcomes: &mut [Outcome]) {
        self.announce(done, new_ids, outcomes).await;
        self.notify_gateways(done, outcomes).await;
        debug_assert_eq!(batch.len(), outcomes.len());
    }

    /// Publishes `event.stored` for the events written now and for redelivered ones (whose
    /// first announcement may have been lost in a crash). A failed announcement NAKs the
    /// message: its redelivery finds the row and announces again.
    async fn announce(&self, done: &[Done<'_>], new_ids: &HashSet<Uuid>, outcomes: &mut [Outcome]) {
        let mut announced = Vec::new();
        let mut messages = Vec::new();
        for item in done {
            let event_id = item.incoming.event.event_id;
            if !(new_ids.contains(&event_id) || item.redelivered) {
                continue;
            }
            let Ok(payload) = serde_json::to_vec(&StoredAnnouncement::of(&item.incoming)) else { continue };
            // Distinct from the event's own message id, stable across redeliveries.
            let message = Outgoing::event(subject::EVENT_STORED.to_owned(), event_id, payload.into())
                .with_header("Nats-Msg-Id", &format!("stored.{event_id}"));
            announced.push(item.position);
            messages.push(message);
        }
        for (position, result) in announced.into_iter().zip(self.bus.publish_all(messages).await) {
            if let (Err(error), Some(position)) = (result, position) {
                tracing::warn!(stage = STAGE, error = %error, "cannot publish event.stored; will redeliver");
                outcomes[position] = Outcome::Retry { after: Duration::from_secs(1) };
            }
        }
    }

    /// Tells each waiting gateway which of its events are stored (read-your-writes). Best
    /// effort: a gateway that misses it asks PostgreSQL itself.
    async fn notify_gateways(&self, done: &[Done<'_>], outcomes: &[Outcome]) {
        let mut by_subject: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
        for item in done {
            if item.position.is_some_and(|position| outcomes[position] != Outcome::Ack) {
                continue;
            }
            if let Some(notify) = item.notify {
                by_subject.entry(notify).or_default().push(item.incoming.event.event_id);
            }
        }
        for (notify, ids) in by_subject {
            let Ok(payload) = serde_json::to_vec(&ids) else { continue };
            if let Err(error) = self.bus.notify(notify.to_owned(), Bytes::from(payload)).await {
                tracing::debug!(stage = STAGE, error = %error, "cannot notify gateway");
            }
        }
    }
}

fn notify_subject<'a>(envelope: &Envelope<'a>) -> Option<&'a str> {
    envelope.headers.and_then(|headers| headers.get(bus::NOTIFY_HEADER)).map(|value| value.as_str())
}

/// A message read straight from the stream, owning its parts.
struct OwnedEnvelope {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    seq: u64,
    published: DateTime<Utc>,
}

impl From<async_nats::jetstream::message::StreamMessage> for OwnedEnvelope {
    fn from(message: async_nats::jetstream::message::StreamMessage) -> Self {
        Self {
            subject: message.subject.to_string(),
            headers: message.headers,
            payload: message.payload,
            seq: message.sequence,
            published: message.time,
        }
    }
}

impl<'a> From<&'a OwnedEnvelope> for Envelope<'a> {
    fn from(owned: &'a OwnedEnvelope) -> Self {
        Envelope {
            position: None,
            subject: &owned.subject,
            headers: Some(&owned.headers),
            payload: &owned.payload,
            seq: owned.seq,
            published: owned.published,
            // Its own delivery was lost, so any announcement of it may have been too.
            redelivered: true,
        }
    }
}

/// The payload of `event.stored`.
#[derive(Serialize)]
struct StoredAnnouncement<'a> {
    event_id: Uuid,
    event_type: &'a str,
    event_source: EventSource,
    event_category: EventCategory,
    user_id: Option<&'a str>,
    stream_id: Option<&'a str>,
    stream_seq: u64,
    timestamp: DateTime<Utc>,
}

impl<'a> StoredAnnouncement<'a> {
    fn of(item: &'a Incoming) -> Self {
        let event = &item.event;
        Self {
            event_id: event.event_id,
            event_type: &event.event_type,
            event_source: event.event_source,
            event_category: event.event_category,
            user_id: event.user_id.as_deref(),
            stream_id: event.stream_id.as_deref(),
            stream_seq: item.stream_seq,
            timestamp: event.timestamp,
        }
    }
}

/// Turns one EVENTS message into an event to store, or the reason it never can be. Messages
/// from NATS-native producers may leave out what the subject already says (source, category,
/// type) and the id (then `Nats-Msg-Id`, or a stable id from the stream position).
fn decode(envelope: &Envelope<'_>) -> Result<Incoming, Rejection> {
    decode_message(envelope.subject, envelope.headers, envelope.payload, envelope.seq, envelope.published)
}

/// [`decode`] for any stage that reads EVENTS: the message's subject, headers, payload,
/// stream sequence and publish time.
pub fn decode_message(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    seq: u64,
    published: DateTime<Utc>,
) -> Result<Incoming, Rejection> {
    let incoming =
        |event| Incoming { event, stream_seq: seq, subject: subject.to_owned(), status: EventStatus::Pending };
    // What the gateway published (most messages): straight into the event.
    if let Some(event) = ingest::parse_canonical(payload) {
        return Ok(incoming(event));
    }
    let envelope = DecodeInput { subject, headers, payload, seq, published };
    let value: Value = serde_json::from_slice(envelope.payload)
        .map_err(|error| Rejection { code: "invalid_json", detail: format!("payload is not JSON: {error}") })?;
    let (source, category, event_type) = subject::parse_event_subject(envelope.subject)
        .map(|(source, category, event_type)| {
            (EventSource::parse(source), EventCategory::parse(category), Some(event_type))
        })
        .unwrap_or((None, None, None));
    let msg_id = envelope.headers.and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID));
    let event_id = match msg_id.map(|id| id.as_str()) {
        Some(id) => Uuid::parse_str(id).unwrap_or_else(|_| event_id_from_key("nats-msg-id", id)),
        None => positional_id(envelope.published, envelope.seq),
    };
    let defaults = Defaults {
        now: envelope.published,
        event_source: source.unwrap_or(EventSource::Backend),
        event_category: category.unwrap_or(EventCategory::UserAction),
        event_id: Some(event_id),
        event_type,
    };
    let event = ingest::parse_event(value, &defaults).map_err(|errors| {
        let detail = errors
            .iter()
            .map(|error| {
                if error.field.is_empty() {
                    error.message.clone()
                } else {
                    format!("{}: {}", error.field, error.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        Rejection { code: "validation_failed", detail }
    })?;
    Ok(incoming(event))
}

struct DecodeInput<'a> {
    subject: &'a str,
    headers: Option<&'a HeaderMap>,
    payload: &'a [u8],
    seq: u64,
    published: DateTime<Utc>,
}

/// A time-ordered id that is the same on every redelivery of the message.
fn positional_id(published: DateTime<Utc>, stream_seq: u64) -> Uuid {
    let mut tail = [0u8; 10];
    tail[2..].copy_from_slice(&stream_seq.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(published.timestamp_millis().max(0) as u64, &tail).into_uuid()
}
