//! The persister's publisher of STORED: every stored row once, in EVENTS-sequence order.
//!
//! Reads STORED's end (its last sequence and the EVENTS sequence its last message carries),
//! `event.persister_position.announced_seq` and, after a crash or a failed publish, the rows
//! still to publish (`event.events` by `stream_seq`). Writes STORED.
//!
//! Guarantees: each message is published with `Nats-Expected-Last-Sequence`, so STORED only
//! ever grows by the next row in order: a lost publish fails every one after it instead of
//! leaving a hole, and two persisters can never interleave. What follows a failure is
//! published again from the rows, starting where STORED ends, so a message is never repeated
//! however long the persister was down (the duplicate window is only a second line).
//!
//! With STORED off (`EVENT_STORED_STREAM=false`) the rows this instance stores are not
//! published: each write records them as announced ([`super::plan::announced_with_write`]), so
//! STORED, once on again, goes on from the rows stored after that and never publishes the ones
//! stored while it was off. Before its first write counts anything as announced, it publishes
//! the rows an earlier run stored with STORED on but had not published (a crash, a failed
//! publish): turning STORED off never drops a row stored while it was on. Only when STORED
//! refuses them for [`SETTLE_PATIENCE`] does it give up on them, with an error naming the range.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Stream;
use sqlx::PgPool;

use super::STAGE;
use super::plan::{self, Cursor};
use crate::infra::bus::{Bus, BusError};
use crate::infra::consume::Transient;
use crate::store::{events, position};
use crate::wire::stored::StoredRecord;
use crate::wire::subjects::streams;
use crate::wire::{Outgoing, headers};

/// Rows read per round when publishing again from PostgreSQL.
const CATCH_UP_ROWS: i64 = 1_000;

/// With STORED off, how long the rows an earlier run left unpublished hold back acks before
/// they are given up (STORED may be what is broken, and why it was turned off).
pub(super) const SETTLE_PATIENCE: Duration = Duration::from_secs(30);

pub(super) struct Announcer {
    pool: PgPool,
    bus: Bus,
    stored: Stream,
    /// Where STORED ends, as this instance last published; `None` when it must look.
    cursor: Mutex<Option<Cursor>>,
    /// What [`Announcer::record`] last wrote.
    recorded: AtomicU64,
    /// False when STORED is off: rows count as announced without a message.
    publishing: bool,
    /// With STORED off, since when publishing the earlier run's rows has failed.
    settle_failing_since: Mutex<Option<Instant>>,
}

/// The rows of one write, to publish as they are (no need to read them back).
pub(super) struct Fresh<'a> {
    pub records: Vec<StoredRecord<'a>>,
    /// Every row the write stored in its range is in `records` (storing one by one may have
    /// left rows of an earlier attempt).
    pub complete: bool,
}

impl Announcer {
    pub async fn build(pool: PgPool, bus: Bus, publishing: bool) -> Result<Self, BusError> {
        let stored = bus
            .jetstream()
            .get_stream(streams::STORED)
            .await
            .map_err(|source| BusError::StreamLookup { name: streams::STORED.to_owned(), source })?;
        bus.metrics().watch_stored(stored.clone());
        Ok(Self {
            pool,
            bus,
            stored,
            cursor: Mutex::new(None),
            recorded: AtomicU64::new(0),
            publishing,
            settle_failing_since: Mutex::new(None),
        })
    }

    /// False when STORED is off.
    pub fn publishing(&self) -> bool {
        self.publishing
    }

    /// Publishes every row stored up to `to`, given that the rows up to `from` were stored
    /// before this write and `fresh` holds the write's rows `(from, to]`.
    pub async fn announce(&self, from: u64, to: u64, fresh: Fresh<'_>) -> Result<(), Transient> {
        if !self.publishing {
            return self.pass_over(from, to).await;
        }
        let mut cursor = match self.cursor() {
            Some(cursor) if cursor.through == from => cursor,
            _ => self.find_end(from).await?,
        };
        if cursor.through < to {
            let result = if cursor.through == from && fresh.complete {
                self.publish(cursor, &fresh.records, to).await
            } else {
                self.catch_up(cursor, to).await
            };
            cursor = match result {
                Ok(cursor) => cursor,
                Err(error) => {
                    self.set(None);
                    return Err(error);
                }
            };
        }
        self.set(Some(cursor));
        Ok(())
    }

    /// Records how far STORED holds the rows, for when its messages have all expired.
    pub async fn record(&self) {
        let through = self.known();
        if through <= self.recorded.load(Ordering::Relaxed) {
            return;
        }
        match position::record_announced(&self.pool, streams::EVENTS, through).await {
            Ok(()) => self.recorded.store(through, Ordering::Relaxed),
            Err(error) => tracing::debug!(stage = STAGE, error = %error, "cannot record the STORED position"),
        }
    }

    /// How far STORED holds the rows, as this instance knows it (0: it must look).
    pub fn known(&self) -> u64 {
        self.through().unwrap_or(0)
    }

    /// How far STORED holds the rows, `None` until this instance has looked.
    pub fn through(&self) -> Option<u64> {
        self.cursor().map(|cursor| cursor.through)
    }

    fn cursor(&self) -> Option<Cursor> {
        self.cursor.lock().ok().and_then(|cursor| *cursor)
    }

    fn set(&self, cursor: Option<Cursor>) {
        if let Ok(mut slot) = self.cursor.lock() {
            *slot = cursor;
        }
    }

