//! The processor stage's sweep: settles events that were stored `pending` for a processor
//! that is gone by the time the stage looks (deleted, disabled, or its filters changed).
//!
//! Reads `pending` and `processing` events from PostgreSQL, a page at a time, and the
//! processor registry; writes their status (`processed`) through
//! [`crate::store::processing::record`], with the same change the handler used to write for
//! every event nothing takes. Guarantees: an event any enabled processor takes is never
//! touched here (its processors run from the consumer); one nothing takes leaves `pending`
//! within a sweep or two; every unsettled event is visited, page after page, even when many
//! wait for a processor that is retrying.
//!
//! Why a sweep: the persister stores an event `processed` when no processor takes it, so
//! for almost every such event there is nothing to write. Checking each one as it passed
//! cost two reads by id per event; the sweep costs one indexed read per interval.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use super::verdict::{self, Earlier};
use super::{Engine, STAGE};
use crate::domain::{EventCategory, EventSource};
use crate::infra::metrics::Metrics;
use crate::store::processing::{self, SweepCursor, Unsettled};

/// Events read per sweep.
const PAGE: i64 = 500;
/// Events stored more recently than this are the consumer's to handle.
const GRACE: Duration = Duration::from_secs(5);
/// How often the stage sweeps while it has nothing else to do.
pub const IDLE_EVERY: Duration = Duration::from_secs(5);
/// How often it sweeps while events keep coming.
pub const BUSY_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Sweep {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last: Option<Instant>,
    cursor: Option<SweepCursor>,
}

impl Sweep {
    /// Sweeps one page when the last sweep is at least `every` ago. Failures are logged:
    /// the next sweep tries again.
    pub async fn run_if_due(&self, pool: &PgPool, engine: &Engine, metrics: &Metrics, every: Duration) {
        let now = Instant::now();
        let cursor = {
            let Ok(mut state) = self.state.lock() else { return };
            if !due(state.last, now, every) {
                return;
            }
            state.last = Some(now);
            state.cursor
        };
        match self.page(pool, engine, cursor).await {
            Ok((settled, next)) => {
                metrics.processor_swept.inc_by(settled as u64);
                if settled > 0 {
                    tracing::info!(stage = STAGE, settled, "settled events whose processors are gone");
                }
                if let Ok(mut state) = self.state.lock() {
                    state.cursor = next;
                }
            }
            Err(error) => tracing::warn!(stage = STAGE, error = %error, "cannot sweep unsettled events"),
        }
    }

    /// Reads one page after `cursor` and settles what no processor takes. Returns how many
    /// it settled and where the next page starts.
    async fn page(
        &self,
        pool: &PgPool,
        engine: &Engine,
        cursor: Option<SweepCursor>,
    ) -> Result<(usize, Option<SweepCursor>), sqlx::Error> {
        let stored_before = Utc::now() - GRACE;
        let rows = processing::unsettled(pool, stored_before, cursor, PAGE).await?;
        let set = engine.registry.snapshot();
        let nobody = orphans(&rows, |row| {
            match (EventSource::parse(&row.event_source), EventCategory::parse(&row.event_category)) {
                (Some(source), Some(category)) => set.takes_kind(source, category, &row.event_type),
                // A value the code does not know: leave the event alone.
                _ => true,
            }
        });
        let changes: Vec<_> = nobody
            .iter()
            .map(|&event_id| verdict::verdict(event_id, false, &Earlier::default(), &[], |_| Duration::ZERO).0)
            .collect();
        if !changes.is_empty() {
            processing::record(pool, &[], &changes).await?;
        }
        Ok((changes.len(), next_cursor(&rows, PAGE)))
    }
}

/// Whether a sweep last run at `last` should run again at `now`.
fn due(last: Option<Instant>, now: Instant, every: Duration) -> bool {
    last.is_none_or(|last| now.duration_since(last) >= every)
}

/// The events of a page that no processor takes.
fn orphans(rows: &[Unsettled], taken: impl Fn(&Unsettled) -> bool) -> Vec<Uuid> {
    rows.iter().filter(|row| !taken(row)).map(|row| row.event_id).collect()
}

/// Where the next page starts: after this page's last event, or from the beginning again when
/// the page was not full.
fn next_cursor(rows: &[Unsettled], page: i64) -> Option<SweepCursor> {
    if (rows.len() as i64) < page {
        return None;
    }
    rows.last().map(|row| (row.timestamp, row.event_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_type: &str) -> Unsettled {
        Unsettled {
            event_id: Uuid::now_v7(),
            event_source: "backend".into(),
            event_category: "order".into(),
            event_type: event_type.into(),
            timestamp: Utc::now(),
        }
    }

    #[test]
    fn a_sweep_runs_first_at_once_then_once_per_interval() {
        let start = Instant::now();
        let every = Duration::from_secs(5);
        assert!(due(None, start, every));
        assert!(!due(Some(start), start + Duration::from_secs(4), every));
        assert!(due(Some(start), start + every, every));
    }

    #[test]
    fn only_events_nobody_takes_are_settled() {
        let rows = [row("order.placed"), row("page.viewed"), row("order.paid")];
        let settled = orphans(&rows, |row| row.event_type.starts_with("order."));
        assert_eq!(settled, [rows[1].event_id]);
    }

    #[test]
    fn pages_go_on_after_a_full_page_and_start_over_after_a_short_one() {
        let rows = [row("a"), row("b")];
        assert_eq!(next_cursor(&rows, 2), Some((rows[1].timestamp, rows[1].event_id)));
        assert_eq!(next_cursor(&rows, 3), None);
        assert_eq!(next_cursor(&[], 3), None);
    }
}
