//! What processor runs did: `processing_results`, the events' processing status, the
//! processors' counters, and the status rollups, written together.
//!
//! Reads earlier attempts of the live run, and `event.event_ids` to find the events' partitions;
//! writes `event.processing_results`, `event.events`
//! (status), `event.event_processors` (counters) and the rollups, in one transaction per
//! batch. Guarantees: a status change moves the rollup counts in the same transaction;
//! results are keyed by (event, processor, run, attempt), so a redelivered attempt overwrites
//! its own row and a replay adds rows.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::by_id;
use super::rollups::{self, StatusCounts};
use crate::domain::{EventStatus, ResultStatus};

/// One `processing_results` row.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub event_id: Uuid,
    pub processor_id: String,
    pub processor_name: String,
    pub run_id: String,
    pub attempt: i32,
    pub status: ResultStatus,
    pub message: Option<String>,
    pub duration_ms: f64,
    pub processed_at: DateTime<Utc>,
}

/// The processing status an event moves to.
#[derive(Debug, Clone, Serialize)]
pub struct StatusChange {
    pub event_id: Uuid,
    pub status: EventStatus,
    /// Processors that succeeded; `None` keeps what is stored.
    pub processors: Option<Vec<String>>,
    pub error_message: Option<String>,
    pub retry_count: Option<i32>,
    /// Only move events in these statuses (a replay only lifts `failed` ones).
    pub only_from: Option<Vec<EventStatus>>,
}

/// What earlier attempts of the live run did, per (event, processor).
#[derive(Debug, Clone, Default)]
pub struct Prior {
    pub succeeded: bool,
    pub exhausted: bool,
    pub failures: i32,
    /// The message of the latest failed attempt.
    pub last_error: Option<String>,
}

/// Earlier live-run results of these events, keyed by (event, processor name).
pub async fn prior_results(pool: &PgPool, event_ids: &[Uuid]) -> Result<HashMap<(Uuid, String), Prior>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        event_id: Uuid,
        processor_name: String,
        succeeded: bool,
        exhausted: bool,
        failures: i64,
        last_error: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, processor_name, bool_or(status = 'success') AS succeeded, \
                bool_or(status = 'failed') AS exhausted, \
                count(*) FILTER (WHERE status IN ('retry', 'failed')) AS failures, \
                (array_agg(message ORDER BY attempt DESC) FILTER (WHERE status IN ('retry', 'failed')))[1] AS last_error \
         FROM event.processing_results WHERE run_id = '' AND event_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(event_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let prior = Prior {
                succeeded: row.succeeded,
                exhausted: row.exhausted,
                failures: row.failures as i32,
                last_error: row.last_error,
            };
            ((row.event_id, row.processor_name), prior)
        })
        .collect())
}

/// The processors whose latest result for this event, in any run, is a failure: what a
/// redrive of its dead letter runs again.
pub async fn still_failed(pool: &PgPool, event_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT processor_name FROM (SELECT DISTINCT ON (processor_name) processor_name, status \
             FROM event.processing_results WHERE event_id = $1 ORDER BY processor_name, result_id DESC) latest \
         WHERE status = 'failed' ORDER BY processor_name",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
}

/// Writes results, status changes and processor counters in one transaction. Returns the
/// events whose status was written; the others are not in PostgreSQL yet.
pub async fn record(
    pool: &PgPool,
    results: &[RunResult],
    changes: &[StatusChange],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let written = record_in(&mut tx, results, changes).await?;
    tx.commit().await?;
    Ok(written)
}