    /// With STORED off: the rows `(from, to]` count as on STORED without a message, once the
    /// rows up to `from` that an earlier run stored with STORED on are published.
    async fn pass_over(&self, from: u64, to: u64) -> Result<(), Transient> {
        let through = match self.through() {
            Some(through) => through,
            None => self.settle(from).await?,
        };
        self.set(Some(Cursor { stored_last: 0, through: to.max(through) }));
        Ok(())
    }

    /// Publishes the rows up to `from` not yet on STORED, and returns how far STORED holds
    /// them. A failure holds the caller's acks, until [`SETTLE_PATIENCE`] has passed.
    async fn settle(&self, from: u64) -> Result<u64, Transient> {
        let result = match self.find_end(from).await {
            Ok(cursor) => self.catch_up(cursor, from).await,
            Err(error) => Err(error),
        };
        let failing_for = self.settle_failing_for(result.is_err());
        match result {
            Ok(cursor) => Ok(cursor.through),
            Err(error) if !plan::give_up_settling(failing_for, SETTLE_PATIENCE) => Err(error),
            Err(error) => {
                tracing::error!(
                    stage = STAGE,
                    error = %error,
                    up_to = from,
                    "STORED is off and refused the rows an earlier run stored with it on; they are not published (they are in PostgreSQL)"
                );
                Ok(from)
            }
        }
    }

    /// How long settling has failed, counting this attempt (`failed`); zero once it works.
    fn settle_failing_for(&self, failed: bool) -> Duration {
        let Ok(mut since) = self.settle_failing_since.lock() else { return Duration::ZERO };
        if !failed {
            *since = None;
            return Duration::ZERO;
        }
        since.get_or_insert_with(Instant::now).elapsed()
    }

    /// Where STORED ends: its last sequence, and the EVENTS sequence of its last message (the
    /// recorded position when STORED holds none, or when EVENTS was recreated since).
    async fn find_end(&self, stored_position: u64) -> Result<Cursor, Transient> {
        let unreadable = |error: async_nats::Error| Transient::new("cannot read where STORED ends", error);
        let info = self.stored.get_info().await.map_err(|error| unreadable(error.into()))?;
        let last = info.state.last_sequence;
        let on_stored = if info.state.messages == 0 {
            None
        } else {
            match self.stored.direct_get(last).await {
                Ok(message) => {
                    message.headers.get(headers::EVENTS_SEQUENCE).and_then(|value| value.as_str().parse::<u64>().ok())
                }
                Err(error) if error.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => None,
                Err(error) => return Err(unreadable(error.into())),
            }
        };
        let recorded = position::announced_position(&self.pool, streams::EVENTS)
            .await
            .map_err(|error| Transient::new("cannot read the STORED position", error))?;
        // Read after STORED's end: another persister may have stored and published beyond
        // the position this attempt started from, which is not a recreated EVENTS.
        let stored_position = position::read_position(&self.pool, streams::EVENTS)
            .await
            .map_err(|error| Transient::new("cannot read the persister position", error))?
            .max(stored_position);
        let through = plan::stored_resume_point(on_stored, recorded, stored_position);
        if let Some(skipped) = plan::passed_over(on_stored, recorded, stored_position) {
            tracing::info!(
                stage = STAGE,
                after = skipped.0,
                through = skipped.1,
                "rows stored while STORED was off are not on it; it goes on after them"
            );
        }
        tracing::info!(stage = STAGE, stored_last = last, through, "found where STORED ends");
        Ok(Cursor { stored_last: last, through })
    }

    /// Publishes the stored rows `(cursor.through, to]`, read back from PostgreSQL.
    async fn catch_up(&self, mut cursor: Cursor, to: u64) -> Result<Cursor, Transient> {
        while cursor.through < to {
            let rows = events::events_in_sequence(&self.pool, cursor.through, to, CATCH_UP_ROWS)
                .await
                .map_err(|error| Transient::new("cannot read the rows to publish to STORED", error))?;
            let full = rows.len() as i64 == CATCH_UP_ROWS;
            let events: Vec<_> = rows.iter().map(|row| row.to_event()).collect();
            let records: Vec<StoredRecord> = rows
                .iter()
                .zip(&events)
                .map(|(row, event)| StoredRecord {
                    event,
                    stream_version: row.stream_version,
                    stream_seq: row.stream_seq.max(0) as u64,
                    stored_at: row.stored_at,
                    trace: None,
                })
                .collect();
            if !records.is_empty() {
                tracing::info!(
                    stage = STAGE,
                    from = cursor.through,
                    count = records.len(),
                    "publishing to STORED again"
                );
            }
            let through = match (full, records.last()) {
                (true, Some(last)) => last.stream_seq,
                _ => to,
            };
            cursor = self.publish(cursor, &records, through).await?;
        }
        Ok(cursor)
    }

    /// Publishes `records` (in EVENTS-sequence order, every row up to `through` after
    /// `cursor.through`) right after STORED's last message.
    async fn publish(&self, cursor: Cursor, records: &[StoredRecord<'_>], through: u64) -> Result<Cursor, Transient> {
        let max_payload = self.bus.client().server_info().max_payload;
        let mut messages = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            let message: Outgoing = record
                .to_message_within(cursor.stored_last + index as u64, max_payload)
                .map_err(|error| Transient::new("cannot encode a STORED message", error))?;
            messages.push(message);
        }
        let mut last = cursor.stored_last;
        for result in self.bus.publish_all(messages).await {
            match result {
                Ok(ack) => last = ack.sequence.max(last),
                Err(error) => return Err(Transient::new("cannot publish to STORED", error)),
            }
        }
        self.bus.metrics().stored_published.inc_by(records.len() as u64);
        Ok(Cursor { stored_last: last, through })
    }
}
