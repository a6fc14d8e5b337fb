//! Stored projections and their snapshots, and the reads of entity streams that folds need.
//!
//! Reads `event.events`; reads and writes `event.event_projections`,
//! `event.projection_snapshots` and the status of `event.projection_definitions`.
//! Guarantees: [`save`] only moves a projection forward (a fold that lost a race to a newer
//! one changes nothing), so concurrent folds (the live projector, a catch-up, a rebuild) are
//! safe without row locks.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{DefinitionStatus, StreamId};

/// A stored projection.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Projection {
    pub projection_id: Uuid,
    pub projection_name: String,
    pub entity_type: String,
    pub entity_id: String,
    pub state: Value,
    pub version: i64,
    /// The last stream version folded (taken by this projection or not).
    #[serde(skip)]
    pub stream_version: i64,
    pub last_event_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A projection's state at one of its versions.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Snapshot {
    pub projection_name: String,
    pub entity_type: String,
    pub entity_id: String,
    pub version: i64,
    pub stream_version: i64,
    pub state: Value,
    pub last_event_id: Option<Uuid>,
    /// The latest event time folded into it (time travel picks snapshots by it).
    pub max_timestamp: DateTime<Utc>,
}

/// What a fold needs of a stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StreamEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub data: Value,
    pub stream_id: StreamId,
    pub stream_version: i64,
    pub timestamp: DateTime<Utc>,
}

const PROJECTION_COLUMNS: &str = "projection_id, projection_name, entity_type, entity_id, state, version, stream_version, \
                                  last_event_id, created_at, updated_at";
const STREAM_EVENT_COLUMNS: &str = "event_id, event_type, data, stream_id, stream_version, \"timestamp\"";

/// Stored projections of these streams, keyed by (name, stream id). Not locked: see [`save`].
pub async fn stored_projections(
    tx: &mut Transaction<'_, Postgres>,
    stream_ids: &[&StreamId],
) -> Result<HashMap<(String, StreamId), Projection>, sqlx::Error> {
    let (entity_types, entity_ids): (Vec<&str>, Vec<&str>) =
        stream_ids.iter().filter_map(|stream_id| stream_id.parts()).unzip();
    let rows: Vec<Projection> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECTION_COLUMNS} FROM event.event_projections \
         WHERE (entity_type, entity_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    )))
    .bind(entity_types)
    .bind(entity_ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|p| ((p.projection_name.clone(), StreamId::of(&p.entity_type, &p.entity_id)), p)).collect())
}

/// One projection as stored, if it is.
pub async fn stored_projection(
    pool: &PgPool,
    name: &str,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<Projection>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECTION_COLUMNS} FROM event.event_projections \
         WHERE projection_name = $1 AND entity_type = $2 AND entity_id = $3"
    )))
    .bind(name)
    .bind(entity_type)
    .bind(entity_id)
    .fetch_optional(pool)
    .await
}

/// Events of each stream after its watermark, in stream order.
pub async fn events_after(
    executor: impl sqlx::PgExecutor<'_>,
    watermarks: &[(&StreamId, i64)],
) -> Result<Vec<StreamEvent>, sqlx::Error> {
    let (ids, after): (Vec<&str>, Vec<i64>) = watermarks.iter().map(|(id, after)| (id.as_str(), *after)).unzip();
    // LATERAL: one index range per stream, however many streams. A plain join lets the planner
    // pick a scan of the whole table once a batch touches many streams.
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT e.* FROM unnest($1::text[], $2::bigint[]) AS w(stream_id, after) \
         CROSS JOIN LATERAL (SELECT {STREAM_EVENT_COLUMNS} FROM event.events \
             WHERE stream_id = w.stream_id AND stream_version > w.after) e \
         ORDER BY e.stream_id, e.stream_version"
    )))
    .bind(ids)
    .bind(after)
    .fetch_all(executor)
    .await
}

/// Up to `limit` events of a stream after `after`, in version order, none later than `until`.
pub async fn stream_page(
    pool: &PgPool,
    stream_id: &StreamId,
    after: i64,
    until: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<StreamEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {STREAM_EVENT_COLUMNS} FROM event.events WHERE stream_id = $1 AND stream_version > $2 \
         AND ($3::timestamptz IS NULL OR \"timestamp\" <= $3) ORDER BY stream_version LIMIT $4"
    )))
    .bind(stream_id)
    .bind(after)
    .bind(until)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A stream's oldest retained version (1 when it has lost nothing, or is unknown).
pub async fn first_version(executor: impl sqlx::PgExecutor<'_>, stream_id: &StreamId) -> Result<i64, sqlx::Error> {
    Ok(first_versions(executor, &[stream_id]).await?.get(stream_id).copied().unwrap_or(1))
}

/// The streams among `stream_ids` that have lost early events, with their oldest retained
/// version (a stream missing here starts at 1).
pub async fn first_versions(
    executor: impl sqlx::PgExecutor<'_>,
    stream_ids: &[&StreamId],
) -> Result<HashMap<StreamId, i64>, sqlx::Error> {
    let ids: Vec<&str> = stream_ids.iter().map(|stream_id| stream_id.as_str()).collect();
    let rows: Vec<(StreamId, i64)> = sqlx::query_as(
        "SELECT stream_id, first_version FROM event.event_streams WHERE stream_id = ANY($1) AND first_version > 1",
    )
    .bind(ids)
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().collect())
}

