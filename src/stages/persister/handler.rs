//! The persister's I/O shell: reads the position, fills gaps from the stream, writes the
//! batch, publishes what it stored to STORED ([`super::announce`]). The decisions are
//! [`super::plan`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use bytes::Bytes;
use sqlx::PgPool;
use uuid::Uuid;

use super::announce::{Announcer, Fresh};
use super::envelope::{Envelope, OwnedEnvelope};
use super::plan::{self, Plan};
use super::{MAX_GAP_FILL, STAGE};
use crate::infra::bus::{Bus, BusError};
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::infra::db;
use crate::infra::deadletter;
use crate::registry::Registry;
use crate::registry::processors::ProcessorRegistry;
use crate::registry::schemas::{SchemaSet, Schemas};
use crate::store::NewEvent;
use crate::store::position::{self, Advance};
use crate::store::write::{self, InsertOutcome, Written};
use crate::wire::stored::StoredRecord;
use crate::wire::subjects::{self, streams};
use crate::wire::{Incoming, Rejection};

pub(super) struct Handler {
    pub pool: PgPool,
    pub bus: Bus,
    /// EVENTS itself, to fill gaps and to catch up when idle.
    pub events: Stream,
    pub processors: std::sync::Arc<ProcessorRegistry>,
    pub schemas: std::sync::Arc<Registry<Schemas>>,
    pub retention_days: Option<u32>,
    pub announcer: Announcer,
}

/// An event stored (now or before) to report to the gateway waiting for it.
struct Done<'a> {
    position: Option<usize>,
    event_id: Uuid,
    notify: Option<&'a str>,
}

/// What one write stored: its rows, and whether they are all of the range it covered.
struct Write {
    written: Written,
    complete: bool,
}

/// An event to store: where it came from, what it is, the status it starts in.
type ToStore<'e, 'a> = (&'e Envelope<'a>, Incoming, crate::domain::EventStatus);

enum Attempt {
    Finished(Vec<Outcome>),
    /// The position moved under us: read it again.
    Again,
}

fn database(what: &'static str) -> impl FnOnce(sqlx::Error) -> Transient {
    move |error| Transient::new(what, error)
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        let mut outcomes = vec![Outcome::Ack; batch.messages.len()];
        let mut envelopes = Vec::with_capacity(batch.messages.len());
        for (position, message) in batch.messages.iter().enumerate() {
            match Envelope::of(position, message) {
                Ok(envelope) => envelopes.push(envelope),
                Err(rejection) => outcomes[position] = Outcome::Reject(rejection),
            }
        }
        envelopes.sort_by_key(|envelope| envelope.seq);
        loop {
            if let Attempt::Finished(outcomes) = self.attempt(&envelopes, outcomes.clone(), 0).await? {
                return Ok(outcomes);
            }
        }
    }

    /// A pull request of a stopped or crashed instance may have taken messages with it; the
    /// consumer would hand them out again only after the ack wait. When nothing arrives but
    /// EVENTS holds more than is stored, read the rest from the stream directly.
    /// Also finishes STORED after a restart or a failed publish without waiting for the
    /// redeliveries, and records how far it got.
    async fn idle(&self) {
        let Ok(stored) = position::persisted_position(&self.pool, streams::EVENTS).await else { return };
        if self.announcer.known() < stored {
            let nothing = Fresh { records: Vec::new(), complete: true };
            if let Err(error) = self.announcer.announce(stored, stored, nothing).await {
                tracing::warn!(stage = STAGE, error = %error, "cannot publish to STORED; trying again when idle");
            }
        }
        self.announcer.record().await;
        let Ok(info) = self.events.get_info().await else { return };
        let last = info.state.last_sequence;
        if last > stored {
            tracing::info!(stage = STAGE, position = stored, stream_last = last, "catching up from the stream");
            if let Err(error) = self.attempt(&[], Vec::new(), last).await {
                tracing::warn!(stage = STAGE, error = %error, "catch-up failed; trying again when idle");
            }
        }
    }
}

