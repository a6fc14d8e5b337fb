//! Replays: re-running processors on stored events, and republishing them for a service.
//!
//! The gateway validates a request, counts the selection and, unless it is a dry run, stores
//! a job (`event.replay_jobs`) and publishes it on `jobs.replay` (stream JOBS). The replayer,
//! which runs beside the processor stage, takes jobs from the durable `replayer` consumer.
//!
//! Reads `event.events`; writes new `processing_results` rows (run id = replay id, so the
//! originals stay), lifts `failed` events whose processors now all succeed to `processed`,
//! job progress, `replay.{target_service}.{source}.{category}.{type}`, and
//! `event.replay.started` / `event.replay.completed`. Guarantees: a job is a JetStream
//! message, so it survives restarts of the gateway and of the replayer; it resumes after the
//! last event it recorded (progress and results commit together) and replays the selection as
//! it was when the job was asked for (up to `until_seq`), in stream order.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, QueryBuilder};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{Bus, BusError, Outgoing};
use crate::consume::{BatchHandler, ConsumeLoop, Outcome};
use crate::ingest::{self, FieldError, Fields};
use crate::processing::{self, ResultStatus, StatusChange};
use crate::processor::Engine;
use crate::processors::Runnable;
use crate::store::{EVENT_COLUMNS, StoredEvent};
use crate::subject;

pub const STAGE: &str = "replayer";
const STREAM: &str = "JOBS";
/// Events replayed (and recorded) per step.
const PAGE: i64 = 200;
const MAX_EVENT_IDS: usize = 10_000;
const MAX_PAGE: i64 = 1000;

/// Which events a replay takes: every selector given must hold (they combine with AND).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_ids: Option<Vec<Uuid>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<DateTime<Utc>>,
}

impl Selector {
    fn push_where(&self, query: &mut QueryBuilder<Postgres>) {
        query.push(" WHERE true");
        if let Some(ids) = &self.event_ids {
            query.push(" AND event_id = ANY(").push_bind(ids.clone()).push(")");
        }
        if let Some(stream_id) = &self.stream_id {
            query.push(" AND stream_id = ").push_bind(stream_id.clone());
        }
        if let Some(start) = self.start_time {
            query.push(" AND \"timestamp\" >= ").push_bind(start);
        }
        if let Some(end) = self.end_time {
            query.push(" AND \"timestamp\" <= ").push_bind(end);
        }
    }
}

/// A validated `POST /api/v1/events/replay`.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub selector: Selector,
    pub target_service: Option<String>,
    pub dry_run: bool,
    pub processors: Option<Vec<String>>,
    /// The page of event ids a dry run shows.
    pub limit: i64,
    pub offset: i64,
}

