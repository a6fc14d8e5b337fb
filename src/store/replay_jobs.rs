//! Replay jobs (`event.replay_jobs`): what a replay selects, its progress, and the pages of
//! events it works through.
//!
//! Reads `event.events` (by ids only inside their days, from `event.event_ids`) and
//! `event.event_processors`; reads and writes `event.replay_jobs`.
//! Guarantees: a job's progress ([`advance`]) is written in the caller's transaction with the
//! results it counts, so a resumed job continues exactly after the last event it recorded.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};
use uuid::Uuid;

use super::events::{EVENT_COLUMNS, StoredEvent};
use crate::domain::JobStatus;

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
            // The ids' days, from the id guard: the partitions outside are pruned when the
            // query runs, rather than their id indexes probed (see store::by_id).
            query
                .push(" AND stored_at BETWEEN (SELECT min(stored_at) FROM event.event_ids WHERE event_id = ANY(")
                .push_bind(ids.clone())
                .push(")) AND (SELECT max(stored_at) FROM event.event_ids WHERE event_id = ANY(")
                .push_bind(ids.clone())
                .push("))");
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

/// A replay job as `GET /api/v1/events/replay/{replay_id}` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Job {
    pub replay_id: Uuid,
    pub status: JobStatus,
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
    /// Set when the job redrives a processor's dead letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_seq: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Job {
    /// Share of the selection done, from 0 to 1.
    pub fn progress(&self) -> f64 {
        if self.status == JobStatus::Completed || self.events_count == 0 {
            1.0
        } else {
            ((self.replayed + self.failed) as f64 / self.events_count as f64).min(1.0)
        }
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

/// The next page of a job's selection: events after `job.last_seq` up to `job.until_seq`.
pub async fn next_page(pool: &PgPool, job: &Job, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let mut query = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM event.events"));
    job.selector.push_where(&mut query);
    query
        .push(" AND stream_seq > ")
        .push_bind(job.last_seq)
        .push(" AND stream_seq <= ")
        .push_bind(job.until_seq)
        .push(" ORDER BY stream_seq LIMIT ")
        .push_bind(limit);
    query.build_query_as().fetch_all(pool).await
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

/// A new job, queued.
pub struct NewJob<'a> {
    pub replay_id: Uuid,
    pub selector: &'a Selector,
    pub target_service: Option<&'a str>,
    pub processors: Option<&'a [String]>,
    pub events_count: i64,
    pub until_seq: i64,
    /// The processor dead letter this job redrives (deleted when the job succeeds).
    pub dead_letter_seq: Option<i64>,
}

pub async fn insert(pool: &PgPool, job: &NewJob<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO event.replay_jobs (replay_id, status, selector, target_service, processors, events_count, until_seq, \
                                       dead_letter_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(job.replay_id)
    .bind(JobStatus::Queued)
    .bind(sqlx::types::Json(job.selector))
    .bind(job.target_service)
    .bind(job.processors)
    .bind(job.events_count)
    .bind(job.until_seq)
    .bind(job.dead_letter_seq)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether a queued or running replay job redrives this processor dead letter.
pub async fn redriving(pool: &PgPool, dead_letter_seq: u64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM event.replay_jobs WHERE dead_letter_seq = $1 AND status IN ('queued', 'running'))",
    )
    .bind(dead_letter_seq as i64)
    .fetch_one(pool)
    .await
}

pub async fn get(pool: &PgPool, replay_id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(
        "SELECT replay_id, status, selector, target_service, processors, events_count, replayed, failed, until_seq, \
                last_seq, error_message, dead_letter_seq, created_at, started_at, completed_at \
         FROM event.replay_jobs WHERE replay_id = $1",
    )
    .bind(replay_id)
    .fetch_optional(pool)
    .await
}

/// Moves a job to `status`, stamping when it started or completed.
pub async fn set_status(pool: &PgPool, replay_id: Uuid, status: JobStatus) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE event.replay_jobs SET status = $2, \
             started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now()) ELSE started_at END, \
             completed_at = CASE WHEN $2 = 'completed' THEN now() ELSE completed_at END, \
             updated_at = now() \
         WHERE replay_id = $1",
    )
    .bind(replay_id)
    .bind(status)
    .execute(pool)
    .await?;
    Ok(())
}

/// Adds a page's counts to the job and moves its position, in the caller's transaction.
pub async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    replay_id: Uuid,
    replayed: i64,
    failed: i64,
    last_seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE event.replay_jobs SET replayed = replayed + $2, failed = failed + $3, last_seq = $4, \
         updated_at = now() WHERE replay_id = $1",
    )
    .bind(replay_id)
    .bind(replayed)
    .bind(failed)
    .bind(last_seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
