//! The persister stage: stores every event of EVENTS in PostgreSQL.
//!
//! Reads the durable `persister` consumer of EVENTS. Writes `event.events`, stream versions
//! and rollups (one transaction per batch), then `event.stored` on EVENT_SERVICE, then tells
//! waiting gateways (core NATS) that their events are stored, then acks.
//!
//! Guarantees: an event is acked only after its row is committed and its `event.stored` is
//! acknowledged; storing is idempotent by event id; what cannot be parsed or validated goes to
//! `deadletter.persister`. While PostgreSQL is unreachable the batch in hand is held and
//! retried with backoff (keeping the messages alive with progress acks) rather than NAKed:
//! NAKing would only reshuffle the stream order that stream versions follow, and nothing new
//! is pulled meanwhile, so nothing is lost and order holds.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{self, Bus, BusError, Outgoing};
use crate::consume::{BatchHandler, ConsumeLoop, Outcome};
use crate::ingest::{self, Defaults};
use crate::model::{EventCategory, EventSource, event_id_from_key};
use crate::settings::PersisterArgs;
use crate::store::{self, Incoming};
use crate::{db, subject};

pub const STAGE: &str = "persister";

/// A built persister, ready to run.
pub struct Persister {
    consume: ConsumeLoop,
    pool: PgPool,
    bus: Bus,
}

impl Persister {
    /// Checks that the durable consumer exists; fails loudly if the topology is missing.
    pub async fn build(bus: Bus, pool: PgPool, settings: &PersisterArgs) -> Result<Self, BusError> {
        let consumer = bus.consumer("EVENTS", STAGE).await?;
        let consume = ConsumeLoop { stage: STAGE, bus: bus.clone(), consumer, max_batch: settings.batch_size.max(1) };
        Ok(Self { consume, pool, bus })
    }

    pub async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        let handler = Handler { pool: self.pool, bus: self.bus, token: token.clone() };
        tracing::info!(stage = STAGE, "persister running");
        self.consume.run(&handler, token).await?;
        Ok(())
    }
}

struct Handler {
    pool: PgPool,
    bus: Bus,
    token: CancellationToken,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut positions = Vec::with_capacity(batch.len());
        let mut incoming = Vec::with_capacity(batch.len());
        for (position, message) in batch.iter().enumerate() {
            match decode(message) {
                Ok(event) => {
                    positions.push(position);
                    incoming.push(event);
                }
                Err(rejection) => outcomes[position] = rejection,
            }
        }
        if incoming.is_empty() {
            return outcomes;
        }
        let new_ids = match self.store(batch, &positions, &incoming, &mut outcomes).await {
            Some(new_ids) => new_ids,
            None => {
                // Cancelled while the database was away: hand the messages back at once.
                for position in positions {
                    outcomes[position] = Outcome::Retry { after: Duration::ZERO };
                }
                return outcomes;
            }
        };
        self.announce(batch, &positions, &incoming, &new_ids, &mut outcomes).await;
        self.notify_gateways(batch, &positions, &incoming, &outcomes).await;
        outcomes
    }
}

