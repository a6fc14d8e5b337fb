//! Projections: folding entity streams into state. Definitions, reducers, the fold itself,
//! and the reads and writes of `event.event_projections`, `event.projection_snapshots` and
//! `event.projection_definitions`.
//!
//! Guarantees: applying is idempotent (each projection keeps the last stream version folded in
//! and only folds what comes after it); every N applied events a snapshot is kept, so the state
//! at a version or a time is folded from the nearest snapshot, not from the start; reads fold
//! whatever the projector has not applied yet, so they always match the stored stream.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::ingest::{FieldError, Fields};
use crate::processors::type_matches;

/// The projection every stream has.
pub const DEFAULT_NAME: &str = "default";

/// How a projection folds an event into its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reducer {
    /// The event's `data` as a JSON merge patch (RFC 7386).
    Merge,
    /// `state[event_type] = data`.
    ByType,
    /// `state[event_type] += 1`.
    Counter,
}

impl Reducer {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "merge" => Some(Reducer::Merge),
            "by_type" => Some(Reducer::ByType),
            "counter" => Some(Reducer::Counter),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reducer::Merge => "merge",
            Reducer::ByType => "by_type",
            Reducer::Counter => "counter",
        }
    }

    fn apply(self, state: &mut Value, event: &StreamEvent) {
        match self {
            Reducer::Merge => merge_patch(state, &event.data),
            Reducer::ByType => {
                if !state.is_object() {
                    *state = Value::Object(Map::new());
                }
                if let Value::Object(map) = state {
                    map.insert(event.event_type.clone(), event.data.clone());
                }
            }
            Reducer::Counter => {
                if !state.is_object() {
                    *state = Value::Object(Map::new());
                }
                if let Value::Object(map) = state {
                    let count = map.get(&event.event_type).and_then(Value::as_i64).unwrap_or(0);
                    map.insert(event.event_type.clone(), json!(count + 1));
                }
            }
        }
    }
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A projection definition. `default` (every stream, `*`, merge) is created by the migration.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Definition {
    pub name: String,
    pub entity_type: String,
    pub event_types: Option<Vec<String>>,
    pub reducer: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

impl Definition {
    pub fn covers(&self, entity_type: &str) -> bool {
        self.entity_type == "*" || self.entity_type == entity_type
    }

    fn takes(&self, event: &StreamEvent) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|types| types.iter().any(|pattern| type_matches(pattern, &event.event_type)))
    }

    fn reducer(&self) -> Reducer {
        Reducer::parse(&self.reducer).unwrap_or(Reducer::Merge)
    }
}

/// A validated `POST /api/v1/events/projections/definitions`.
#[derive(Debug, Clone)]
pub struct NewDefinition {
    pub name: String,
    pub entity_type: String,
    pub event_types: Option<Vec<String>>,
    pub reducer: Reducer,
}

/// Validates `POST /api/v1/events/projections/definitions`.
pub fn parse_definition(body: &Value) -> Result<NewDefinition, Vec<FieldError>> {
    let Some(map) = body.as_object() else {
        return Err(vec![FieldError::new("body", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let valid_name =
        |text: &str| !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    let name = fields.string("name", 100);
    match &name {
        None if !fields.present("name") => fields.fail("name", "is required"),
        Some(name) if !valid_name(name) => fields.fail("name", "must be 1 to 100 letters, digits, '_' or '-'"),
        _ => {}
    }
    let entity_type = fields.string("entity_type", 255);
    match &entity_type {
        None if !fields.present("entity_type") => fields.fail("entity_type", "is required"),
        Some(kind) if kind.is_empty() || kind.contains(':') => {
            fields.fail("entity_type", "must be non-empty, without ':'")
        }
        _ => {}
    }
    let event_types = match fields.get("event_types") {
        None => None,
        Some(Value::Array(items)) if !items.is_empty() => {
            let patterns: Option<Vec<String>> = items.iter().map(|item| item.as_str().map(str::to_owned)).collect();
            if patterns.is_none() {
                fields.fail("event_types", "must be a list of event types or patterns");
            }
            patterns
        }
        Some(_) => {
            fields.fail("event_types", "must be a non-empty list of event types or patterns (or absent for all)");
            None
        }
    };
    let reducer = match fields.get("reducer") {
        None => Reducer::Merge,
        Some(value) => match value.as_str().and_then(Reducer::parse) {
            Some(reducer) => reducer,
            None => {
                fields.fail("reducer", "must be one of: merge, by_type, counter");
                Reducer::Merge
            }
        },
    };
    match (name, entity_type) {
        (Some(name), Some(entity_type)) if errors.is_empty() => {
            Ok(NewDefinition { name, entity_type, event_types, reducer })
        }
        _ => Err(errors),
    }
}

/// Stores a new definition (catching up); `None` when the name is taken.
pub async fn create_definition(pool: &PgPool, new: &NewDefinition) -> Result<Option<Definition>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO event.projection_definitions (name, entity_type, event_types, reducer) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING RETURNING name, entity_type, event_types, reducer, status, created_at",
    )
    .bind(&new.name)
    .bind(&new.entity_type)
    .bind(&new.event_types)
    .bind(new.reducer.as_str())
    .fetch_optional(pool)
    .await
}

/// Every definition, `default` first.
pub async fn definitions(pool: &PgPool) -> Result<Vec<Definition>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, entity_type, event_types, reducer, status, created_at FROM event.projection_definitions \
         ORDER BY name <> 'default', created_at, name",
    )
    .fetch_all(pool)
    .await
}

