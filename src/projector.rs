//! The projector stage: keeps every projection of every entity stream up to date.
//!
//! Reads the durable `projector` consumer of EVENTS (pinned client: one projector pulls, a
//! standby takes over within seconds when it stops) as the signal that streams changed, and the
//! stored events from PostgreSQL in stream-version order. Writes `event.event_projections` and
//! `event.projection_snapshots` in one transaction per batch, then `event.projection.created`
//! for projections seen for the first time, then acks. Guarantees: applying is idempotent by the
//! stream-version watermark, so a redelivery or a crash mid-batch changes nothing twice; a
//! batch waits for the persister's position ([`crate::watermark`]) and an event still not in
//! PostgreSQL after a second is retried shortly. New definitions (and rebuilt ones) catch up
//! on the stored history in the background, then stay live.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::Message;
use bytes::Bytes;
use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Outgoing};
use crate::consume::{BatchHandler, ConsumeLoop, Outcome};
use crate::persister::decode_message;
use crate::projections::{self, Definition, Fold, Projection, StreamEvent};
use crate::settings::ProjectorArgs;
use crate::store;
use crate::watermark::Watermark;

pub const STAGE: &str = "projector";
const GROUP: &str = "projector";
/// How long a batch waits for the persister before NAKing what is not stored yet.
const STORE_WAIT: Duration = Duration::from_secs(1);
const NOT_STORED_RETRY: Duration = Duration::from_millis(250);
const OUTAGE_RETRY: Duration = Duration::from_secs(2);
pub const EVENT_PROJECTION_CREATED: &str = "event.projection.created";

pub struct Projector {
    consume: ConsumeLoop,
    handler: Handler,
}

impl Projector {
    pub async fn build(bus: Bus, pool: PgPool, settings: &ProjectorArgs) -> Result<Self, BusError> {
        let consumer = bus.consumer("EVENTS", STAGE).await?;
        let consume = ConsumeLoop { stage: STAGE, bus: bus.clone(), consumer, max_batch: 1000, group: Some(GROUP) };
        let watermark = Watermark::start(&bus, pool.clone()).await?;
        let handler = Handler { pool, bus, watermark, snapshot_every: settings.snapshot_every as i64 };
        Ok(Self { consume, handler })
    }

    pub async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(stage = STAGE, "projector running (standby until it holds the pin)");
        let catch_up = tokio::spawn(catch_up_loop(
            self.handler.pool.clone(),
            self.handler.bus.clone(),
            self.handler.snapshot_every,
            token.clone(),
        ));
        let result = self.consume.run(&self.handler, token).await;
        catch_up.abort();
        Ok(result?)
    }
}

struct Handler {
    pool: PgPool,
    bus: Bus,
    watermark: Watermark,
    snapshot_every: i64,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut in_streams = Vec::new();
        for (position, message) in batch.iter().enumerate() {
            let (seq, published) = match message.info() {
                Ok(info) => (info.stream_sequence, info.published),
                Err(_) => (0, Utc::now()),
            };
            let Ok(incoming) =
                decode_message(&message.subject, message.headers.as_ref(), &message.payload, seq, published)
            else {
                continue;
            };
            if incoming.event.stream_id.is_some() {
                in_streams.push((position, seq, incoming.event));
            }
        }
        if in_streams.is_empty() {
            return outcomes;
        }
        let ids: Vec<uuid::Uuid> = in_streams.iter().map(|(_, _, event)| event.event_id).collect();
        let last_seq = in_streams.iter().map(|(_, seq, _)| *seq).max().unwrap_or(0);
        self.watermark.wait_for(last_seq, STORE_WAIT).await;
        let stored = match store::stored_positions(&self.pool, &ids).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot read stored events; retrying the batch");
                return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
            }
        };
        // The batch's events by stream, in stream order: usually exactly what follows each
        // projection's watermark, so they need not be read back. An event stored from another
        // message (the same id sent twice) is read from PostgreSQL, which holds what counts.
        let mut arrived = Arrived::default();
        for (position, seq, event) in in_streams {
            let Some(row) = stored.get(&event.event_id) else {
                outcomes[position] = Outcome::Retry { after: NOT_STORED_RETRY };
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
        match self.project(arrived).await {
            Ok(created) => announce_created(&self.bus, &created).await,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot update projections; retrying the batch");
                return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
            }
        }
        outcomes
    }
}

/// What a batch brought, by entity stream.
#[derive(Default)]
struct Arrived {
    /// Every stream the batch touched, with its stored events that came with the batch, in
    /// stream order.
    events: BTreeMap<String, Vec<StreamEvent>>,
    /// Streams to read from PostgreSQL whatever came.
    read: BTreeSet<String>,
}

