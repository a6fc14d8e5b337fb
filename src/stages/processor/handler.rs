//! The processor stage's I/O shell: decodes the batch, reads earlier attempts, runs the
//! processors, records what happened, announces it. The decisions are [`super::verdict`]'s.
//! Events no processor takes are acked as they come: the persister stored them `processed`,
//! and [`super::sweep`] settles the few it stored `pending` for a processor that is gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use super::sweep::{self, Sweep};
use super::verdict::Ran;
use super::verdict::{self, Earlier};
use super::{Engine, STAGE};
use crate::domain::{Event, EventStatus};
use crate::infra::bus::Bus;
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::infra::settings::ProcessorArgs;
use crate::registry::processors::Runnable;
use crate::stages::watermark::Watermark;
use crate::store::processing::{self, StatusChange};
use crate::wire::{TraceContext, codec};

/// How long the status write waits for the persister before NAKing what is not stored yet.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// How soon to look again when the event is not in PostgreSQL yet.
const NOT_STORED_RETRY: Duration = Duration::from_millis(250);
/// Processors running longer than this show their events as `processing`.
const MARK_PROCESSING_AFTER: Duration = Duration::from_millis(200);
/// How soon to retry after the announcements could not be published.
const OUTAGE_RETRY: Duration = Duration::from_secs(2);

pub(super) struct Handler {
    pub pool: PgPool,
    pub bus: Bus,
    pub engine: Arc<Engine>,
    pub watermark: Watermark,
    pub settings: ProcessorArgs,
    pub sweep: Sweep,
}

/// One event of the batch being worked on.
struct Work {
    position: usize,
    seq: u64,
    event: Event,
    payload: Bytes,
    trace: TraceContext,
    /// Processors that take it.
    matching: Vec<Arc<Runnable>>,
    /// (processor, attempt) still to run, in order.
    to_run: Vec<(Arc<Runnable>, i32)>,
    earlier: Earlier,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        self.sweep.run_if_due(&self.pool, &self.bus, &self.engine, sweep::BUSY_EVERY).await;
        let mut outcomes = vec![Outcome::Ack; batch.messages.len()];
        let mut work = self.decode(batch);
        if work.is_empty() {
            return Ok(outcomes);
        }
        self.sort_out(&mut work).await?;
        let mut ran = self.run_all(&work).await;
        let mut changes = Vec::with_capacity(work.len());
        let mut verdicts = Vec::with_capacity(work.len());
        for item in &work {
            let mine: Vec<&Ran> = ran.get(&item.event.event_id).map(|r| r.iter().collect()).unwrap_or_default();
            let retry_delay = |attempt| self.settings.retry_delay(attempt);
            let (change, outcome) = verdict::verdict(item.event.event_id, true, &item.earlier, &mine, retry_delay);
            changes.push(change);
            verdicts.push(outcome);
        }
        let written = self.record(&work, &ran, &changes).await?;
        let lost = self.announce(&work, &mut ran).await;
        for (item, outcome) in work.iter().zip(verdicts) {
            outcomes[item.position] = if lost > 0 {
                Outcome::Retry { after: OUTAGE_RETRY }
            } else if !written.contains(&item.event.event_id) {
                Outcome::Retry { after: NOT_STORED_RETRY }
            } else {
                outcome
            };
        }
        Ok(outcomes)
    }

    async fn idle(&self) {
        self.sweep.run_if_due(&self.pool, &self.bus, &self.engine, sweep::IDLE_EVERY).await;
    }
}

impl Handler {
    /// The batch's events that processors take, with those processors. What cannot be decoded
    /// is the persister's to dead-letter; what no processor takes has nothing to run here.
    fn decode(&self, batch: &Batch<'_>) -> Vec<Work> {
        let set = self.engine.registry.snapshot();
        if set.idle() {
            // No processor at all: nothing to decode either.
            return Vec::new();
        }
        let mut work = Vec::with_capacity(batch.messages.len());
        for (position, message) in batch.messages.iter().enumerate() {
            let Ok(incoming) = codec::decode(message) else { continue };
            let matching = set.matching(&incoming.event);
            if matching.is_empty() {
                continue;
            }
            // Processors get the event as the service knows it, whoever produced the message.
            let payload = serde_json::to_vec(&incoming.event).map_or_else(|_| message.payload.clone(), Bytes::from);
            let (event, seq, trace) = (incoming.event, incoming.stream_seq, incoming.trace);
            work.push(Work {
                position,
                seq,
                event,
                payload,
                trace,
                matching,
                to_run: Vec::new(),
                earlier: Earlier::default(),
            });
        }
        work
    }