pub fn parse_request(body: &Value) -> Result<ReplayRequest, Vec<FieldError>> {
    let Some(map) = body.as_object() else {
        return Err(vec![FieldError::new("body", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let event_ids = match fields.get("event_ids") {
        None => None,
        Some(Value::Array(items)) if items.len() > MAX_EVENT_IDS => {
            fields.fail("event_ids", format!("holds {} ids; the limit is {MAX_EVENT_IDS}", items.len()));
            None
        }
        Some(Value::Array(items)) => {
            let parsed: Option<Vec<Uuid>> =
                items.iter().map(|item| item.as_str().and_then(|text| Uuid::parse_str(text).ok())).collect();
            if parsed.is_none() {
                fields.fail("event_ids", "must be an array of event ids (UUIDs)");
            }
            parsed
        }
        Some(_) => {
            fields.fail("event_ids", "must be an array of event ids (UUIDs)");
            None
        }
    };
    let stream_id = fields.string("stream_id", ingest::MAX_ID_CHARS * 2 + 1);
    let start_time = fields.timestamp("start_time");
    let end_time = fields.timestamp("end_time");
    match (fields.present("start_time"), fields.present("end_time")) {
        (true, false) => fields.fail("end_time", "is required with start_time"),
        (false, true) => fields.fail("start_time", "is required with end_time"),
        _ => {}
    }
    if let (Some(start), Some(end)) = (start_time, end_time)
        && end < start
    {
        fields.fail("end_time", "must not be before start_time");
    }
    let target_service = fields.string("target_service", 100);
    if let Some(target) = &target_service
        && (target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        fields.fail("target_service", "must be 1 to 100 letters, digits, '_' or '-'");
    }
    let dry_run = match fields.get("dry_run") {
        None => false,
        Some(Value::Bool(dry_run)) => *dry_run,
        Some(_) => {
            fields.fail("dry_run", "must be true or false");
            false
        }
    };
    let processors = match fields.get("processors") {
        None => None,
        Some(Value::Array(items)) if !items.is_empty() => {
            let names: Option<Vec<String>> = items.iter().map(|item| item.as_str().map(str::to_owned)).collect();
            if names.is_none() {
                fields.fail("processors", "must be an array of processor names");
            }
            names
        }
        Some(_) => {
            fields.fail("processors", "must be a non-empty array of processor names");
            None
        }
    };
    let limit = match fields.get("limit").map(Value::as_i64) {
        None => 100,
        Some(Some(limit)) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(_) => {
            fields.fail("limit", format!("must be an integer from 1 to {MAX_PAGE}"));
            100
        }
    };
    let offset = match fields.get("offset").map(Value::as_i64) {
        None => 0,
        Some(Some(offset)) if offset >= 0 => offset,
        Some(_) => {
            fields.fail("offset", "must be an integer ≥ 0");
            0
        }
    };
    let selector = Selector { event_ids, stream_id, start_time, end_time };
    if errors.is_empty()
        && selector.event_ids.is_none()
        && selector.stream_id.is_none()
        && selector.start_time.is_none()
    {
        errors.push(FieldError::new("body", "needs a selector: event_ids, stream_id, or start_time and end_time"));
    }
    if errors.is_empty() {
        Ok(ReplayRequest { selector, target_service, dry_run, processors, limit, offset })
    } else {
        Err(errors)
    }
}

/// How many events the selection holds, and the newest one's stream position.
pub async fn measure(pool: &PgPool, selector: &Selector) -> Result<(i64, i64), sqlx::Error> {
    let mut query = QueryBuilder::new("SELECT count(*), COALESCE(max(stream_seq), 0) FROM event.events");
    selector.push_where(&mut query);
    query.build_query_as().fetch_one(pool).await
}

/// A page of the selection's event ids, in stream order.
pub async fn preview(pool: &PgPool, selector: &Selector, limit: i64, offset: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut query = QueryBuilder::new("SELECT event_id FROM event.events");
    selector.push_where(&mut query);
    query.push(" ORDER BY stream_seq LIMIT ").push_bind(limit).push(" OFFSET ").push_bind(offset);
    query.build_query_scalar().fetch_all(pool).await
}

/// The processor names among `names` that are not registered.
pub async fn unknown_processors(pool: &PgPool, names: &[String]) -> Result<Vec<String>, sqlx::Error> {
    let known: Vec<String> =
        sqlx::query_scalar("SELECT processor_name FROM event.event_processors WHERE processor_name = ANY($1)")
            .bind(names)
            .fetch_all(pool)
            .await?;
    Ok(names.iter().filter(|name| !known.contains(name)).cloned().collect())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Stores the job and hands it to the replayers; publishes `event.replay.started`.
pub async fn start(
    pool: &PgPool,
    bus: &Bus,
    request: &ReplayRequest,
    events_count: i64,
    until_seq: i64,
) -> Result<Uuid, ReplayError> {
    let replay_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO event.replay_jobs (replay_id, status, selector, target_service, processors, events_count, until_seq) \
         VALUES ($1, 'queued', $2, $3, $4, $5, $6)",
    )
    .bind(replay_id)
    .bind(sqlx::types::Json(&request.selector))
    .bind(&request.target_service)
    .bind(&request.processors)
    .bind(events_count)
    .bind(until_seq)
    .execute(pool)
    .await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("replay.{replay_id}").as_str());
    let job = json!({"replay_id": replay_id});
    bus.publish(Outgoing { subject: subject::REPLAY_JOBS.to_owned(), headers, payload: Bytes::from(job.to_string()) })
        .await?;
    announce_started(bus, replay_id, request, events_count).await;
    Ok(replay_id)
}

/// Publishes `event.replay.started` (dry runs too: the spec's payload says which it was).
pub async fn announce_started(bus: &Bus, replay_id: Uuid, request: &ReplayRequest, events_count: i64) {
    let body = json!({
        "replay_id": replay_id, "events_count": events_count, "stream_id": request.selector.stream_id,
        "target_service": request.target_service, "dry_run": request.dry_run, "timestamp": Utc::now(),
    });
    announce(bus, subject::EVENT_REPLAY_STARTED, replay_id, body).await;
}

async fn announce(bus: &Bus, subject: &str, replay_id: Uuid, body: Value) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{subject}.{replay_id}").as_str());
    let message = Outgoing { subject: subject.to_owned(), headers, payload: Bytes::from(body.to_string()) };
    if let Err(error) = bus.publish(message).await {
        tracing::warn!(%replay_id, error = %error, subject, "cannot announce the replay");
    }
}

/// A replay job as `GET /api/v1/events/replay/{replay_id}` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub replay_id: Uuid,
    pub status: String,
    pub selector: sqlx::types::Json<Selector>,
    pub target_service: Option<String>,
    pub processors: Option<Vec<String>>,
    pub events_count: i64,
    pub replayed: i64,
    pub failed: i64,
    #[serde(skip)]
    pub until_seq: i64,
    #[serde(skip)]
    pub last_seq: i64,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Job {
    /// Share of the selection done, from 0 to 1.
    pub fn progress(&self) -> f64 {
        if self.status == "completed" || self.events_count == 0 {
            1.0
        } else {
            ((self.replayed + self.failed) as f64 / self.events_count as f64).min(1.0)
        }
    }
}

pub async fn get_job(pool: &PgPool, replay_id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(
        "SELECT replay_id, status, selector, target_service, processors, events_count, replayed, failed, until_seq, \
                last_seq, error_message, created_at, started_at, completed_at \
         FROM event.replay_jobs WHERE replay_id = $1",
    )
    .bind(replay_id)
    .fetch_optional(pool)
    .await
}

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
    ) -> Result<Self, BusError> {
        let consumer = bus.consumer(STREAM, STAGE).await?;
        let consume = ConsumeLoop { stage: STAGE, bus: bus.clone(), consumer, max_batch: 1, group: None };
        Ok(Self { consume, handler: JobHandler { pool, bus, engine, token } })
    }

    pub async fn run(self, token: CancellationToken) -> anyhow::Result<()> {
        Ok(self.consume.run(&self.handler, token).await?)
    }
}

