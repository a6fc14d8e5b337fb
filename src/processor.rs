//! The processor stage: runs the registered processors on every event of EVENTS.
//!
//! Reads the durable `processor` consumer of EVENTS and earlier attempts from PostgreSQL.
//! Writes results, statuses and counters ([`processing::record`]), then `event.processed.*`,
//! then acks. Guarantees:
//! - The enabled processors whose filters match run highest priority first; a failing one
//!   never keeps the others from running (BR-PRC-002/003).
//! - A processor that fails is retried (only it) by NAKing the event with a growing delay, up
//!   to its `max_retries`; then the event is `failed`, `event.processed.failed` is published
//!   and the event goes to `deadletter.processor` with the reason.
//! - Events of one entity stream within a batch run one after another, in stream order;
//!   different streams run concurrently. (A retried event is redelivered later, so order is
//!   kept for first attempts only.)
//! - Status: `pending` → `processing` (once processors have run for 200 ms, or while retries
//!   are pending) → `processed` or `failed`. An event that no processor takes is `processed`
//!   (usually stored so by the persister).
//! - Processors run as soon as the event is in JetStream; the status write then waits for the
//!   persister (its position, [`crate::watermark`]), and an event still not stored after a
//!   second is NAKed (succeeded processors are not run again).
//! - Any number of workers share the consumer: each event is handled by one at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Message;
use bytes::Bytes;
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{Bus, BusError};
use crate::consume::{BatchHandler, ConsumeLoop, Outcome};
use crate::model::Event;
use crate::persister::decode_message;
use crate::processing::{self, Prior, ResultStatus, RunResult, Runner, StatusChange};
use crate::processors::{Registry, Runnable};
use crate::settings::{CallbackArgs, ProcessorArgs};
use crate::watermark::Watermark;

pub const STAGE: &str = "processor";
const STREAM: &str = "EVENTS";
/// How long the status write waits for the persister before NAKing what is not stored yet.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// How soon to look again when the event is not in PostgreSQL yet.
const NOT_STORED_RETRY: Duration = Duration::from_millis(250);
/// Processors running longer than this show their events as `processing`.
const MARK_PROCESSING_AFTER: Duration = Duration::from_millis(200);
/// How soon to retry after PostgreSQL or NATS failed us.
const OUTAGE_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot load the processor registry")]
    Database(#[from] sqlx::Error),
    #[error("cannot build the HTTP client")]
    Http(#[from] reqwest::Error),
}

/// What a stage of the process shares with the replayer: the registry and the runner.
pub struct Engine {
    pub registry: Arc<Registry>,
    pub runner: Arc<Runner>,
}

impl Engine {
    pub async fn build(bus: &Bus, pool: &PgPool, callbacks: &CallbackArgs) -> Result<Arc<Self>, ProcessorError> {
        let guard = crate::callback::Guard::new(callbacks);
        let registry = Registry::load(pool.clone(), guard.clone()).await?;
        let runner = Arc::new(Runner::new(bus.clone(), guard)?);
        Ok(Arc::new(Self { registry, runner }))
    }
}

/// A built processor stage, ready to run.
pub struct ProcessorStage {
    consume: ConsumeLoop,
    handler: Handler,
    bus: Bus,
}

impl ProcessorStage {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        engine: Arc<Engine>,
        settings: &ProcessorArgs,
    ) -> Result<Self, ProcessorError> {
        let consumer = bus.consumer(STREAM, STAGE).await?;
        let consume = ConsumeLoop {
            stage: STAGE,
            bus: bus.clone(),
            consumer,
            max_batch: settings.batch_size.max(1),
            group: None,
        };
        let watermark = Watermark::start(&bus, pool.clone()).await?;
        let handler = Handler { pool, bus: bus.clone(), engine, watermark, settings: settings.clone() };
        Ok(Self { consume, handler, bus })
    }

    /// Runs until `token` is cancelled; the batch in hand is finished first.
    pub async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(stage = STAGE, "processor running");
        let watch = tokio::spawn(self.handler.engine.registry.clone().watch(self.bus.clone(), token.clone()));
        let result = self.consume.run(&self.handler, token).await;
        watch.abort();
        Ok(result?)
    }
}

struct Handler {
    pool: PgPool,
    bus: Bus,
    engine: Arc<Engine>,
    watermark: Watermark,
    settings: ProcessorArgs,
}

/// A live attempt is the last when the processor has no retries left after it.
fn last_attempt(runnable: &Runnable, attempt: i32) -> bool {
    attempt > runnable.processor.max_retries
}

