//! The persister's upkeep of `event.events`: keeps day partitions ready ahead and, with
//! `EVENT_RETENTION_DAYS`, drops the expired ones ([`crate::store::retention`] decides and
//! does both). Runs at start and then hourly; with several persisters one at a time does it.
//!
//! Reads and writes what [`crate::store::retention::maintain`] does; counts dropped partitions
//! and events in `/metrics`. Guarantees: a failed run changes nothing it did not finish, and
//! the next run (an hour later, or the persister's next write that finds no partition) goes on.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::STAGE;
use crate::infra::bus::Bus;
use crate::store::retention;

const EVERY: Duration = Duration::from_secs(3600);

pub(super) async fn run(pool: PgPool, bus: Bus, retention_days: Option<u32>, token: CancellationToken) {
    loop {
        maintain(&pool, &bus, retention_days).await;
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One run, logged and counted; errors are logged and left to the next run.
pub(super) async fn maintain(pool: &PgPool, bus: &Bus, retention_days: Option<u32>) {
    let retention = retention_days.map(|days| chrono::Duration::days(i64::from(days)));
    match retention::maintain(pool, retention, Utc::now()).await {
        Ok(Some(report)) => {
            let metrics = bus.metrics();
            metrics.retention_partitions_dropped.inc_by(report.dropped.len() as u64);
            metrics.retention_events_dropped.inc_by(report.events_dropped.max(0) as u64);
            if report.created > 0 || !report.dropped.is_empty() || report.log_rows_deleted > 0 {
                tracing::info!(
                    stage = STAGE,
                    created = report.created,
                    dropped = ?report.dropped,
                    events = report.events_dropped,
                    log_rows = report.log_rows_deleted,
                    "retention run"
                );
            }
        }
        Ok(None) => tracing::debug!(stage = STAGE, "another persister is keeping the partitions"),
        Err(error) => tracing::warn!(stage = STAGE, error = %error, "retention run failed; trying again later"),
    }
}
