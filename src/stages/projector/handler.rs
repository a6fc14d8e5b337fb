//! The projector's I/O shell for live events: finds which streams a batch of STORED messages
//! touched, folds what is new in them into every projection that covers them, announces new
//! projections.
//!
//! A STORED message exists only once its row is committed, and carries the event's stream
//! version: nothing here waits for the persister or reads positions back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use sqlx::PgPool;

use super::fold::{self, Fold};
use super::read;
use crate::domain::StreamId;
use crate::infra::bus::Bus;
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::registry::definitions::{Definition, DefinitionRegistry};
use crate::store::projections::{self, Projection, StreamEvent};
use crate::wire::stored::{self, StoredStreamEvent};

pub(super) struct Handler {
    pub pool: PgPool,
    pub bus: Bus,
    pub definitions: Arc<DefinitionRegistry>,
    pub snapshot_every: i64,
}

/// What a batch brought, by entity stream.
#[derive(Debug, Default)]
pub(super) struct Arrived {
    /// Every stream the batch touched, with its stored events that came with the batch, in
    /// stream order.
    pub events: BTreeMap<StreamId, Vec<StreamEvent>>,
    /// Streams to read from PostgreSQL whatever came.
    pub read: BTreeSet<StreamId>,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        let outcomes = vec![Outcome::Ack; batch.messages.len()];
        let decoded = batch.messages.iter().filter_map(|message| {
            stored::decode_stream_event(message.headers.as_ref(), &message.payload)
                .inspect_err(|error| {
                    // Its stream is read back from PostgreSQL when its next event comes.
                    tracing::warn!(subject = %message.subject, %error, "cannot read a STORED message; skipped");
                })
                .ok()
        });
        let arrived = arrivals(decoded);
        if arrived.events.is_empty() {
            return Ok(outcomes);
        }
        let created = self.project(arrived).await.map_err(database)?;
        super::announce_created(&self.bus, &created).await;
        Ok(outcomes)
    }
}

fn database(error: sqlx::Error) -> Transient {
    Transient::new("cannot update projections", error)
}

/// The batch's events by stream, in stream order: usually exactly what follows each
/// projection's watermark, so they need not be read back. A message without its data (too
/// large for NATS) or without a version makes its stream read from PostgreSQL, which holds
/// what counts. Events in no stream are left out.
pub(super) fn arrivals(decoded: impl IntoIterator<Item = StoredStreamEvent>) -> Arrived {
    let mut arrived = Arrived::default();
    for event in decoded {
        let Some(stream_id) = event.stream_id else { continue };
        match event.stream_version {
            Some(stream_version) if !event.truncated => {
                arrived.events.entry(stream_id.clone()).or_default().push(StreamEvent {
                    event_id: event.event_id,
                    event_type: event.event_type,
                    data: Value::Object(event.data),
                    stream_id,
                    stream_version,
                    timestamp: event.timestamp,
                });
            }
            _ => {
                arrived.events.entry(stream_id.clone()).or_default();
                arrived.read.insert(stream_id);
            }
        }
    }
    for events in arrived.events.values_mut() {
        events.sort_by_key(|event| event.stream_version);
        events.dedup_by_key(|event| event.stream_version);
    }
    arrived
}

impl Handler {
    /// Folds what is new in these streams into every projection that covers them: the events
    /// that arrived when they continue a stream's watermarks, else what PostgreSQL holds after
    /// them. Returns the projections created.
    async fn project(&self, arrived: Arrived) -> Result<Vec<Projection>, sqlx::Error> {
        let streams: Vec<&StreamId> = arrived.events.keys().collect();
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let set = self.definitions.snapshot();
        let mut tx = self.pool.begin().await?;
        let mut stored = projections::stored_projections(&mut tx, &streams).await?;
        let mut folds: Vec<(Fold, &Definition, &StreamId)> = Vec::new();
        let mut to_read = Vec::new();
        for &stream_id in &streams {
            let Some((entity_type, entity_id)) = stream_id.parts() else { continue };
            let mut from = i64::MAX;
            for definition in set.covering(entity_type) {
                let existing = stored.remove(&(definition.name.clone(), stream_id.clone()));
                let fold = Fold::start(definition, entity_type, entity_id, existing);
                from = from.min(fold.projection.stream_version);
                folds.push((fold, definition, stream_id));
            }
            let events = arrived.events.get(stream_id).map_or(&[][..], Vec::as_slice);
            if from != i64::MAX && (arrived.read.contains(stream_id) || !fold::continues(events, from)) {
                to_read.push((stream_id, from));
            }
        }
        let mut read_back: HashMap<StreamId, Vec<StreamEvent>> = HashMap::new();
        for event in projections::events_after(&mut *tx, &to_read).await? {
            read_back.entry(event.stream_id.clone()).or_default().push(event);
        }
        // Read after the events: a partition that left meanwhile moved first_version in the
        // same transaction as it left. A fold that would skip events that have left (a
        // definition newer than them) stays unfolded; reads of it answer history_expired.
        let first_versions = projections::first_versions(&mut *tx, &streams).await?;
        folds.retain(|(fold, _, stream_id)| {
            let first_version = first_versions.get(*stream_id).copied().unwrap_or(1);
            let whole = read::can_go_on(fold.projection.stream_version, first_version);
            if !whole {
                tracing::warn!(%stream_id, first_version, projection = fold.projection.projection_name,
                    "not folding a stream whose early events have left the store");
            }
            whole
        });
        for (fold, definition, stream_id) in &mut folds {
            let events = read_back.get(*stream_id).or_else(|| arrived.events.get(*stream_id));
            fold.apply(definition, events.map_or(&[][..], Vec::as_slice), self.snapshot_every);
        }
        read::save(&mut tx, folds.iter().map(|(fold, _, _)| fold)).await?;
        tx.commit().await?;
        Ok(folds
            .into_iter()
            .filter(|(fold, _, _)| fold.created && fold.changed && fold.projection.version > 0)
            .map(|(fold, _, _)| fold.projection)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;

    fn stored(stream: Option<&str>, version: Option<i64>, truncated: bool) -> StoredStreamEvent {
        StoredStreamEvent {
            event_id: Uuid::now_v7(),
            event_type: "t".into(),
            data: serde_json::Map::new(),
            stream_id: stream.and_then(StreamId::parse),
            stream_version: version,
            timestamp: Utc::now(),
            truncated,
        }
    }

    #[test]
    fn stored_events_arrive_in_stream_order_and_cut_ones_are_read_back() {
        let batch = vec![
            stored(Some("a:1"), Some(2), false),
            stored(Some("a:1"), Some(1), false),
            stored(Some("b:1"), Some(1), true),
            stored(None, None, false),
            stored(Some("c:1"), None, false),
            stored(Some("a:1"), Some(2), false),
        ];
        let arrived = arrivals(batch);
        let a = StreamId::parse("a:1").unwrap();
        let versions: Vec<i64> = arrived.events[&a].iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, [1, 2]);
        assert!(!arrived.read.contains(&a));
        for read_back in ["b:1", "c:1"] {
            let stream = StreamId::parse(read_back).unwrap();
            assert!(arrived.events[&stream].is_empty() && arrived.read.contains(&stream), "{read_back}");
        }
        assert_eq!(arrived.events.len(), 3);
    }
}