/// One event of the batch being worked on.
struct Work {
    position: usize,
    seq: u64,
    event: Event,
    payload: Bytes,
    /// (processor, attempt) still to run, in order.
    to_run: Vec<(Arc<Runnable>, i32)>,
    /// Processors that match: the ones already succeeded, and the ones exhausted earlier.
    matching: Vec<Arc<Runnable>>,
    succeeded_before: Vec<String>,
    /// Processors that used up their retries on an earlier delivery, with their failures
    /// and last error.
    exhausted_before: Vec<(String, i32, Option<String>)>,
}

impl BatchHandler for Handler {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let snapshot = self.engine.registry.snapshot();
        let mut work = Vec::with_capacity(batch.len());
        for (position, message) in batch.iter().enumerate() {
            let (seq, published) = match message.info() {
                Ok(info) => (info.stream_sequence, info.published),
                Err(_) => (0, chrono::Utc::now()),
            };
            // What cannot be decoded is the persister's to dead-letter; nothing to run here.
            let Ok(incoming) =
                decode_message(&message.subject, message.headers.as_ref(), &message.payload, seq, published)
            else {
                continue;
            };
            let matching = snapshot.matching(&incoming.event);
            // Processors get the event as the service knows it, whoever produced the message.
            let payload = match matching.is_empty() {
                true => Bytes::new(),
                false => serde_json::to_vec(&incoming.event).map_or_else(|_| message.payload.clone(), Bytes::from),
            };
            work.push(Work {
                position,
                seq,
                event: incoming.event,
                payload,
                to_run: Vec::new(),
                matching,
                succeeded_before: Vec::new(),
                exhausted_before: Vec::new(),
            });
        }
        if work.is_empty() {
            return outcomes;
        }
        // Earlier attempts matter only for events that have processors to run.
        let ids: Vec<Uuid> =
            work.iter().filter(|item| !item.matching.is_empty()).map(|item| item.event.event_id).collect();
        let prior =
            if ids.is_empty() { Ok(Default::default()) } else { processing::prior_results(&self.pool, &ids).await };
        let prior = match prior {
            Ok(prior) => prior,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot read earlier attempts; retrying the batch");
                return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
            }
        };
        for item in &mut work {
            for runnable in &item.matching {
                let earlier =
                    prior.get(&(item.event.event_id, runnable.name().to_owned())).cloned().unwrap_or_default();
                match earlier {
                    Prior { succeeded: true, .. } => item.succeeded_before.push(runnable.name().to_owned()),
                    Prior { exhausted: true, failures, last_error, .. } => {
                        item.exhausted_before.push((runnable.name().to_owned(), failures, last_error))
                    }
                    Prior { failures, .. } => item.to_run.push((runnable.clone(), failures + 1)),
                }
            }
        }
        // Events whose processors take a while show as `processing` meanwhile; quick ones go
        // straight from `pending` to their outcome (one status write instead of two).
        let starting: Vec<StatusChange> = work
            .iter()
            .filter(|item| !item.to_run.is_empty())
            .map(|item| StatusChange {
                event_id: item.event.event_id,
                status: "processing",
                processors: None,
                error_message: None,
                retry_count: None,
                only_from: Some(vec!["pending"]),
            })
            .collect();
        let run = self.run_all(&work);
        tokio::pin!(run);
        let results = tokio::select! {
            results = &mut run => results,
            () = tokio::time::sleep(MARK_PROCESSING_AFTER), if !starting.is_empty() => {
                if let Err(error) = processing::record(&self.pool, &[], &starting).await {
                    tracing::warn!(stage = STAGE, error = %error, "cannot mark events as processing");
                }
                run.await
            }
        };
        let mut changes = Vec::with_capacity(work.len());
        let mut verdicts = Vec::with_capacity(work.len());
        for item in &work {
            let mine: Vec<&RunResult> =
                results.get(&item.event.event_id).map(|r| r.iter().collect()).unwrap_or_default();
            let (change, outcome) = self.verdict(item, &mine);
            changes.push(change);
            verdicts.push(outcome);
        }
        let all_results: Vec<RunResult> = results.values().flatten().cloned().collect();
        // Processors ran while the persister stored; the status needs the row.
        let last_seq = work.iter().map(|item| item.seq).max().unwrap_or(0);
        self.watermark.wait_for(last_seq, STORE_WAIT).await;
        let written = match processing::record(&self.pool, &all_results, &changes).await {
            Ok(written) => written,
            Err(error) => {
                tracing::warn!(stage = STAGE, error = %error, "cannot record processing results; retrying the batch");
                return vec![Outcome::Retry { after: OUTAGE_RETRY }; batch.len()];
            }
        };
        let announcements: Vec<_> = work
            .iter()
            .flat_map(|item| {
                let retry_count = item.to_run.iter().map(|(_, attempt)| attempt - 1).max().unwrap_or(0);
                results
                    .get(&item.event.event_id)
                    .into_iter()
                    .flatten()
                    .filter(|result| matches!(result.status, ResultStatus::Success | ResultStatus::Failed))
                    .map(move |result| processing::processed_message(result, &item.event, retry_count))
            })
            .collect();
        let announced = self.bus.publish_all(announcements).await;
        let lost = announced.iter().filter(|result| result.is_err()).count();
        for (item, outcome) in work.iter().zip(verdicts) {
            outcomes[item.position] = if lost > 0 {
                Outcome::Retry { after: OUTAGE_RETRY }
            } else if !written.contains(&item.event.event_id) {
                Outcome::Retry { after: NOT_STORED_RETRY }
            } else {
                outcome
            };
        }
        if lost > 0 {
            tracing::warn!(stage = STAGE, lost, "cannot publish processed events; retrying the batch");
        }
        outcomes
    }
}