/// A stream of the entity type (`*`: any) whose early events have left the store, with its
/// oldest retained version.
pub async fn stream_with_expired_history(
    pool: &PgPool,
    entity_type: &str,
) -> Result<Option<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stream_id, first_version FROM event.event_streams \
         WHERE first_version > 1 AND ($1 = '*' OR entity_type = $1) LIMIT 1",
    )
    .bind(entity_type)
    .fetch_optional(pool)
    .await
}

/// The newest snapshot at or before a version, or whose events are all at or before a time.
pub async fn snapshot_before(
    pool: &PgPool,
    name: &str,
    entity_type: &str,
    entity_id: &str,
    version: Option<i64>,
    time: Option<DateTime<Utc>>,
) -> Result<Option<Snapshot>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection_name, entity_type, entity_id, version, stream_version, state, last_event_id, max_timestamp \
         FROM event.projection_snapshots \
         WHERE projection_name = $1 AND entity_type = $2 AND entity_id = $3 \
           AND ($4::bigint IS NULL OR version <= $4) AND ($5::timestamptz IS NULL OR max_timestamp <= $5) \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(name)
    .bind(entity_type)
    .bind(entity_id)
    .bind(version)
    .bind(time)
    .fetch_optional(pool)
    .await
}

/// Writes folded projections and their snapshots. A row only moves forward: a fold that
/// lost a race to a newer one changes nothing.
pub async fn save(
    tx: &mut Transaction<'_, Postgres>,
    projections: &[&Projection],
    snapshots: &[&Snapshot],
) -> Result<(), sqlx::Error> {
    if projections.is_empty() {
        return Ok(());
    }
    let n = projections.len();
    let (mut ids, mut names, mut types, mut entities) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut states, mut versions, mut stream_versions, mut last_ids) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for projection in projections {
        ids.push(projection.projection_id);
        names.push(projection.projection_name.as_str());
        types.push(projection.entity_type.as_str());
        entities.push(projection.entity_id.as_str());
        states.push(&projection.state);
        versions.push(projection.version);
        stream_versions.push(projection.stream_version);
        last_ids.push(projection.last_event_id);
    }
    // created_at and updated_at are PostgreSQL's clock, one instant for a new row.
    sqlx::query(
        "INSERT INTO event.event_projections (projection_id, projection_name, entity_type, entity_id, state, version, \
             stream_version, last_event_id) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bigint[], \
             $7::bigint[], $8::uuid[]) \
         ON CONFLICT (projection_name, entity_type, entity_id) DO UPDATE SET state = EXCLUDED.state, \
             version = EXCLUDED.version, stream_version = EXCLUDED.stream_version, \
             last_event_id = EXCLUDED.last_event_id, updated_at = now() \
         WHERE event.event_projections.stream_version < EXCLUDED.stream_version",
    )
    .bind(ids)
    .bind(names)
    .bind(types)
    .bind(entities)
    .bind(states)
    .bind(versions)
    .bind(stream_versions)
    .bind(last_ids)
    .execute(&mut **tx)
    .await?;
    if !snapshots.is_empty() {
        sqlx::query(
            "INSERT INTO event.projection_snapshots (projection_name, entity_type, entity_id, version, stream_version, \
                 state, last_event_id, max_timestamp) \
             SELECT * FROM jsonb_to_recordset($1) AS s(projection_name text, entity_type text, entity_id text, \
                  version bigint, stream_version bigint, state jsonb, last_event_id uuid, max_timestamp timestamptz) \
             ON CONFLICT DO NOTHING",
        )
        .bind(sqlx::types::Json(snapshots))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Drops an entity's projections (of the named definitions) and their snapshots, for a
/// rebuild.
pub async fn delete_entity(
    pool: &PgPool,
    entity_type: &str,
    entity_id: &str,
    names: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH gone AS (DELETE FROM event.projection_snapshots \
                       WHERE entity_type = $1 AND entity_id = $2 AND projection_name = ANY($3)) \
         DELETE FROM event.event_projections WHERE entity_type = $1 AND entity_id = $2 AND projection_name = ANY($3)",
    )
    .bind(entity_type)
    .bind(entity_id)
    .bind(names)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks a definition for a rebuild: its projections and snapshots go, the projector folds
/// the history again. False when there is no such definition.
pub async fn reset_definition(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query("UPDATE event.projection_definitions SET status = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(DefinitionStatus::CatchingUp)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if found {
        sqlx::query("DELETE FROM event.event_projections WHERE projection_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM event.projection_snapshots WHERE projection_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(found)
}

/// A definition has caught up on the history.
pub async fn mark_live(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE event.projection_definitions SET status = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(DefinitionStatus::Live)
        .execute(pool)
        .await?;
    Ok(())
}

/// A page of streams (of one entity type, or all for `*`) after `after`, in id order.
pub async fn streams_after(
    pool: &PgPool,
    entity_type: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<StreamId>, sqlx::Error> {
    // The stream's entity type, compared exactly: a LIKE prefix would let `_` in
    // `order_item` match `order-item` streams too.
    sqlx::query_scalar(
        "SELECT stream_id FROM event.event_streams WHERE ($1 = '*' OR entity_type = $1) AND stream_id > $2 \
         ORDER BY stream_id LIMIT $3",
    )
    .bind(entity_type)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}
