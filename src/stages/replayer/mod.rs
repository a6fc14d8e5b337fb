//! The replayer: re-runs processors on stored events, and republishes them for a service.
//!
//! The gateway validates a request ([`request`]), counts the selection and, unless it is a
//! dry run, stores a job (`event.replay_jobs`) and publishes it on `jobs.replay` (stream JOBS)
//! with [`submit`]. The replayer, which runs beside the processor stage, takes jobs from the
//! durable `replayer` consumer.
//!
//! Reads `event.events`; writes new `processing_results` rows (run id = replay id, so the
//! originals stay), lifts `failed` events whose processors now all succeed to `processed`,
//! job progress, `replay.{target_service}.{source}.{category}.{type}`, and
//! `event.replay.started` / `event.replay.completed`. Guarantees: a job is a JetStream
//! message, so it survives restarts of the gateway and of the replayer; it resumes after the
//! last event it recorded (progress and results commit together) and replays the selection as
//! it was when the job was asked for (up to `until_seq`), in stream order.

mod handler;
pub mod request;

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::StageError;
use super::processor::Engine;
use crate::infra::bus::{Bus, BusError};
use crate::infra::consume::ConsumeLoop;
use crate::store::replay_jobs::{self, NewJob};
use crate::wire::Outgoing;
use crate::wire::domain_events::{DomainEvent, ReplayStarted};
use crate::wire::subjects::{self, streams};
use handler::JobHandler;
pub use request::{ReplayRequest, parse_request};

pub const STAGE: &str = "replayer";

/// The stage that runs replay jobs.
pub struct Replayer {
    consume: ConsumeLoop,
    handler: JobHandler,
}

impl Replayer {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        engine: Arc<Engine>,
        token: CancellationToken,
    ) -> Result<Self, StageError> {
        let consume = ConsumeLoop::build(&bus, streams::JOBS, STAGE, 1).await?;
        Ok(Self { consume, handler: JobHandler { pool, bus, engine, token } })
    }

    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        Ok(self.consume.run(&self.handler, token).await?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Stores the job and hands it to the replayers; announces `event.replay.started`.
pub async fn submit(
    pool: &PgPool,
    bus: &Bus,
    request: &ReplayRequest,
    events_count: i64,
    until_seq: i64,
) -> Result<Uuid, SubmitError> {
    let replay_id = Uuid::now_v7();
    let job = NewJob {
        replay_id,
        selector: &request.selector,
        target_service: request.target_service.as_deref(),
        processors: request.processors.as_deref(),
        events_count,
        until_seq,
        dead_letter_seq: request.dead_letter_seq.and_then(|seq| i64::try_from(seq).ok()),
    };
    replay_jobs::insert(pool, &job).await?;
    let message = json!({"replay_id": replay_id}).to_string();
    let message =
        Outgoing::with_id(subjects::REPLAY_JOBS.to_owned(), &format!("replay.{replay_id}"), Bytes::from(message));
    bus.publish(message).await?;
    announce_started(bus, replay_id, request, events_count).await;
    Ok(replay_id)
}

/// Announces `event.replay.started` (dry runs too: the payload says which it was).
pub async fn announce_started(bus: &Bus, replay_id: Uuid, request: &ReplayRequest, events_count: i64) {
    let started = ReplayStarted {
        replay_id,
        events_count,
        stream_id: request.selector.stream_id.as_deref(),
        target_service: request.target_service.as_deref(),
        dry_run: request.dry_run,
        timestamp: Utc::now(),
    };
    bus.announce(started.to_message().into_iter().collect()).await;
}
