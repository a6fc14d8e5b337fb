//! The persister stage: stores every event of EVENTS in PostgreSQL, in stream order.
//!
//! Reads the durable `persister` consumer of EVENTS, the processor registry and the schema
//! registry (NATS-native events are checked against their type's schema here: the gateway
//! checked the others before publishing). Writes
//! `event.events`, stream versions, rollups and its stream position (one transaction per
//! batch), then the position on `_EVSVC.persisted` (core NATS, for
//! [`crate::stages::watermark`]), then every stored row to STORED ([`announce`]: the public
//! stream of stored events, `event.stored.{source}.{category}.{type}`), then tells waiting
//! gateways (core NATS) that their events are stored, then its outcomes go to the consume loop.
//!
//! Guarantees:
//! - An event that some enabled processor takes is stored `pending`, for the processor stage.
//!   One that none takes has nothing to wait for and is stored `processed` (`processors: []`)
//!   in the same write, instead of being rewritten a moment later. Where the registry changes
//!   in between, the processor stage's view wins: it runs what matches then and writes the
//!   status itself.
//! - An event is acked only after its row is committed and its STORED message acknowledged.
//!   STORED holds each stored row once, in EVENTS order, whatever crashed when.
//!   Storing is idempotent by event id; what cannot be parsed or validated goes to
//!   `deadletter.persister`.
//! - Events are stored strictly in JetStream sequence order, so entity-stream versions follow
//!   that order. The position stored with each batch says how far it got; a delivery at or
//!   below it is a redelivery, and a gap before a batch (a message whose delivery was lost to
//!   a crash and will only come back after the ack wait) is filled by reading the stream
//!   directly instead of waiting ([`plan`]).
//! - While PostgreSQL is unreachable the consume loop holds the batch and hands it in again
//!   (nothing new is pulled meanwhile, so nothing is lost and nothing is reordered). So it
//!   does when the day has no partition yet, after creating it ([`retention`], which also
//!   drops the partitions past `EVENT_RETENTION_DAYS`).

mod announce;
mod envelope;
mod handler;
pub mod plan;
mod retention;

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StageError;
use crate::infra::bus::{Bus, BusError};
use crate::infra::callback::Guard;
use crate::infra::consume::ConsumeLoop;
use crate::infra::settings::PersisterArgs;
use crate::registry::Registry;
use crate::registry::processors::Processors;
use crate::registry::schemas::Schemas;
use crate::store::position;
use crate::wire::subjects::streams;
use handler::Handler;

pub const STAGE: &str = "persister";
/// Most missing messages read from the stream in one attempt.
const MAX_GAP_FILL: usize = 10_000;

/// A built persister, ready to run.
pub struct Persister {
    consume: ConsumeLoop,
    handler: Handler,
    retention_days: Option<u32>,
}

impl Persister {
    /// Checks that the stream and the durable consumer exist (fails loudly if the topology is
    /// missing) and that the stored position fits the stream.
    pub async fn build(bus: Bus, pool: PgPool, settings: &PersisterArgs) -> Result<Self, StageError> {
        let consume = ConsumeLoop::build(&bus, streams::EVENTS, STAGE, settings.batch_size).await?;
        let mut events = bus
            .jetstream()
            .get_stream(streams::EVENTS)
            .await
            .map_err(|source| BusError::StreamLookup { name: streams::EVENTS.to_owned(), source })?;
        let stored = position::persisted_position(&pool, streams::EVENTS).await?;
        if let Ok(info) = events.info().await
            && info.state.last_sequence < stored
        {
            // The stream was recreated and numbers from 1 again.
            tracing::error!(
                stage = STAGE,
                position = stored,
                stream_last = info.state.last_sequence,
                "EVENTS is behind the stored position; starting over from its beginning"
            );
            position::reset_position(&pool, streams::EVENTS, info.state.first_sequence.saturating_sub(1)).await?;
        }
        // Only which processors take an event matters here, never how they call out.
        let processors = Registry::load(pool.clone(), Processors { guard: Guard::default() }).await?;
        let schemas = Registry::load(pool.clone(), Schemas).await?;
        bus.metrics().watch_persister(events.clone(), pool.clone());
        if !settings.stored_stream {
            tracing::warn!(stage = STAGE, "STORED is off (EVENT_STORED_STREAM=false): stored events are not published");
        }
        let announcer = announce::Announcer::build(pool.clone(), bus.clone(), settings.stored_stream).await?;
        let retention_days = settings.retention_days;
        let handler = Handler { pool, bus, events, processors, schemas, retention_days, announcer };
        Ok(Self { consume, handler, retention_days: settings.retention_days })
    }

    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        tracing::info!(stage = STAGE, "persister running");
        let processors: Arc<_> = self.handler.processors.clone();
        let watch = tokio::spawn(processors.watch(self.handler.bus.clone(), token.clone()));
        let schemas = tokio::spawn(self.handler.schemas.clone().watch(self.handler.bus.clone(), token.clone()));
        let upkeep = tokio::spawn(retention::run(
            self.handler.pool.clone(),
            self.handler.bus.clone(),
            self.retention_days,
            token.clone(),
        ));
        let result = self.consume.run(&self.handler, token).await;
        watch.abort();
        schemas.abort();
        upkeep.abort();
        Ok(result?)
    }
}