impl Handler {
    /// Stores the batch, waiting out database outages. Returns the ids written now, or
    /// `None` if cancelled first. Events that PostgreSQL refuses for their content are
    /// rejected one by one, so one bad event never blocks the others.
    async fn store(
        &self,
        batch: &[Message],
        positions: &[usize],
        incoming: &[Incoming],
        outcomes: &mut [Outcome],
    ) -> Option<HashSet<Uuid>> {
        let mut pause = Duration::from_millis(100);
        let mut last_progress = Instant::now();
        loop {
            match store::insert_batch(&self.pool, incoming).await {
                Ok(inserted) => return Some(inserted.new_ids),
                Err(error) if db::is_transient(&error) => {
                    tracing::warn!(stage = STAGE, error = %error, retry_in_ms = pause.as_millis() as u64,
                        "database unavailable; holding the batch");
                    if last_progress.elapsed() > Duration::from_secs(15) {
                        for &position in positions {
                            let _ = batch[position].ack_with(AckKind::Progress).await;
                        }
                        last_progress = Instant::now();
                    }
                    tokio::select! {
                        _ = self.token.cancelled() => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(error) if incoming.len() > 1 => {
                    tracing::warn!(stage = STAGE, error = %error, "batch refused; storing events one by one");
                    let mut new_ids = HashSet::new();
                    for (index, event) in incoming.iter().enumerate() {
                        let single = std::slice::from_ref(event);
                        let mut single_outcome = [Outcome::Ack];
                        match Box::pin(self.store(batch, &positions[index..=index], single, &mut single_outcome)).await
                        {
                            Some(ids) => new_ids.extend(ids),
                            None => return None,
                        }
                        outcomes[positions[index]] = single_outcome[0].clone();
                    }
                    return Some(new_ids);
                }
                Err(error) => {
                    outcomes[positions[0]] = Outcome::reject("store_refused", error.to_string());
                    return Some(HashSet::new());
                }
            }
        }
    }

    /// Publishes `event.stored` for the events written now and for redelivered ones (whose
    /// first announcement may have been lost in a crash). A failed announcement NAKs the
    /// message: its redelivery finds the row and announces again.
    async fn announce(
        &self,
        batch: &[Message],
        positions: &[usize],
        incoming: &[Incoming],
        new_ids: &HashSet<Uuid>,
        outcomes: &mut [Outcome],
    ) {
        let mut announced = Vec::new();
        let mut messages = Vec::new();
        for (&position, item) in positions.iter().zip(incoming) {
            let redelivered = batch[position].info().map(|info| info.delivered > 1).unwrap_or(false);
            if outcomes[position] != Outcome::Ack || !(new_ids.contains(&item.event.event_id) || redelivered) {
                continue;
            }
            let payload = StoredAnnouncement::of(item);
            let Ok(payload) = serde_json::to_vec(&payload) else { continue };
            let mut message = Outgoing::event(subject::EVENT_STORED.to_owned(), item.event.event_id, payload.into());
            // Distinct from the event's own message id, stable across redeliveries.
            message
                .headers
                .insert(async_nats::header::NATS_MESSAGE_ID, format!("stored.{}", item.event.event_id).as_str());
            announced.push(position);
            messages.push(message);
        }
        for (position, result) in announced.into_iter().zip(self.bus.publish_all(messages).await) {
            if let Err(error) = result {
                tracing::warn!(stage = STAGE, error = %error, "cannot publish event.stored; will redeliver");
                outcomes[position] = Outcome::Retry { after: Duration::from_secs(1) };
            }
        }
    }

    /// Tells each waiting gateway which of its events are stored (read-your-writes). Best
    /// effort: a gateway that misses it checks PostgreSQL itself before giving up.
    async fn notify_gateways(
        &self,
        batch: &[Message],
        positions: &[usize],
        incoming: &[Incoming],
        outcomes: &[Outcome],
    ) {
        let mut by_subject: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
        for (&position, item) in positions.iter().zip(incoming) {
            if outcomes[position] != Outcome::Ack {
                continue;
            }
            let notify = batch[position].headers.as_ref().and_then(|headers| headers.get(bus::NOTIFY_HEADER));
            if let Some(notify) = notify {
                by_subject.entry(notify.as_str()).or_default().push(item.event.event_id);
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
    timestamp: chrono::DateTime<Utc>,
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
fn decode(message: &Message) -> Result<Incoming, Outcome> {
    let info = message.info().map_err(|error| Outcome::reject("no_metadata", error.to_string()))?;
    let stream_seq = info.stream_sequence;
    let published = info.published;
    let value: Value = serde_json::from_slice(&message.payload)
        .map_err(|error| Outcome::reject("invalid_json", format!("payload is not JSON: {error}")))?;
    let (source, category, event_type) = subject::parse_event_subject(&message.subject)
        .map(|(source, category, event_type)| {
            (EventSource::parse(source), EventCategory::parse(category), Some(event_type))
        })
        .unwrap_or((None, None, None));
    let msg_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|id| id.as_str().to_owned());
    let event_id = match msg_id {
        Some(id) => Uuid::parse_str(&id).unwrap_or_else(|_| event_id_from_key("nats-msg-id", &id)),
        None => positional_id(published, stream_seq),
    };
    let defaults = Defaults {
        now: published,
        event_source: source.unwrap_or(EventSource::Backend),
        event_category: category.unwrap_or(EventCategory::UserAction),
        event_id: Some(event_id),
        event_type,
    };
    let event = ingest::parse_event(&value, &defaults).map_err(|errors| {
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
        Outcome::reject("validation_failed", detail)
    })?;
    Ok(Incoming { event, stream_seq, subject: message.subject.to_string() })
}

/// A time-ordered id that is the same on every redelivery of the message.
fn positional_id(published: chrono::DateTime<Utc>, stream_seq: u64) -> Uuid {
    let mut tail = [0u8; 10];
    tail[2..].copy_from_slice(&stream_seq.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(published.timestamp_millis().max(0) as u64, &tail).into_uuid()
}
