//! The projector's I/O shell for live events: finds which streams a batch touched, folds what
//! is new in them into every projection that covers them, announces new projections.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::fold::{self, Fold};
use super::read;
use crate::domain::{Event, StreamId};
use crate::infra::bus::Bus;
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::registry::definitions::{Definition, DefinitionRegistry};
use crate::stages::watermark::Watermark;
use crate::store::events::{self, StoredPosition};
use crate::store::projections::{self, Projection, StreamEvent};
use crate::wire::codec;

/// How long a batch waits for the persister before NAKing what is not stored yet.
const STORE_WAIT: Duration = Duration::from_secs(1);
const NOT_STORED_RETRY: Duration = Duration::from_millis(250);

pub(super) struct Handler {
    pub pool: PgPool,
    pub bus: Bus,
    pub definitions: Arc<DefinitionRegistry>,
    pub watermark: Watermark,
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
        let mut outcomes = vec![Outcome::Ack; batch.messages.len()];
        let in_streams: Vec<(usize, u64, Event)> = batch
            .messages
            .iter()
            .enumerate()
            .filter_map(|(position, message)| {
                let incoming = codec::decode(message).ok()?;
                incoming.event.stream_id.is_some().then_some((position, incoming.stream_seq, incoming.event))
            })
            .collect();
        if in_streams.is_empty() {
            return Ok(outcomes);
        }
        let ids: Vec<Uuid> = in_streams.iter().map(|(_, _, event)| event.event_id).collect();
        let seqs: Vec<u64> = in_streams.iter().map(|(_, seq, _)| *seq).collect();
        let last_seq = seqs.iter().copied().max().unwrap_or(0);
        self.watermark.wait_for(last_seq, STORE_WAIT).await;
        let stored = events::stored_positions(&self.pool, &ids, &seqs).await.map_err(database)?;
        let (arrived, not_stored) = arrivals(in_streams, &stored);
        for position in not_stored {
            outcomes[position] = Outcome::Retry { after: NOT_STORED_RETRY };
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
/// projection's watermark, so they need not be read back. An event stored from another
/// message (the same id sent twice) makes its stream read from PostgreSQL, which holds what
/// counts. Returns the positions of events not stored yet too.
pub(super) fn arrivals(
    in_streams: Vec<(usize, u64, Event)>,
    stored: &HashMap<Uuid, StoredPosition>,
) -> (Arrived, Vec<usize>) {
    let mut arrived = Arrived::default();
    let mut not_stored = Vec::new();
    for (position, seq, event) in in_streams {
        let Some(row) = stored.get(&event.event_id) else {
            not_stored.push(position);
            continue;
        };
        match (&row.stream_id, row.stream_version) {
            (Some(stream_id), Some(stream_version)) if row.stream_seq as u64 == seq => {
                arrived.events.entry(stream_id.clone()).or_default().push(StreamEvent {
                    event_id: event.event_id,
                    event_type: event.event_type,
                    data: Value::Object(event.data),
                    stream_id: stream_id.clone(),
                    stream_version,
                    timestamp: event.timestamp,
                });
            }
            (Some(stream_id), _) => {
                arrived.events.entry(stream_id.clone()).or_default();
                arrived.read.insert(stream_id.clone());
            }
            (None, _) => {}
        }
    }
    for events in arrived.events.values_mut() {
        events.sort_by_key(|event| event.stream_version);
        events.dedup_by_key(|event| event.stream_version);
    }
    (arrived, not_stored)
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
    use crate::domain::parse::{Defaults, parse_event};
    use serde_json::json;

    fn event(stream: &str) -> Event {
        parse_event(
            json!({"event_type": "t", "stream_id": stream, "data": {"n": 1}}),
            &Defaults::http(chrono::Utc::now()),
        )
        .unwrap()
    }

    fn row(event: &Event, seq: i64, version: i64) -> StoredPosition {
        StoredPosition {
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            stream_version: Some(version),
            stream_seq: seq,
        }
    }

    #[test]
    fn stored_events_arrive_in_stream_order_and_others_wait() {
        let (a1, a2, b1, late) = (event("a:1"), event("a:1"), event("b:1"), event("a:1"));
        let stored: HashMap<Uuid, StoredPosition> =
            [row(&a1, 1, 1), row(&a2, 2, 2), row(&b1, 9, 1)].into_iter().map(|r| (r.event_id, r)).collect();
        // b1 was stored from message 9, not from this message (8): its stream is read back.
        let batch = vec![(0, 2, a2.clone()), (1, 1, a1.clone()), (2, 8, b1.clone()), (3, 3, late)];
        let (arrived, not_stored) = arrivals(batch, &stored);
        assert_eq!(not_stored, [3]);
        let a = StreamId::parse("a:1").unwrap();
        let versions: Vec<i64> = arrived.events[&a].iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, [1, 2]);
        let b = StreamId::parse("b:1").unwrap();
        assert!(arrived.events[&b].is_empty() && arrived.read.contains(&b));
    }
}
