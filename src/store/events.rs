//! Reads of stored events: by id, by ids, by EVENTS sequence, an entity stream's events, and
//! which of a set of ids are stored.
//!
//! Reads `event.events` (by id only inside the ids' partitions, [`by_id`], or by a range of
//! EVENTS sequences), `event.event_ids` and `event.event_streams`; writes nothing.
//! Guarantees: a row whose source, category or status the code does not know is an error,
//! never a default.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::by_id;
use super::write::STORED_AMONG;
use crate::domain::{Event, EventCategory, EventSource, EventStatus, StreamId};

/// A stored event, every column, as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_source: EventSource,
    pub event_category: EventCategory,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub organization_id: Option<String>,
    pub device_id: Option<String>,
    pub correlation_id: Option<String>,
    pub data: Value,
    pub metadata: Value,
    pub context: Value,
    pub properties: Value,
    pub status: EventStatus,
    pub processors: Vec<String>,
    pub retry_count: i32,
    pub error_message: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    pub stream_id: Option<StreamId>,
    pub stream_version: Option<i64>,
    pub stream_seq: i64,
    pub subject: String,
    pub timestamp: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub stored_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl StoredEvent {
    /// The event as it travels on `events.>` (what processors and subscribers receive).
    pub fn to_event(&self) -> Event {
        let object = |value: &Value| value.as_object().cloned().unwrap_or_default();
        Event {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            event_source: self.event_source,
            event_category: self.event_category,
            user_id: self.user_id.clone(),
            session_id: self.session_id.clone(),
            organization_id: self.organization_id.clone(),
            device_id: self.device_id.clone(),
            correlation_id: self.correlation_id.clone(),
            data: object(&self.data),
            metadata: object(&self.metadata),
            context: object(&self.context),
            properties: object(&self.properties),
            stream_id: self.stream_id.clone(),
            timestamp: self.timestamp,
            created_at: self.created_at,
        }
    }
}

/// Every column of [`StoredEvent`], for `SELECT`s.
pub const EVENT_COLUMNS: &str = "event_id, event_type, event_source, event_category, user_id, session_id, \
    organization_id, device_id, correlation_id, data, metadata, context, properties, status, processors, \
    retry_count, error_message, processed_at, stream_id, stream_version, stream_seq, subject, \"timestamp\", \
    created_at, stored_at, updated_at";

pub async fn get_event(pool: &PgPool, event_id: Uuid) -> Result<Option<StoredEvent>, sqlx::Error> {
    // The subquery's value prunes the partitions at execution: one index probe, not one per day.
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM event.events WHERE event_id = $1 \
         AND stored_at = (SELECT stored_at FROM event.event_ids WHERE event_id = $1)"
    )))
    .bind(event_id)
    .fetch_optional(pool)
    .await
}

/// The stored events among `ids`, oldest (in stream order) first.
pub async fn events_by_ids(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let Some(span) = by_id::span(pool, ids).await? else { return Ok(Vec::new()) };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM event.events JOIN (SELECT DISTINCT unnest($1::uuid[])) AS i(event_id) USING (event_id) \
         WHERE stored_at BETWEEN $2 AND $3 ORDER BY stream_seq"
    )))
    .bind(ids)
    .bind(span.first)
    .bind(span.last)
    .fetch_all(pool)
    .await
}

/// Stored events whose EVENTS sequence is in `(after, up_to]`, in that order, at most
/// `limit` of them (what the persister publishes again to STORED after a crash).
pub async fn events_in_sequence(
    pool: &PgPool,
    after: u64,
    up_to: u64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM event.events WHERE stream_seq > $1 AND stream_seq <= $2 \
         ORDER BY stream_seq LIMIT $3"
    )))
    .bind(after as i64)
    .bind(up_to as i64)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The ids among `ids` that are stored.
pub async fn stored_ids(pool: &PgPool, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let found: Vec<Uuid> = sqlx::query_scalar(STORED_AMONG).bind(ids).fetch_all(pool).await?;
    Ok(found.into_iter().collect())
}