pub async fn definition(pool: &PgPool, name: &str) -> Result<Option<Definition>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, entity_type, event_types, reducer, status, created_at FROM event.projection_definitions \
         WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
}

/// Marks a definition for a rebuild: its projections and snapshots go, the projector folds
/// the history again. False when there is no such definition.
pub async fn reset_definition(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query(
        "UPDATE event.projection_definitions SET status = 'catching_up', updated_at = now() WHERE name = $1",
    )
    .bind(name)
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

pub async fn mark_live(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE event.projection_definitions SET status = 'live', updated_at = now() WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(())
}

/// A stored projection.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Projection {
    pub projection_id: Uuid,
    pub projection_name: String,
    pub entity_type: String,
    pub entity_id: String,
    pub state: Value,
    pub version: i64,
    #[serde(skip)]
    pub stream_version: i64,
    pub last_event_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a fold needs of a stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StreamEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub data: Value,
    pub stream_id: String,
    pub stream_version: i64,
    pub timestamp: DateTime<Utc>,
}

/// `{entity_type}:{entity_id}` split at the first colon.
pub fn split_stream_id(stream_id: &str) -> Option<(&str, &str)> {
    stream_id.split_once(':').filter(|(kind, id)| !kind.is_empty() && !id.is_empty())
}

/// A projection being folded, and the snapshots taken on the way.
#[derive(Debug, Clone)]
pub struct Fold {
    pub projection: Projection,
    pub max_timestamp: DateTime<Utc>,
    pub snapshots: Vec<Snapshot>,
    pub created: bool,
    pub changed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub projection_name: String,
    pub entity_type: String,
    pub entity_id: String,
    pub version: i64,
    pub stream_version: i64,
    pub state: Value,
    pub last_event_id: Option<Uuid>,
    pub max_timestamp: DateTime<Utc>,
}

impl Fold {
    /// Starts from a stored projection, or from nothing.
    pub fn start(definition: &Definition, entity_type: &str, entity_id: &str, stored: Option<Projection>) -> Self {
        let created = stored.is_none();
        let now = Utc::now();
        let projection = stored.unwrap_or_else(|| Projection {
            projection_id: Uuid::now_v7(),
            projection_name: definition.name.clone(),
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            state: Value::Object(Map::new()),
            version: 0,
            stream_version: 0,
            last_event_id: None,
            created_at: now,
            updated_at: now,
        });
        Self { projection, max_timestamp: DateTime::<Utc>::UNIX_EPOCH, snapshots: Vec::new(), created, changed: false }
    }

    /// Folds the events after the watermark, in stream order; a snapshot every
    /// `snapshot_every` applied events.
    pub fn apply<'a>(
        &mut self,
        definition: &Definition,
        events: impl IntoIterator<Item = &'a StreamEvent>,
        snapshot_every: i64,
    ) {
        let reducer = definition.reducer();
        for event in events {
            if event.stream_version <= self.projection.stream_version {
                continue;
            }
            self.projection.stream_version = event.stream_version;
            self.changed = true;
            if !definition.takes(event) {
                continue;
            }
            reducer.apply(&mut self.projection.state, event);
            self.projection.version += 1;
            self.projection.last_event_id = Some(event.event_id);
            self.max_timestamp = self.max_timestamp.max(event.timestamp);
            if snapshot_every > 0 && self.projection.version % snapshot_every == 0 {
                self.snapshots.push(Snapshot {
                    projection_name: self.projection.projection_name.clone(),
                    entity_type: self.projection.entity_type.clone(),
                    entity_id: self.projection.entity_id.clone(),
                    version: self.projection.version,
                    stream_version: self.projection.stream_version,
                    state: self.projection.state.clone(),
                    last_event_id: self.projection.last_event_id,
                    max_timestamp: self.max_timestamp,
                });
            }
        }
    }
}