/// [`record`] inside the caller's transaction.
pub async fn record_in(
    tx: &mut Transaction<'_, Postgres>,
    results: &[RunResult],
    changes: &[StatusChange],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    if !results.is_empty() {
        sqlx::query(
            "INSERT INTO event.processing_results \
                 (event_id, processor_id, processor_name, run_id, attempt, status, message, duration_ms, processed_at) \
             SELECT event_id, processor_id, processor_name, run_id, attempt, status, message, duration_ms, processed_at \
             FROM jsonb_to_recordset($1) AS r(event_id uuid, processor_id text, processor_name text, run_id text, \
                  attempt int, status text, message text, duration_ms float8, processed_at timestamptz) \
             ON CONFLICT (event_id, processor_name, run_id, attempt) DO UPDATE SET status = EXCLUDED.status, \
                 message = EXCLUDED.message, duration_ms = EXCLUDED.duration_ms, processed_at = EXCLUDED.processed_at",
        )
        .bind(sqlx::types::Json(results))
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE event.event_processors p SET error_count = p.error_count + c.failures, \
                 last_error = COALESCE(c.last_error, p.last_error), last_processed_at = now() \
             FROM (SELECT * FROM jsonb_to_recordset($1) AS c(processor_id text, failures bigint, last_error text) \
                   ORDER BY processor_id) c \
             WHERE p.processor_id = c.processor_id",
        )
        .bind(sqlx::types::Json(processor_counters(results)))
        .execute(&mut **tx)
        .await?;
    }
    if changes.is_empty() { Ok(HashSet::new()) } else { change_statuses(tx, changes).await }
}

/// Failures and the last error per processor, in processor order so concurrent workers lock
/// the counter rows in one order and never deadlock.
fn processor_counters(results: &[RunResult]) -> Vec<serde_json::Value> {
    let mut counters: BTreeMap<&str, (i64, Option<&str>)> = BTreeMap::new();
    for result in results {
        let entry = counters.entry(result.processor_id.as_str()).or_default();
        if matches!(result.status, ResultStatus::Failed | ResultStatus::Retry) {
            entry.0 += 1;
            entry.1 = result.message.as_deref();
        }
    }
    counters
        .into_iter()
        .map(|(processor_id, (failures, last_error))| {
            json!({"processor_id": processor_id, "failures": failures, "last_error": last_error})
        })
        .collect()
}

/// Moves events to new statuses, then the rollups with them. Returns the events that are
/// stored, moved or not. A change whose event is not in one of its `only_from` statuses (an
/// event nothing takes, already stored `processed`) costs one read and no write. The rollups
/// lock is taken last and only when a count moves, so it is held for one short statement and
/// the commit.
async fn change_statuses(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[StatusChange],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = changes.iter().map(|change| change.event_id).collect();
    let Some(span) = by_id::span(&mut **tx, &ids).await? else { return Ok(HashSet::new()) };
    let current: HashMap<Uuid, EventStatus> = sqlx::query_as::<_, (Uuid, EventStatus)>(
        "SELECT event_id, status FROM event.events WHERE event_id = ANY($1) AND stored_at BETWEEN $2 AND $3",
    )
    .bind(&ids)
    .bind(span.first)
    .bind(span.last)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let mut changes: Vec<&StatusChange> = changes
        .iter()
        .filter(|change| {
            current
                .get(&change.event_id)
                .is_some_and(|status| change.only_from.as_ref().is_none_or(|from| from.contains(status)))
        })
        .collect();
    let found = current.into_keys().collect();
    if changes.is_empty() {
        return Ok(found);
    }
    changes.sort_by_key(|change| change.event_id);
    changes.dedup_by_key(|change| change.event_id);
    #[derive(sqlx::FromRow)]
    struct Moved {
        old_status: EventStatus,
        new_status: EventStatus,
        user_id: Option<String>,
        ms: f64,
    }
    // `only_from` is checked again under the row lock: another worker may have moved it.
    let rows: Vec<Moved> = sqlx::query_as(
        "WITH input AS ( \
             SELECT * FROM jsonb_to_recordset($1) AS i(event_id uuid, status text, processors text[], \
                 error_message text, retry_count int, only_from text[]) \
         ), old AS ( \
             SELECT e.event_id, e.status AS old_status, e.user_id, e.created_at, i.status AS new_status \
             FROM event.events e JOIN input i USING (event_id) \
             WHERE e.stored_at BETWEEN $2 AND $3 AND (i.only_from IS NULL OR e.status = ANY(i.only_from)) \
             ORDER BY e.event_id FOR UPDATE OF e \
         ), moved AS ( \
             UPDATE event.events e SET status = i.status, \
                 processors = COALESCE(i.processors, e.processors), \
                 error_message = CASE WHEN i.status = 'processed' THEN NULL \
                                      ELSE COALESCE(i.error_message, e.error_message) END, \
                 retry_count = COALESCE(i.retry_count, e.retry_count), \
                 processed_at = CASE WHEN i.status IN ('processed', 'failed') THEN now() ELSE e.processed_at END, \
                 updated_at = now() \
             FROM input i, old o WHERE e.event_id = i.event_id AND o.event_id = i.event_id \
                 AND e.stored_at BETWEEN $2 AND $3 \
             RETURNING e.event_id \
         ) \
         SELECT old_status, new_status, user_id, (extract(epoch FROM now() - created_at) * 1000)::float8 AS ms \
         FROM old",
    )
    .bind(sqlx::types::Json(&changes))
    .bind(span.first)
    .bind(span.last)
    .fetch_all(&mut **tx)
    .await?;
    let mut counts = StatusCounts::default();
    for row in &rows {
        counts.moved(row.user_id.as_deref(), row.old_status, row.new_status);
        if row.new_status == EventStatus::Processed && row.old_status != EventStatus::Processed {
            counts.processed(row.user_id.as_deref(), row.ms);
        }
    }
    if !counts.is_empty() {
        rollups::lock_rollups(tx).await?;
        rollups::add_status_counts(tx, &counts).await?;
    }
    Ok(found)
}