impl Handler {
    /// Stores the batch (and anything before it that is missing), or when `catch_up_to` is
    /// beyond it, everything up to that sequence.
    async fn attempt(
        &self,
        envelopes: &[Envelope<'_>],
        mut outcomes: Vec<Outcome>,
        catch_up_to: u64,
    ) -> Result<Attempt, Transient> {
        let stored_up_to = position::persisted_position(&self.pool, streams::EVENTS)
            .await
            .map_err(database("cannot read the persister position"))?;
        let seqs: Vec<u64> = envelopes.iter().map(|envelope| envelope.seq).collect();
        let Plan { stored, store, later, missing, advance_to } =
            plan::plan(stored_up_to, &seqs, catch_up_to, MAX_GAP_FILL);
        let mut done = Vec::new();
        for index in stored {
            // Stored already: checked when it was stored, not again against a newer schema.
            answer_for(&envelopes[index], envelopes[index].decode(), &mut outcomes, &mut done);
        }
        for index in later {
            set(&mut outcomes, envelopes[index].position, Outcome::Retry { after: Duration::ZERO });
        }
        let Some(advance_to) = advance_to else {
            let nothing = Fresh { records: Vec::new(), complete: true };
            self.finish(&done, (stored_up_to, stored_up_to, nothing), &mut outcomes).await;
            return Ok(Attempt::Finished(outcomes));
        };
        let filled = self.read_missing(&missing).await?;
        let filled: Vec<Envelope> = filled.iter().map(Envelope::from).collect();
        let mut ordered: Vec<&Envelope> = store.iter().map(|&index| &envelopes[index]).chain(&filled).collect();
        ordered.sort_by_key(|envelope| envelope.seq);
        let to_store = self.decode_all(ordered, &mut outcomes).await?;
        let announced = plan::announced_with_write(self.announcer.publishing(), self.announcer.through(), advance_to);
        let advance = Advance { stream: streams::EVENTS, from: stored_up_to, to: advance_to, announced };
        let Some(Write { written, complete }) = self.write(&to_store, advance, &mut outcomes).await? else {
            return Ok(Attempt::Again);
        };
        // The stages that wait for rows (processor, projector) go on now. Best effort: they
        // also read the position themselves.
        if let Err(error) = self.bus.notify(subjects::PERSISTED.to_owned(), Bytes::from(advance_to.to_string())).await {
            tracing::debug!(stage = STAGE, error = %error, "cannot announce the position");
        }
        let native = to_store
            .iter()
            .filter(|(envelope, incoming, _)| !envelope.ingested() && written.contains(&incoming.event.event_id))
            .count();
        if native > 0 {
            self.bus.metrics().accepted("nats", native);
        }
        let records = fresh_records(&to_store, &written);
        for (envelope, incoming, _) in &to_store {
            if envelope.position.is_some_and(|position| outcomes[position] != Outcome::Ack) {
                continue;
            }
            let notify = envelope.notify();
            done.push(Done { position: envelope.position, event_id: incoming.event.event_id, notify });
        }
        self.finish(&done, (stored_up_to, advance_to, Fresh { records, complete }), &mut outcomes).await;
        Ok(Attempt::Finished(outcomes))
    }

    /// Reads the messages the consumer has not delivered; one removed meanwhile (retention,
    /// a purge) has nothing to store.
    async fn read_missing(&self, missing: &[u64]) -> Result<Vec<OwnedEnvelope>, Transient> {
        if let Some(first) = missing.first() {
            tracing::info!(stage = STAGE, from = first, count = missing.len(), "filling a gap from the stream");
        }
        let mut filled = Vec::with_capacity(missing.len());
        for &sequence in missing {
            match self.events.direct_get(sequence).await {
                Ok(message) => filled.push(OwnedEnvelope::from(message)),
                Err(error) if error.kind() == DirectGetErrorKind::NotFound => {}
                Err(source) => {
                    let error = BusError::Read { stream: streams::EVENTS.to_owned(), sequence, source };
                    return Err(Transient::new("cannot read EVENTS to fill a gap", error));
                }
            }
        }
        Ok(filled)
    }

    /// Decodes what is to be stored, with the status each starts in. Poison from the batch is
    /// rejected; poison read to fill a gap is dead-lettered now, before the position passes it.
    async fn decode_all<'e, 'a>(
        &self,
        ordered: Vec<&'e Envelope<'a>>,
        outcomes: &mut [Outcome],
    ) -> Result<Vec<ToStore<'e, 'a>>, Transient> {
        let processors = self.processors.snapshot();
        let schemas = self.schemas.snapshot();
        let mut to_store = Vec::with_capacity(ordered.len());
        for envelope in ordered {
            match self.checked(envelope, &schemas) {
                Ok(incoming) => {
                    let status = plan::initial_status(processors.takes(&incoming.event));
                    to_store.push((envelope, incoming, status));
                }
                Err(rejection) => self.refuse(envelope, rejection, outcomes).await?,
            }
        }
        Ok(to_store)
    }

    /// Decodes an envelope; a NATS-native event is also checked against its type's schema
    /// (refused: `schema_violation`; flagged or redacted: changed before it is stored).
    fn checked(&self, envelope: &Envelope<'_>, schemas: &SchemaSet) -> Result<Incoming, Rejection> {
        let mut incoming = envelope.decode()?;
        if envelope.ingested() {
            return Ok(incoming);
        }
        match schemas.check(&mut incoming.event, self.bus.metrics()) {
            Ok(()) => Ok(incoming),
            Err(errors) => {
                let detail: Vec<String> = errors.iter().map(|error| error.summary()).collect();
                Err(Rejection::new("schema_violation", detail.join("; ")).about(incoming.event.event_id))
            }
        }
    }

    /// Rejects a message of the batch, or dead-letters one read from the stream.
    async fn refuse(
        &self,
        envelope: &Envelope<'_>,
        rejection: Rejection,
        outcomes: &mut [Outcome],
    ) -> Result<(), Transient> {
        match envelope.position {
            Some(position) => outcomes[position] = Outcome::Reject(rejection),
            None => deadletter::publish(&self.bus, STAGE, envelope.original(), &rejection)
                .await
                .map_err(|error| Transient::new("cannot dead-letter a message read from the stream", error))?,
        }
        Ok(())
    }

    /// Writes the batch and moves the position; `None` when the position moved meanwhile.
    async fn write(
        &self,
        to_store: &[ToStore<'_, '_>],
        advance: Advance<'_>,
        outcomes: &mut [Outcome],
    ) -> Result<Option<Write>, Transient> {
        let rows: Vec<NewEvent> =
            to_store.iter().map(|(_, incoming, status)| NewEvent { incoming, status: *status }).collect();
        match write::insert_batch(&self.pool, &rows, Some(advance)).await {
            // Complete only when every event of the range was written now: an event whose
            // id an earlier attempt stored (one by one, then crashed) or that the batch
            // repeats has its row elsewhere, so STORED reads them all back from the rows.
            Ok(InsertOutcome::Stored(written)) => {
                let complete = written.versions.len() == to_store.len();
                Ok(Some(Write { written, complete }))
            }
            Ok(InsertOutcome::Conflict) => Ok(None),
            Err(error) if db::is_missing_partition(&error) => {
                super::retention::maintain(&self.pool, &self.bus, self.retention_days).await;
                Err(Transient::new("the day had no partition yet", error))
            }
            Err(error) if db::is_transient(&error) => Err(Transient::new("cannot store the batch", error)),
            Err(error) => self.store_one_by_one(to_store, advance, outcomes, error).await,
        }
    }

    /// A batch PostgreSQL refuses for its content: store the events one by one so that only
    /// the offending ones are rejected, then move the position past all of them. A crash in
    /// between leaves rows an attempt after it does not write, so what goes to STORED is read
    /// back from the rows ([`Write::complete`] is false).
    async fn store_one_by_one(
        &self,
        to_store: &[ToStore<'_, '_>],
        advance: Advance<'_>,
        outcomes: &mut [Outcome],
        error: sqlx::Error,
    ) -> Result<Option<Write>, Transient> {
        tracing::warn!(stage = STAGE, error = %error, "batch refused; storing events one by one");
        let mut written = Written::default();
        for (envelope, incoming, status) in to_store {
            match write::insert_batch(&self.pool, &[NewEvent { incoming, status: *status }], None).await {
                Ok(InsertOutcome::Stored(one)) => written.versions.extend(one.versions),
                Ok(InsertOutcome::Conflict) => return Ok(None),
                Err(error) if db::is_transient(&error) => return Err(Transient::new("cannot store an event", error)),
                Err(error) => {
                    self.refuse(envelope, Rejection::new("store_refused", error.to_string()), outcomes).await?
                }
            }
        }
        match write::insert_batch(&self.pool, &[], Some(advance)).await {
            Ok(InsertOutcome::Stored(_)) => Ok(Some(Write { written, complete: false })),
            Ok(InsertOutcome::Conflict) => Ok(None),
            Err(error) => Err(Transient::new("cannot move the persister position", error)),
        }
    }

    /// Publishes what is stored to STORED, then tells the gateways. `range` is the position
    /// before and after this attempt, and the rows it wrote. A failed publish holds every
    /// message of the batch: nothing is acked before its row is on STORED.
    async fn finish(&self, done: &[Done<'_>], range: (u64, u64, Fresh<'_>), outcomes: &mut [Outcome]) {
        let (from, to, fresh) = range;
        if let Err(error) = self.announcer.announce(from, to, fresh).await {
            tracing::warn!(stage = STAGE, error = %error, "cannot publish to STORED; will try again");
            for outcome in outcomes.iter_mut().filter(|outcome| **outcome == Outcome::Ack) {
                *outcome = Outcome::Retry { after: Duration::from_secs(1) };
            }
        }
        self.notify_gateways(done, outcomes).await;
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
                by_subject.entry(notify).or_default().push(item.event_id);
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

/// The rows a write stored now, in EVENTS order, as STORED publishes them.
fn fresh_records<'e>(to_store: &'e [ToStore<'_, '_>], written: &Written) -> Vec<StoredRecord<'e>> {
    let Some(stored_at) = written.stored_at else { return Vec::new() };
    to_store
        .iter()
        .filter_map(|(_, incoming, _)| {
            let stream_version = *written.versions.get(&incoming.event.event_id)?;
            Some(StoredRecord {
                event: &incoming.event,
                stream_version,
                stream_seq: incoming.stream_seq,
                stored_at,
                trace: Some(&incoming.trace),
            })
        })
        .collect()
}

/// Answers for an already-stored redelivery: poison is rejected again (its first dead-letter
/// may have failed), the rest is reported again to its gateway.
fn answer_for<'a>(
    envelope: &Envelope<'a>,
    decoded: Result<Incoming, Rejection>,
    outcomes: &mut [Outcome],
    done: &mut Vec<Done<'a>>,
) {
    match decoded {
        Ok(incoming) => done.push(Done {
            position: envelope.position,
            event_id: incoming.event.event_id,
            notify: envelope.notify(),
        }),
        Err(rejection) => set(outcomes, envelope.position, Outcome::Reject(rejection)),
    }
}

/// Sets the outcome of a message of the batch (a message read from the stream has none).
fn set(outcomes: &mut [Outcome], position: Option<usize>, outcome: Outcome) {
    if let Some(position) = position {
        outcomes[position] = outcome;
    }
}