    /// Reads earlier attempts (only of events that have processors to run) and decides what
    /// runs now.
    async fn sort_out(&self, work: &mut [Work]) -> Result<(), Transient> {
        let ids: Vec<Uuid> =
            work.iter().filter(|item| !item.matching.is_empty()).map(|item| item.event.event_id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let prior = processing::prior_results(&self.pool, &ids)
            .await
            .map_err(|error| Transient::new("cannot read earlier attempts", error))?;
        for item in work.iter_mut() {
            (item.to_run, item.earlier) = verdict::sort_out(item.event.event_id, &item.matching, &prior);
        }
        Ok(())
    }

    /// Runs every event's processors: one stream's events in order, streams concurrently.
    /// Events whose processors are still running after [`MARK_PROCESSING_AFTER`] show as
    /// `processing` meanwhile; the others go straight from `pending` to their outcome (one
    /// status write instead of two), even when the batch as a whole takes longer.
    async fn run_all(&self, work: &[Work]) -> HashMap<Uuid, Vec<Ran>> {
        let mut groups: BTreeMap<String, Vec<&Work>> = BTreeMap::new();
        for item in work.iter().filter(|item| !item.to_run.is_empty()) {
            let key = item
                .event
                .stream_id
                .as_ref()
                .map_or_else(|| format!("event:{}", item.event.event_id), |s| s.to_string());
            groups.entry(key).or_default().push(item);
        }
        let starting: Vec<StatusChange> = groups.values().flatten().map(|item| starting(item.event.event_id)).collect();
        let runner = &self.engine.runner;
        // Events whose processors are done, so the mark below leaves them alone.
        let finished: &Mutex<HashSet<Uuid>> = &Mutex::default();
        let groups: Vec<_> = groups
            .into_values()
            .map(|group| async move {
                let mut done = Vec::with_capacity(group.len());
                for item in group {
                    let ran = runner
                        .run_in_order(&item.event, &item.payload, &item.to_run, "", &item.trace, verdict::last_attempt)
                        .await;
                    if let Ok(mut finished) = finished.lock() {
                        finished.insert(item.event.event_id);
                    }
                    done.push((item.event.event_id, ran));
                }
                done
            })
            .collect();
        let run = futures::stream::iter(groups).buffer_unordered(self.settings.concurrency.max(1)).collect::<Vec<_>>();
        tokio::pin!(run);
        let done = tokio::select! {
            done = &mut run => done,
            () = tokio::time::sleep(MARK_PROCESSING_AFTER), if !starting.is_empty() => {
                let marks = match finished.lock() {
                    Ok(finished) => still_running(starting, &finished),
                    Err(_) => starting,
                };
                if let Err(error) = processing::record(&self.pool, &[], &marks).await {
                    tracing::warn!(stage = STAGE, error = %error, "cannot mark events as processing");
                }
                run.await
            }
        };
        done.into_iter().flatten().collect()
    }

    /// Records results and statuses once the persister has the rows (processors ran while it
    /// stored), and disables processors whose endpoint is gone. Returns the events whose
    /// status was written.
    async fn record(
        &self,
        work: &[Work],
        ran: &HashMap<Uuid, Vec<Ran>>,
        changes: &[StatusChange],
    ) -> Result<HashSet<Uuid>, Transient> {
        let results: Vec<_> = ran.values().flatten().map(|ran| ran.result.clone()).collect();
        let last_seq = work.iter().map(|item| item.seq).max().unwrap_or(0);
        self.watermark.wait_for(last_seq, STORE_WAIT).await;
        let written = processing::record(&self.pool, &results, changes)
            .await
            .map_err(|error| Transient::new("cannot record processing results", error))?;
        super::disable_gone(&self.pool, &self.bus, ran.values().flatten()).await;
        Ok(written)
    }

    /// Publishes `event.processed.*` for every run that ended (succeeded or failed for good).
    /// Returns how many could not be published.
    async fn announce(&self, work: &[Work], ran: &mut HashMap<Uuid, Vec<Ran>>) -> usize {
        let mut messages = Vec::new();
        for item in work {
            let retry_count = item.to_run.iter().map(|(_, attempt)| attempt - 1).max().unwrap_or(0);
            for ran in ran.remove(&item.event.event_id).unwrap_or_default() {
                messages.extend(super::processed_message(&ran.result, &item.event, retry_count));
            }
        }
        let lost = self.bus.publish_all(messages).await.iter().filter(|result| result.is_err()).count();
        if lost > 0 {
            tracing::warn!(stage = STAGE, lost, "cannot publish processed events; retrying the batch");
        }
        lost
    }
}

/// The marks of the events whose processors have not finished yet. One that finished waits
/// for its outcome with the rest of the batch: marking it would rewrite its row (and every
/// index of it, `status` being indexed) only to rewrite it again with the outcome.
fn still_running(starting: Vec<StatusChange>, finished: &HashSet<Uuid>) -> Vec<StatusChange> {
    starting.into_iter().filter(|mark| !finished.contains(&mark.event_id)).collect()
}

/// The status of an event whose processors are still running.
fn starting(event_id: Uuid) -> StatusChange {
    StatusChange {
        event_id,
        status: EventStatus::Processing,
        processors: None,
        error_message: None,
        retry_count: None,
        only_from: Some(vec![EventStatus::Pending]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_still_running_are_marked_processing() {
        let (quick, slow) = (Uuid::now_v7(), Uuid::now_v7());
        let finished = HashSet::from([quick]);
        let marks = still_running(vec![starting(quick), starting(slow)], &finished);
        assert_eq!(marks.iter().map(|mark| mark.event_id).collect::<Vec<_>>(), [slow]);
        assert_eq!(marks[0].status, EventStatus::Processing);
    }
}
