//! The processor stage's sweep: settles events that were stored `pending` for a processor
//! that is gone by the time the stage looks (deleted, disabled, or its filters changed), and
//! events the processor consumer passed without running anything: it skipped them while it
//! idled ([`crate::stages::interest`]), or a worker handled them before it knew of the
//! processor the persister already stored them `pending` for.
//!
//! Reads `pending` and `processing` events from PostgreSQL, a page at a time, the processor
//! registry and the processor consumer's ack floor; writes their status (`processed`) through
//! [`crate::store::processing::record`], with the same change the handler used to write for
//! every event nothing takes. Guarantees: an event an enabled processor takes is touched
//! here only once the consumer has settled it (at or below the ack floor), so never while
//! its processors run or wait to retry; the others leave `pending` within a sweep or two;
//! every unsettled event is visited, page after page, even when many wait for a processor
//! that is retrying.
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
use crate::infra::bus::Bus;
use crate::store::processing::{self, SweepCursor, Unsettled};
use crate::wire::subjects::streams;

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
    pub async fn run_if_due(&self, pool: &PgPool, bus: &Bus, engine: &Engine, every: Duration) {
        let now = Instant::now();
        let cursor = {
            let Ok(mut state) = self.state.lock() else { return };
            if !due(state.last, now, every) {
                return;
            }
            state.last = Some(now);
            state.cursor
        };
        match self.page(pool, bus, engine, cursor).await {
            Ok((settled, next)) => {
                bus.metrics().processor_swept.inc_by(settled as u64);
                if settled > 0 {
                    tracing::info!(stage = STAGE, settled, "settled events no processor will run");
                }
                if let Ok(mut state) = self.state.lock() {
                    state.cursor = next;
                }
            }
            Err(error) => tracing::warn!(stage = STAGE, error = %error, "cannot sweep unsettled events"),
        }
    }

    /// Reads one page after `cursor` and settles what no processor takes or the consumer
    /// passed. Returns how many it settled and where the next page starts.
    async fn page(
        &self,
        pool: &PgPool,
        bus: &Bus,
        engine: &Engine,
        cursor: Option<SweepCursor>,
    ) -> Result<(usize, Option<SweepCursor>), sqlx::Error> {
        // Read before the rows. The stage writes an event's status before it acks the event,
        // so one at or below the floor that the rows still show unsettled was acked unrun.
        let floor = match bus.consumer_info(streams::EVENTS, STAGE).await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot read the consumer's ack floor; sweeping what no processor takes only");
                0
            }
        };
        let stored_before = Utc::now() - GRACE;
        let rows = processing::unsettled(pool, stored_before, cursor, PAGE).await?;
        let set = engine.registry.snapshot();
        let nobody = orphans(&rows, floor, |row| {
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

/// The events of a page that no processor takes, or that the consumer settled (at or below
/// its ack `floor`) without a run.
fn orphans(rows: &[Unsettled], floor: u64, taken: impl Fn(&Unsettled) -> bool) -> Vec<Uuid> {
    let passed = |row: &Unsettled| u64::try_from(row.stream_seq).is_ok_and(|seq| seq <= floor);
    rows.iter().filter(|row| !taken(row) || passed(row)).map(|row| row.event_id).collect()
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
        row_at(event_type, 100)
    }

    fn row_at(event_type: &str, stream_seq: i64) -> Unsettled {
        Unsettled {
            event_id: Uuid::now_v7(),
            stream_seq,
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
        let settled = orphans(&rows, 0, |row| row.event_type.starts_with("order."));
        assert_eq!(settled, [rows[1].event_id]);
    }

    #[test]
    fn events_the_consumer_passed_are_settled_even_when_a_processor_takes_them() {
        let rows = [row_at("order.placed", 9), row_at("order.paid", 10), row_at("order.sent", 11)];
        let settled = orphans(&rows, 10, |_| true);
        assert_eq!(settled, [rows[0].event_id, rows[1].event_id], "at or below the ack floor");
    }

    #[test]
    fn pages_go_on_after_a_full_page_and_start_over_after_a_short_one() {
        let rows = [row("a"), row("b")];
        assert_eq!(next_cursor(&rows, 2), Some((rows[1].timestamp, rows[1].event_id)));
        assert_eq!(next_cursor(&rows, 3), None);
        assert_eq!(next_cursor(&[], 3), None);
    }
}