impl Handler {
    /// Folds what is new in these streams into every projection that covers them: the events
    /// that arrived when they continue a stream's watermarks, else what PostgreSQL holds after
    /// them.
    async fn project(&self, arrived: Arrived) -> Result<Vec<Projection>, sqlx::Error> {
        let streams: Vec<String> = arrived.events.keys().cloned().collect();
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let definitions = projections::definitions(&self.pool).await?;
        let mut tx = self.pool.begin().await?;
        let mut stored = projections::stored_projections(&mut tx, &streams).await?;
        let mut folds: Vec<(Fold, &Definition, &str)> = Vec::new();
        let mut to_read = Vec::new();
        for stream_id in &streams {
            let Some((entity_type, entity_id)) = projections::split_stream_id(stream_id) else { continue };
            let events = arrived.events.get(stream_id).map_or(&[][..], Vec::as_slice);
            let mut from = i64::MAX;
            for definition in definitions.iter().filter(|d| d.covers(entity_type)) {
                let existing = stored.remove(&(definition.name.clone(), stream_id.clone()));
                let fold = Fold::start(definition, entity_type, entity_id, existing);
                from = from.min(fold.projection.stream_version);
                folds.push((fold, definition, stream_id.as_str()));
            }
            let continues = !arrived.read.contains(stream_id)
                && events.iter().zip(from.saturating_add(1)..).all(|(event, next)| event.stream_version == next);
            if from != i64::MAX && !continues {
                to_read.push((stream_id.clone(), from));
            }
        }
        let mut read: HashMap<String, Vec<StreamEvent>> = HashMap::new();
        for event in projections::events_after(&mut *tx, &to_read).await? {
            read.entry(event.stream_id.clone()).or_default().push(event);
        }
        for (fold, definition, stream_id) in &mut folds {
            let events = read.get(*stream_id).or_else(|| arrived.events.get(*stream_id)).map_or(&[][..], Vec::as_slice);
            fold.apply(definition, events, self.snapshot_every);
        }
        let refs: Vec<&Fold> = folds.iter().map(|(fold, _, _)| fold).collect();
        projections::save(&mut tx, &refs).await?;
        tx.commit().await?;
        Ok(folds
            .into_iter()
            .filter(|(fold, _, _)| fold.created && fold.changed && fold.projection.version > 0)
            .map(|(fold, _, _)| fold.projection)
            .collect())
    }
}

/// Publishes `event.projection.created` for projections materialized for the first time.
async fn announce_created(bus: &Bus, created: &[Projection]) {
    let messages = created
        .iter()
        .map(|projection| {
            let body = json!({
                "projection_id": projection.projection_id, "projection_name": projection.projection_name,
                "entity_id": projection.entity_id, "entity_type": projection.entity_type,
                "events_count": projection.version, "version": projection.version, "timestamp": Utc::now(),
            });
            let mut headers = async_nats::HeaderMap::new();
            let message_id = format!(
                "projection.created.{}.{}.{}",
                projection.projection_name, projection.entity_type, projection.entity_id
            );
            headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
            Outgoing { subject: EVENT_PROJECTION_CREATED.to_owned(), headers, payload: Bytes::from(body.to_string()) }
        })
        .collect();
    for result in bus.publish_all(messages).await {
        if let Err(error) = result {
            tracing::warn!(stage = STAGE, error = %error, "cannot announce a new projection");
        }
    }
}

/// Folds the history into definitions that are catching up (new or being rebuilt), then marks
/// them live. Any projector may do it: folding is idempotent.
async fn catch_up_loop(pool: PgPool, bus: Bus, snapshot_every: i64, token: CancellationToken) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Err(error) = catch_up(&pool, &bus, snapshot_every, &token).await {
            tracing::warn!(stage = STAGE, error = %error, "projection catch-up failed; trying again");
        }
    }
}

async fn catch_up(pool: &PgPool, bus: &Bus, snapshot_every: i64, token: &CancellationToken) -> Result<(), sqlx::Error> {
    let definitions = projections::definitions(pool).await?;
    for definition in definitions.iter().filter(|d| d.status == "catching_up") {
        let started = std::time::Instant::now();
        let mut after = String::new();
        let mut streams_done = 0usize;
        loop {
            if token.is_cancelled() {
                return Ok(());
            }
            // The stream's entity type, compared exactly: a LIKE prefix would let `_` in
            // `order_item` match `order-item` streams too.
            let page: Vec<String> = sqlx::query_scalar(
                "SELECT stream_id FROM event.event_streams WHERE ($1 = '*' OR entity_type = $1) AND stream_id > $2 \
                 ORDER BY stream_id LIMIT 500",
            )
            .bind(&definition.entity_type)
            .bind(&after)
            .fetch_all(pool)
            .await?;
            let Some(last) = page.last() else { break };
            after = last.clone();
            for stream_id in &page {
                let created =
                    projections::fold_stream(pool, stream_id, std::slice::from_ref(definition), snapshot_every).await?;
                announce_created(bus, &created).await;
                streams_done += 1;
            }
        }
        projections::mark_live(pool, &definition.name).await?;
        tracing::info!(stage = STAGE, definition = %definition.name, streams = streams_done,
            elapsed_ms = started.elapsed().as_millis() as u64, "projection caught up");
    }
    Ok(())
}