impl Handler {
    /// Runs every event's processors: one stream's events in order, streams concurrently.
    async fn run_all(&self, work: &[Work]) -> HashMap<Uuid, Vec<RunResult>> {
        let mut groups: BTreeMap<String, Vec<&Work>> = BTreeMap::new();
        for item in work.iter().filter(|item| !item.to_run.is_empty()) {
            let key = item.event.stream_id.clone().unwrap_or_else(|| format!("event:{}", item.event.event_id));
            groups.entry(key).or_default().push(item);
        }
        let runner = &self.engine.runner;
        let groups: Vec<_> = groups
            .into_values()
            .map(|group| async move {
                let mut done = Vec::with_capacity(group.len());
                for item in group {
                    let results =
                        processing::run_in_order(runner, &item.event, &item.payload, &item.to_run, "", last_attempt)
                            .await;
                    done.push((item.event.event_id, results));
                }
                done
            })
            .collect();
        let done: Vec<Vec<(Uuid, Vec<RunResult>)>> =
            futures::stream::iter(groups).buffer_unordered(self.settings.concurrency.max(1)).collect().await;
        done.into_iter().flatten().collect()
    }

    /// The event's new status and what to do with its message.
    fn verdict(&self, item: &Work, results: &[&RunResult]) -> (StatusChange, Outcome) {
        let mut succeeded = item.succeeded_before.clone();
        succeeded
            .extend(results.iter().filter(|r| r.status == ResultStatus::Success).map(|r| r.processor_name.clone()));
        let retrying: Vec<&&RunResult> = results.iter().filter(|r| r.status == ResultStatus::Retry).collect();
        let failed: Vec<&&RunResult> = results.iter().filter(|r| r.status == ResultStatus::Failed).collect();
        let earlier = item.exhausted_before.iter();
        let retry_count = results
            .iter()
            .map(|r| r.attempt - 1)
            .chain(earlier.clone().map(|(_, failures, _)| failures - 1))
            .max()
            .unwrap_or(0);
        let last_error = results
            .iter()
            .rev()
            .find(|r| r.status != ResultStatus::Success)
            .map(|r| format!("{}: {}", r.processor_name, r.message.as_deref().unwrap_or("failed")))
            .or_else(|| {
                earlier
                    .clone()
                    .last()
                    .map(|(name, _, error)| format!("{name}: {}", error.as_deref().unwrap_or("failed")))
            });
        let change = |status: &'static str| StatusChange {
            event_id: item.event.event_id,
            status,
            processors: Some(succeeded.clone()),
            error_message: last_error.clone(),
            retry_count: Some(retry_count),
            only_from: None,
        };
        if item.matching.is_empty() {
            // Nothing takes it: the persister usually stored it `processed` already, and then
            // this changes nothing (no row is rewritten). It is still written, in case the
            // persister saw a processor that is gone now.
            let change = StatusChange { only_from: Some(vec!["pending", "processing"]), ..change("processed") };
            return (change, Outcome::Ack);
        }
        if let Some(first) = retrying.iter().map(|r| r.attempt).min() {
            return (change("processing"), Outcome::Retry { after: self.settings.retry_delay(first as u32) });
        }
        if !failed.is_empty() || !item.exhausted_before.is_empty() {
            let names: Vec<&str> = failed
                .iter()
                .map(|r| r.processor_name.as_str())
                .chain(item.exhausted_before.iter().map(|(name, _, _)| name.as_str()))
                .collect();
            let detail = format!(
                "processors failed after their retries: {}; last error: {}",
                names.join(", "),
                last_error.as_deref().unwrap_or("unknown")
            );
            return (change("failed"), Outcome::reject("processor_failed", detail));
        }
        (change("processed"), Outcome::Ack)
    }
}