/// An event still `pending` or `processing`: what the processor stage's sweep needs to tell
/// whether any processor takes it, and whether the processor consumer has passed it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unsettled {
    pub event_id: Uuid,
    /// Its sequence in EVENTS.
    pub stream_seq: i64,
    pub event_source: String,
    pub event_category: String,
    pub event_type: String,
    pub timestamp: DateTime<Utc>,
}

/// Where a sweep through unsettled events goes on: after this (timestamp, event id).
pub type SweepCursor = (DateTime<Utc>, Uuid);

/// Up to `limit` events `pending` or `processing` that were stored before `stored_before`,
/// after `after` in (timestamp, event id) order.
pub async fn unsettled(
    pool: &PgPool,
    stored_before: DateTime<Utc>,
    after: Option<SweepCursor>,
    limit: i64,
) -> Result<Vec<Unsettled>, sqlx::Error> {
    let (after_time, after_id) = after.unzip();
    sqlx::query_as(
        "SELECT event_id, stream_seq, event_source, event_category, event_type, \"timestamp\" FROM event.events \
         WHERE status IN ('pending', 'processing') AND stored_at < $1 \
           AND ($2::timestamptz IS NULL OR (\"timestamp\", event_id) > ($2, $3)) \
         ORDER BY \"timestamp\", event_id LIMIT $4",
    )
    .bind(stored_before)
    .bind(after_time)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Turns off processors whose endpoint answered 410 Gone, saying why; returns the ones that
/// were on.
pub async fn disable_gone(pool: &PgPool, gone: &[(String, String)]) -> Result<Vec<String>, sqlx::Error> {
    let (ids, reasons): (Vec<&str>, Vec<&str>) = gone.iter().map(|(id, reason)| (id.as_str(), reason.as_str())).unzip();
    sqlx::query_scalar(
        "UPDATE event.event_processors p SET enabled = false, last_error = g.reason, updated_at = now() \
         FROM unnest($1::text[], $2::text[]) AS g(processor_id, reason) \
         WHERE p.processor_id = g.processor_id AND p.enabled RETURNING p.processor_id",
    )
    .bind(&ids)
    .bind(&reasons)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(processor_id: &str, status: ResultStatus, message: &str) -> RunResult {
        RunResult {
            event_id: Uuid::now_v7(),
            processor_id: processor_id.into(),
            processor_name: processor_id.into(),
            run_id: String::new(),
            attempt: 1,
            status,
            message: Some(message.into()),
            duration_ms: 1.0,
            processed_at: Utc::now(),
        }
    }

    #[test]
    fn counters_add_failures_in_processor_order() {
        let counters = processor_counters(&[
            result("b", ResultStatus::Retry, "first"),
            result("a", ResultStatus::Success, "ok"),
            result("b", ResultStatus::Failed, "second"),
        ]);
        assert_eq!(counters[0], json!({"processor_id": "a", "failures": 0, "last_error": null}));
        assert_eq!(counters[1], json!({"processor_id": "b", "failures": 2, "last_error": "second"}));
    }
}
