//! The replayer's I/O shell: takes a job, works through its selection page by page, records
//! each page with the job's progress, announces completion.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::STAGE;
use crate::domain::{EventStatus, JobStatus, ResultStatus};
use crate::infra::bus::Bus;
use crate::infra::consume::{Batch, BatchHandler, Handled, Outcome, Transient};
use crate::infra::deadletter::letters::DeadLetters;
use crate::stages::processor::{self, Engine};
use crate::store::events::StoredEvent;
use crate::store::processing::{self, StatusChange};
use crate::store::replay_jobs::{self, Job};
use crate::wire::domain_events::{DomainEvent, ReplayCompleted};
use crate::wire::{TraceContext, subjects};

/// Events replayed (and recorded) per step.
const PAGE: i64 = 200;

pub(super) struct JobHandler {
    pub pool: PgPool,
    pub bus: Bus,
    pub engine: Arc<Engine>,
    /// Checked between pages, so a long job does not hold up shutdown.
    pub token: CancellationToken,
}

#[derive(Deserialize)]
struct JobMessage {
    replay_id: Uuid,
}

fn database(error: sqlx::Error) -> Transient {
    Transient::new("cannot read or record a replay job", error)
}

impl BatchHandler for JobHandler {
    async fn handle(&self, batch: &Batch<'_>) -> Handled {
        let mut outcomes = Vec::with_capacity(batch.messages.len());
        for message in batch.messages {
            let outcome = match serde_json::from_slice::<JobMessage>(&message.payload) {
                Ok(job) => self.run_job(job.replay_id).await?,
                Err(_) => Outcome::reject("invalid_job", "a replay job message must be {\"replay_id\": uuid}"),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

impl JobHandler {
    /// Runs a job to its end, resuming after the last page it recorded.
    async fn run_job(&self, replay_id: Uuid) -> Result<Outcome, Transient> {
        let Some(mut job) = replay_jobs::get(&self.pool, replay_id).await.map_err(database)? else {
            tracing::warn!(stage = STAGE, %replay_id, "replay job has no row; dropping it");
            return Ok(Outcome::Ack);
        };
        if job.status == JobStatus::Completed {
            return Ok(Outcome::Ack);
        }
        replay_jobs::set_status(&self.pool, replay_id, JobStatus::Running).await.map_err(database)?;
        tracing::info!(stage = STAGE, %replay_id, events = job.events_count, resume_after = job.last_seq, "replay running");
        loop {
            if self.token.is_cancelled() {
                return Ok(Outcome::Retry { after: Duration::ZERO });
            }
            let events = replay_jobs::next_page(&self.pool, &job, PAGE).await.map_err(database)?;
            let Some(last) = events.last() else { break };
            let last_seq = last.stream_seq;
            let (replayed, failed) = self.replay_page(&job, &events).await?;
            job.replayed += replayed;
            job.failed += failed;
            job.last_seq = last_seq;
        }
        // Before the job is marked completed: a crash in between runs the job to its end
        // again, and this again.
        if let Some(seq) = job.dead_letter_seq {
            self.settle_dead_letter(seq as u64, &job).await;
        }
        replay_jobs::set_status(&self.pool, replay_id, JobStatus::Completed).await.map_err(database)?;
        let completed = ReplayCompleted {
            replay_id,
            events_count: job.events_count,
            replayed: job.replayed,
            failed: job.failed,
            stream_id: job.selector.stream_id.as_deref(),
            target_service: job.target_service.as_deref(),
            dry_run: false,
            timestamp: Utc::now(),
        };
        self.bus.announce(completed.to_message().into_iter().collect()).await;
        tracing::info!(stage = STAGE, %replay_id, replayed = job.replayed, failed = job.failed, "replay completed");
        Ok(Outcome::Ack)
    }

    /// A redrive's job ended: its dead letter goes once every event of the job succeeded; after
    /// a failure it stays listed (the processors failed again).
    async fn settle_dead_letter(&self, seq: u64, job: &Job) {
        if job.failed > 0 {
            tracing::warn!(stage = STAGE, replay_id = %job.replay_id, dead_letter = seq,
                "the redriven processors failed again; the dead letter stays");
            return;
        }
        let deleted = match DeadLetters::open(&self.bus).await {
            Ok(letters) => letters.delete(seq).await,
            Err(error) => Err(error),
        };
        if let Err(error) = deleted {
            tracing::warn!(stage = STAGE, replay_id = %job.replay_id, dead_letter = seq, %error,
                "cannot delete the redriven dead letter; delete it by hand");
        }
    }

    /// Replays one page in stream order and records it with the job's progress, in one
    /// transaction. Returns (replayed, failed) counts.
    async fn replay_page(&self, job: &Job, events: &[StoredEvent]) -> Result<(i64, i64), Transient> {
        let run_id = job.replay_id.to_string();
        let set = self.engine.registry.snapshot();
        let runner = &self.engine.runner;
        let (mut results, mut changes, mut announcements) = (Vec::new(), Vec::new(), Vec::new());
        let (mut replayed, mut failed) = (0, 0);
        for stored in events {
            let event = stored.to_event();
            let payload = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
            let processors: Vec<_> = match &job.processors {
                Some(names) => names.iter().filter_map(|name| set.by_name(name)).map(|p| (p, 1)).collect(),
                None => set.matching(&event).into_iter().map(|p| (p, 1)).collect(),
            };
            // The producer's trace is not stored; the replay names the event's own.
            let trace = TraceContext::for_event(event.event_id);
            let ran = runner.run_in_order(&event, &payload, &processors, &run_id, &trace, |_, _| true).await;
            let mut ok = ran.iter().all(|ran| ran.result.status == ResultStatus::Success);
            // A redrive whose processors are gone ran nothing: that is not a success.
            if ran.is_empty() && job.dead_letter_seq.is_some() {
                ok = false;
            }
            if let Some(target) = &job.target_service {
                let subject = subjects::replay_subject(
                    target,
                    event.event_source.as_str(),
                    event.event_category.as_str(),
                    &event.event_type,
                );
                let message_id = format!("{}.{run_id}", event.event_id);
                if let Err(error) = runner.publish(subject, &message_id, &payload, &trace).await {
                    tracing::warn!(stage = STAGE, replay_id = %job.replay_id, event_id = %event.event_id, %error,
                        "cannot republish for the target service");
                    ok = false;
                }
            }
            if ok && !ran.is_empty() {
                changes.push(lifted(stored, &ran));
            }
            announcements.extend(ran.iter().filter_map(|ran| processor::processed_message(&ran.result, &event, 0)));
            if ok {
                replayed += 1;
            } else {
                failed += 1;
            }
            processor::disable_gone(&self.pool, &self.bus, ran.iter()).await;
            results.extend(ran.into_iter().map(|ran| ran.result));
        }
        let last_seq = events.last().map_or(job.last_seq, |event| event.stream_seq);
        let mut tx = self.pool.begin().await.map_err(database)?;
        processing::record_in(&mut tx, &results, &changes).await.map_err(database)?;
        replay_jobs::advance(&mut tx, job.replay_id, replayed, failed, last_seq).await.map_err(database)?;
        tx.commit().await.map_err(database)?;
        self.bus.announce(announcements).await;
        Ok((replayed, failed))
    }
}

/// A `failed` event whose processors all succeeded in the replay becomes `processed`; its
/// processors are the ones that had succeeded before and the ones that did now.
fn lifted(stored: &StoredEvent, ran: &[crate::stages::processor::verdict::Ran]) -> StatusChange {
    let mut processors = stored.processors.clone();
    for ran in ran {
        if !processors.contains(&ran.result.processor_name) {
            processors.push(ran.result.processor_name.clone());
        }
    }
    StatusChange {
        event_id: stored.event_id,
        status: EventStatus::Processed,
        processors: Some(processors),
        error_message: None,
        retry_count: None,
        only_from: Some(vec![EventStatus::Failed]),
    }
}