/// Where a stored event sits: its entity stream and version, and the EVENTS message it was
/// stored from.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredPosition {
    pub event_id: Uuid,
    pub stream_id: Option<StreamId>,
    pub stream_version: Option<i64>,
    pub stream_seq: i64,
}

/// The stored events among `ids`, by id. `seqs` are the EVENTS sequences the caller read
/// them from: when they lie close together, as a live batch's do, one range read of the
/// sequence index finds them (a probe per partition, against two probes per id by id); what
/// it misses (an event stored from another message, or not stored yet) is read by id.
pub async fn stored_positions(
    pool: &PgPool,
    ids: &[Uuid],
    seqs: &[u64],
) -> Result<HashMap<Uuid, StoredPosition>, sqlx::Error> {
    let mut found = HashMap::with_capacity(ids.len());
    if let Some((first, last)) = dense_range(seqs) {
        let wanted: HashSet<&Uuid> = ids.iter().collect();
        let rows: Vec<StoredPosition> = sqlx::query_as(
            "SELECT event_id, stream_id, stream_version, stream_seq FROM event.events \
             WHERE stream_seq BETWEEN $1 AND $2",
        )
        .bind(first as i64)
        .bind(last as i64)
        .fetch_all(pool)
        .await?;
        found.extend(rows.into_iter().filter(|row| wanted.contains(&row.event_id)).map(|row| (row.event_id, row)));
    }
    let missing: Vec<Uuid> = ids.iter().filter(|id| !found.contains_key(*id)).copied().collect();
    let Some(span) = by_id::span(pool, &missing).await? else { return Ok(found) };
    let rows: Vec<StoredPosition> = sqlx::query_as(
        "SELECT event_id, stream_id, stream_version, stream_seq FROM event.events \
         WHERE event_id = ANY($1) AND stored_at BETWEEN $2 AND $3",
    )
    .bind(&missing)
    .bind(span.first)
    .bind(span.last)
    .fetch_all(pool)
    .await?;
    found.extend(rows.into_iter().map(|row| (row.event_id, row)));
    Ok(found)
}

/// The span of `seqs` when a range read of it is worth it: it holds few sequences besides
/// these (a live batch is nearly contiguous; a batch with an old redelivery in it is not).
fn dense_range(seqs: &[u64]) -> Option<(u64, u64)> {
    let (first, last) = (*seqs.iter().min()?, *seqs.iter().max()?);
    let span = last - first + 1;
    (span <= 2 * seqs.len() as u64 + 64).then_some((first, last))
}

/// An entity stream's row: its type, version (events in it) and when it began and last grew.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StreamHead {
    pub stream_type: String,
    pub version: i64,
    /// The oldest version still stored: the ones before it have left (retention).
    pub first_version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn stream_head(pool: &PgPool, stream_id: &StreamId) -> Result<Option<StreamHead>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stream_type, version, first_version, created_at, updated_at FROM event.event_streams \
         WHERE stream_id = $1",
    )
    .bind(stream_id)
    .fetch_optional(pool)
    .await
}

/// A stream's events from `from_version` on, in version order, at most `limit`.
pub async fn stream_events(
    pool: &PgPool,
    stream_id: &StreamId,
    from_version: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM event.events WHERE stream_id = $1 AND stream_version >= $2 \
         ORDER BY stream_version LIMIT $3"
    )))
    .bind(stream_id)
    .bind(from_version)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::dense_range;

    #[test]
    fn a_range_is_read_only_when_the_sequences_are_close_together() {
        assert_eq!(dense_range(&[]), None);
        assert_eq!(dense_range(&[7]), Some((7, 7)));
        assert_eq!(dense_range(&[12, 10, 11]), Some((10, 12)));
        let live: Vec<u64> = (1_000..2_000).filter(|seq| seq % 3 != 0).collect();
        assert_eq!(dense_range(&live), Some((1_000, 1_999)), "other stages' events in between");
        assert_eq!(dense_range(&[5, 1_000_000]), None, "an old redelivery among new messages");
    }
}