struct JobHandler {
    pool: PgPool,
    bus: Bus,
    engine: Arc<Engine>,
    /// Checked between pages, so a long job does not hold up shutdown.
    token: CancellationToken,
}

#[derive(Deserialize)]
struct JobMessage {
    replay_id: Uuid,
}

impl BatchHandler for JobHandler {
    async fn handle(&self, batch: &[Message]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for message in batch {
            let Ok(job) = serde_json::from_slice::<JobMessage>(&message.payload) else {
                outcomes.push(Outcome::reject("invalid_job", "a replay job message must be {\"replay_id\": uuid}"));
                continue;
            };
            let outcome = match self.run_job(job.replay_id, message).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::warn!(stage = STAGE, replay_id = %job.replay_id, error = %error, "replay step failed; retrying");
                    Outcome::Retry { after: Duration::from_secs(2) }
                }
            };
            outcomes.push(outcome);
        }
        outcomes
    }
}

impl JobHandler {
    async fn run_job(&self, replay_id: Uuid, message: &Message) -> Result<Outcome, sqlx::Error> {
        let Some(mut job) = get_job(&self.pool, replay_id).await? else {
            tracing::warn!(stage = STAGE, %replay_id, "replay job has no row; dropping it");
            return Ok(Outcome::Ack);
        };
        if job.status == "completed" {
            return Ok(Outcome::Ack);
        }
        sqlx::query(
            "UPDATE event.replay_jobs SET status = 'running', started_at = COALESCE(started_at, now()), \
             updated_at = now() WHERE replay_id = $1",
        )
        .bind(replay_id)
        .execute(&self.pool)
        .await?;
        tracing::info!(stage = STAGE, %replay_id, events = job.events_count, resume_after = job.last_seq, "replay running");
        loop {
            if self.token.is_cancelled() {
                return Ok(Outcome::Retry { after: Duration::ZERO });
            }
            let mut query = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM event.events"));
            job.selector.push_where(&mut query);
            query
                .push(" AND stream_seq > ")
                .push_bind(job.last_seq)
                .push(" AND stream_seq <= ")
                .push_bind(job.until_seq)
                .push(" ORDER BY stream_seq LIMIT ")
                .push_bind(PAGE);
            let events: Vec<StoredEvent> = query.build_query_as().fetch_all(&self.pool).await?;
            let Some(last) = events.last() else { break };
            let last_seq = last.stream_seq;
            let (replayed, failed) = self.replay_page(&job, &events).await?;
            job.replayed += replayed;
            job.failed += failed;
            job.last_seq = last_seq;
            // Keep the job ours while it runs.
            let _ = message.ack_with(AckKind::Progress).await;
        }
        sqlx::query(
            "UPDATE event.replay_jobs SET status = 'completed', completed_at = now(), updated_at = now() \
             WHERE replay_id = $1",
        )
        .bind(replay_id)
        .execute(&self.pool)
        .await?;
        let body = json!({
            "replay_id": replay_id, "events_count": job.events_count, "replayed": job.replayed, "failed": job.failed,
            "stream_id": job.selector.stream_id, "target_service": job.target_service, "dry_run": false,
            "timestamp": Utc::now(),
        });
        announce(&self.bus, subject::EVENT_REPLAY_COMPLETED, replay_id, body).await;
        tracing::info!(stage = STAGE, %replay_id, replayed = job.replayed, failed = job.failed, "replay completed");
        Ok(Outcome::Ack)
    }

