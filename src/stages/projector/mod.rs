//! The projector stage: keeps every projection of every entity stream up to date.
//!
//! Reads the durable `projector` consumer of EVENTS (pinned client: one projector pulls, a
//! standby takes over within seconds when it stops) as the signal that streams changed, the
//! definitions registry, and the stored events from PostgreSQL in stream-version order. Writes
//! `event.event_projections` and `event.projection_snapshots` in one transaction per batch,
//! then `event.projection.created` for projections seen for the first time; the consume loop
//! then acks. Guarantees: applying is idempotent by the stream-version watermark, so a
//! redelivery or a crash mid-batch changes nothing twice; a batch waits for the persister's
//! position ([`crate::stages::watermark`]) and an event still not in PostgreSQL after a second
//! is retried shortly. New definitions (and rebuilt ones) catch up on the stored history in
//! the background ([`catch_up`]), then stay live.

mod catch_up;
pub mod fold;
mod handler;
pub mod read;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StageError;
use super::watermark::Watermark;
use crate::infra::bus::Bus;
use crate::infra::consume::ConsumeLoop;
use crate::infra::settings::ProjectorArgs;
use crate::registry::Registry;
use crate::registry::definitions::Definitions;
use crate::store::projections::Projection;
use crate::wire::domain_events::{DomainEvent, ProjectionCreated};
use crate::wire::subjects::streams;
use handler::Handler;

pub const STAGE: &str = "projector";
/// The priority group of the pinned consumer.
const GROUP: &str = "projector";
const MAX_BATCH: usize = 1000;

/// A built projector, ready to run.
pub struct Projector {
    consume: ConsumeLoop,
    handler: Handler,
}

impl Projector {
    pub async fn build(bus: Bus, pool: PgPool, settings: &ProjectorArgs) -> Result<Self, StageError> {
        let consume = ConsumeLoop::build(&bus, streams::EVENTS, STAGE, MAX_BATCH).await?.pinned(GROUP);
        let watermark = Watermark::start(&bus, pool.clone()).await?;
        let definitions = Registry::load(pool.clone(), Definitions).await?;
        let snapshot_every = settings.snapshot_every as i64;
        Ok(Self { consume, handler: Handler { pool, bus, definitions, watermark, snapshot_every } })
    }

    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        tracing::info!(stage = STAGE, "projector running (standby until it holds the pin)");
        let handler = &self.handler;
        let catch_up = tokio::spawn(catch_up::run(
            handler.pool.clone(),
            handler.bus.clone(),
            handler.snapshot_every,
            token.clone(),
        ));
        let watch = tokio::spawn(handler.definitions.clone().watch(handler.bus.clone(), token.clone()));
        let result = self.consume.run(&self.handler, token).await;
        catch_up.abort();
        watch.abort();
        Ok(result?)
    }
}

/// Announces `event.projection.created` for projections materialized for the first time.
pub async fn announce_created(bus: &Bus, created: &[Projection]) {
    let messages = created
        .iter()
        .filter_map(|projection| {
            ProjectionCreated {
                projection_id: projection.projection_id,
                projection_name: &projection.projection_name,
                entity_id: &projection.entity_id,
                entity_type: &projection.entity_type,
                events_count: projection.version,
                version: projection.version,
                timestamp: Utc::now(),
            }
            .to_message()
            .ok()
        })
        .collect();
    bus.announce(messages).await;
}
