//! Catch-up: folds the stored history into definitions that are catching up (new, or being
//! rebuilt), then marks them live. Any projector may do it: folding is idempotent.
//!
//! Reads `event.event_streams`, `event.events` and the definitions; writes projections and
//! the definitions' status.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::STAGE;
use super::read::fold_stream;
use crate::domain::DefinitionStatus;
use crate::infra::bus::Bus;
use crate::registry::{self, definitions};
use crate::store::projections;

/// How often the definitions are looked at.
const EVERY: Duration = Duration::from_millis(500);
/// Streams folded per page.
const PAGE: i64 = 500;

pub(super) async fn run(pool: PgPool, bus: Bus, snapshot_every: i64, token: CancellationToken) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        if let Err(error) = catch_up(&pool, &bus, snapshot_every, &token).await {
            tracing::warn!(stage = STAGE, error = %error, "projection catch-up failed; trying again");
        }
    }
}

async fn catch_up(pool: &PgPool, bus: &Bus, snapshot_every: i64, token: &CancellationToken) -> Result<(), sqlx::Error> {
    let all = definitions::list(pool).await?;
    for definition in all.iter().filter(|d| d.status == DefinitionStatus::CatchingUp) {
        let started = Instant::now();
        let mut after = String::new();
        let mut streams_done = 0usize;
        loop {
            if token.is_cancelled() {
                return Ok(());
            }
            let page = projections::streams_after(pool, &definition.entity_type, &after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.as_str().to_owned();
            for stream_id in &page {
                let created = fold_stream(pool, stream_id, std::slice::from_ref(definition), snapshot_every).await?;
                super::announce_created(bus, &created).await;
                streams_done += 1;
            }
        }
        projections::mark_live(pool, &definition.name).await?;
        registry::announce_change::<definitions::Definitions>(bus).await;
        tracing::info!(stage = STAGE, definition = %definition.name, streams = streams_done,
            elapsed_ms = started.elapsed().as_millis() as u64, "projection caught up");
    }
    Ok(())
}