    /// Replays one page in stream order and records it with the job's progress, in one
    /// transaction. Returns (replayed, failed) counts.
    async fn replay_page(&self, job: &Job, events: &[StoredEvent]) -> Result<(i64, i64), sqlx::Error> {
        let run_id = job.replay_id.to_string();
        let snapshot = self.engine.registry.snapshot();
        let runner = &self.engine.runner;
        let mut results = Vec::new();
        let mut changes = Vec::new();
        let mut announcements = Vec::new();
        let (mut replayed, mut failed) = (0, 0);
        for stored in events {
            let event = stored.to_event();
            let payload = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
            let processors: Vec<(Arc<Runnable>, i32)> = match &job.processors {
                Some(names) => names.iter().filter_map(|name| snapshot.by_name(name)).map(|p| (p, 1)).collect(),
                None => snapshot.matching(&event).into_iter().map(|p| (p, 1)).collect(),
            };
            let ran = processing::run_in_order(runner, &event, &payload, &processors, &run_id, |_, _| true).await;
            let mut ok = ran.iter().all(|result| result.status == ResultStatus::Success);
            if let Some(target) = &job.target_service {
                let subject = subject::replay_subject(
                    target,
                    event.event_source.as_str(),
                    event.event_category.as_str(),
                    &event.event_type,
                );
                if let Err(error) = runner.republish(subject, &event, &payload, &run_id).await {
                    tracing::warn!(stage = STAGE, replay_id = %job.replay_id, event_id = %event.event_id, %error,
                        "cannot republish for the target service");
                    ok = false;
                }
            }
            if ok && !ran.is_empty() {
                changes.push(StatusChange {
                    event_id: event.event_id,
                    status: "processed",
                    processors: Some(ran.iter().map(|result| result.processor_name.clone()).collect()),
                    error_message: None,
                    retry_count: None,
                    only_from: Some(vec!["failed"]),
                });
            }
            announcements.extend(ran.iter().map(|result| processing::processed_message(result, &event, 0)));
            if ok {
                replayed += 1;
            } else {
                failed += 1;
            }
            results.extend(ran);
        }
        let mut tx = self.pool.begin().await?;
        processing::record_in(&mut tx, &results, &changes).await?;
        sqlx::query(
            "UPDATE event.replay_jobs SET replayed = replayed + $2, failed = failed + $3, last_seq = $4, \
             updated_at = now() WHERE replay_id = $1",
        )
        .bind(job.replay_id)
        .bind(replayed)
        .bind(failed)
        .bind(events.last().map_or(job.last_seq, |event| event.stream_seq))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        for result in self.bus.publish_all(announcements).await {
            if let Err(error) = result {
                tracing::warn!(stage = STAGE, replay_id = %job.replay_id, error = %error, "cannot announce a replayed result");
            }
        }
        Ok((replayed, failed))
    }
}