const PROJECTION_COLUMNS: &str = "projection_id, projection_name, entity_type, entity_id, state, version, stream_version, \
                                  last_event_id, created_at, updated_at";
const STREAM_EVENT_COLUMNS: &str = "event_id, event_type, data, stream_id, stream_version, \"timestamp\"";

/// Stored projections of these streams, keyed by (name, stream id). Not locked: folds that
/// race (the live projector, a catch-up, a rebuild) each fold a correct prefix, and [`save`]
/// keeps the longest.
pub async fn stored_projections(
    tx: &mut Transaction<'_, Postgres>,
    stream_ids: &[String],
) -> Result<HashMap<(String, String), Projection>, sqlx::Error> {
    let (entity_types, entity_ids): (Vec<&str>, Vec<&str>) =
        stream_ids.iter().filter_map(|stream_id| split_stream_id(stream_id)).unzip();
    let rows: Vec<Projection> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PROJECTION_COLUMNS} FROM event.event_projections \
         WHERE (entity_type, entity_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    )))
    .bind(entity_types)
    .bind(entity_ids)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|p| ((p.projection_name.clone(), format!("{}:{}", p.entity_type, p.entity_id)), p))
        .collect())
}

/// Events of each stream after its watermark, in stream order.
pub async fn events_after(
    executor: impl sqlx::PgExecutor<'_>,
    watermarks: &[(String, i64)],
) -> Result<Vec<StreamEvent>, sqlx::Error> {
    let (ids, after): (Vec<String>, Vec<i64>) = watermarks.iter().cloned().unzip();
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

/// Writes folded projections and their snapshots. A row only moves forward: a fold that
/// lost a race to a newer one changes nothing.
pub async fn save(tx: &mut Transaction<'_, Postgres>, folds: &[&Fold]) -> Result<(), sqlx::Error> {
    let rows: Vec<&Projection> = folds.iter().filter(|fold| fold.changed).map(|fold| &fold.projection).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut ids, mut names, mut types, mut entities) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut states, mut versions, mut stream_versions, mut last_ids) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for projection in rows {
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
    let snapshots: Vec<&Snapshot> = folds.iter().flat_map(|fold| &fold.snapshots).collect();
    if !snapshots.is_empty() {
        sqlx::query(
            "INSERT INTO event.projection_snapshots (projection_name, entity_type, entity_id, version, stream_version, \
                 state, last_event_id, max_timestamp) \
             SELECT * FROM jsonb_to_recordset($1) AS s(projection_name text, entity_type text, entity_id text, \
                  version bigint, stream_version bigint, state jsonb, last_event_id uuid, max_timestamp timestamptz) \
             ON CONFLICT DO NOTHING",
        )
        .bind(sqlx::types::Json(&snapshots))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Folds one stream for the given definitions in one transaction (catch-up and rebuild).
/// Returns the projections that were created.
pub async fn fold_stream(
    pool: &PgPool,
    stream_id: &str,
    definitions: &[Definition],
    snapshot_every: i64,
) -> Result<Vec<Projection>, sqlx::Error> {
    let Some((entity_type, entity_id)) = split_stream_id(stream_id) else { return Ok(Vec::new()) };
    let definitions: Vec<&Definition> = definitions.iter().filter(|d| d.covers(entity_type)).collect();
    let mut tx = pool.begin().await?;
    let mut stored = stored_projections(&mut tx, &[stream_id.to_owned()]).await?;
    let mut folds: Vec<(Fold, &Definition)> = definitions
        .iter()
        .map(|definition| {
            let existing = stored.remove(&(definition.name.clone(), stream_id.to_owned()));
            (Fold::start(definition, entity_type, entity_id, existing), *definition)
        })
        .collect();
    let from = folds.iter().map(|(fold, _)| fold.projection.stream_version).min().unwrap_or(0);
    let events = events_after(&mut *tx, &[(stream_id.to_owned(), from)]).await?;
    for (fold, definition) in &mut folds {
        fold.apply(definition, &events, snapshot_every);
    }
    let refs: Vec<&Fold> = folds.iter().map(|(fold, _)| fold).collect();
    save(&mut tx, &refs).await?;
    tx.commit().await?;
    Ok(folds.into_iter().filter(|(fold, _)| fold.created && fold.changed).map(|(fold, _)| fold.projection).collect())
}

/// What a read answers: the projection, and for time travel where it was folded from.
#[derive(Debug, Clone, Serialize)]
pub struct Read {
    #[serde(flatten)]
    pub projection: Projection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_read: Option<i64>,
}

/// Where to stop when reading the past.
#[derive(Debug, Clone, Copy)]
pub enum AsOf {
    Now,
    Version(i64),
    Time(DateTime<Utc>),
}

/// The projection of one entity, as of now (stored row plus anything not applied yet) or as
/// of a version or a time (from the nearest snapshot). `None` when the entity has no events
/// the projection takes.
pub async fn read(
    pool: &PgPool,
    definition: &Definition,
    entity_type: &str,
    entity_id: &str,
    as_of: AsOf,
) -> Result<Option<Read>, sqlx::Error> {
    let stream_id = format!("{entity_type}:{entity_id}");
    let (start, snapshot_version) = match as_of {
        AsOf::Now => {
            let stored: Option<Projection> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {PROJECTION_COLUMNS} FROM event.event_projections \
                 WHERE projection_name = $1 AND entity_type = $2 AND entity_id = $3"
            )))
            .bind(&definition.name)
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(pool)
            .await?;
            (Fold::start(definition, entity_type, entity_id, stored), None)
        }
        AsOf::Version(_) | AsOf::Time(_) => {
            let (by_version, by_time) = match as_of {
                AsOf::Version(version) => (Some(version), None),
                AsOf::Time(time) => (None, Some(time)),
                AsOf::Now => (None, None),
            };
            #[derive(sqlx::FromRow)]
            struct Row {
                version: i64,
                stream_version: i64,
                state: Value,
                last_event_id: Option<Uuid>,
                max_timestamp: DateTime<Utc>,
            }
            let snapshot: Option<Row> = sqlx::query_as(
                "SELECT version, stream_version, state, last_event_id, max_timestamp FROM event.projection_snapshots \
                 WHERE projection_name = $1 AND entity_type = $2 AND entity_id = $3 \
                   AND ($4::bigint IS NULL OR version <= $4) AND ($5::timestamptz IS NULL OR max_timestamp <= $5) \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(&definition.name)
            .bind(entity_type)
            .bind(entity_id)
            .bind(by_version)
            .bind(by_time)
            .fetch_optional(pool)
            .await?;
            let mut fold = Fold::start(definition, entity_type, entity_id, None);
            let snapshot_version = snapshot.as_ref().map(|s| s.version);
            if let Some(row) = snapshot {
                fold.projection.version = row.version;
                fold.projection.stream_version = row.stream_version;
                fold.projection.state = row.state;
                fold.projection.last_event_id = row.last_event_id;
                fold.max_timestamp = row.max_timestamp;
                fold.changed = true;
            }
            (fold, snapshot_version)
        }
    };
    let mut fold = start;
    let mut events_read = 0i64;
    let mut after = fold.projection.stream_version;
    loop {
        let page: Vec<StreamEvent> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {STREAM_EVENT_COLUMNS} FROM event.events WHERE stream_id = $1 AND stream_version > $2 \
             AND ($3::timestamptz IS NULL OR \"timestamp\" <= $3) ORDER BY stream_version LIMIT 1000"
        )))
        .bind(&stream_id)
        .bind(after)
        .bind(match as_of {
            AsOf::Time(time) => Some(time),
            _ => None,
        })
        .fetch_all(pool)
        .await?;
        let Some(last) = page.last() else { break };
        after = last.stream_version;
        for event in &page {
            if let AsOf::Version(limit) = as_of
                && fold.projection.version >= limit
            {
                break;
            }
            events_read += 1;
            fold.apply(definition, std::iter::once(event), 0);
        }
        if matches!(as_of, AsOf::Version(limit) if fold.projection.version >= limit) || page.len() < 1000 {
            break;
        }
    }
    if fold.projection.version == 0 {
        return Ok(None);
    }
    let time_travel = !matches!(as_of, AsOf::Now);
    Ok(Some(Read {
        projection: fold.projection,
        snapshot_version: if time_travel { Some(snapshot_version.unwrap_or(0)) } else { None },
        events_read: time_travel.then_some(events_read),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut state = json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": 1});
        merge_patch(&mut state, &json!({"a": "z", "c": {"f": null, "h": [1]}, "new": {"x": 1}}));
        assert_eq!(state, json!({"a": "z", "c": {"d": "e", "h": [1]}, "keep": 1, "new": {"x": 1}}));
        merge_patch(&mut state, &json!({"c": null}));
        assert!(state.get("c").is_none());
    }
}
