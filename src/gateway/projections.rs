//! Entity streams and projections: read a stream, read a projection (now, at a version or at
//! a time), rebuild one, and manage projection definitions.
//!
//! Reads `event.events`, `event.event_streams` and the projection tables; rebuilding writes
//! projections. Reads fold whatever the projector has not applied yet, so an answer always
//! matches the stored stream.

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::domain::StreamId;
use crate::domain::parse::parse_timestamp;
use crate::registry;
use crate::registry::definitions::{self, DEFAULT_NAME, Definition, Definitions};
use crate::stages::projector::read::{self, AsOf, Read, ReadError};
use crate::store::events::{self, StoredEvent};
use crate::store::projections;

#[derive(Deserialize)]
pub struct StreamParams {
    from_version: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
pub struct StreamView {
    stream_id: String,
    stream_type: String,
    entity_type: String,
    entity_id: String,
    events: Vec<StoredEvent>,
    version: i64,
    first_version: i64,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

pub async fn stream(
    State(state): State<AppState>,
    Path(stream_id): Path<String>,
    Query(params): Query<StreamParams>,
) -> Result<Json<StreamView>, ApiError> {
    let Some(stream) = StreamId::parse(&stream_id) else {
        return Err(ApiError::field("stream_id", "must be {entity_type}:{entity_id}"));
    };
    let Some((entity_type, entity_id)) = stream.parts() else {
        return Err(ApiError::field("stream_id", "must be {entity_type}:{entity_id}"));
    };
    let from_version = params.from_version.unwrap_or(1);
    let limit = params.limit.unwrap_or(1000);
    if from_version < 1 {
        return Err(ApiError::field("from_version", "must be an integer ≥ 1"));
    }
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::field("limit", "must be an integer from 1 to 10000"));
    }
    let head = events::stream_head(&state.pool, &stream).await?;
    let events = events::stream_events(&state.pool, &stream, from_version, limit).await?;
    let (stream_type, version, first_version, created_at, updated_at) = match head {
        Some(head) => {
            (head.stream_type, head.version, head.first_version, Some(head.created_at), Some(head.updated_at))
        }
        None => (entity_type.to_owned(), 0, 1, None, None),
    };
    Ok(Json(StreamView {
        stream_id: stream_id.clone(),
        stream_type,
        entity_type: entity_type.to_owned(),
        entity_id: entity_id.to_owned(),
        events,
        version,
        first_version,
        created_at,
        updated_at,
    }))
}

#[derive(Deserialize)]
pub struct ProjectionParams {
    name: Option<String>,
    as_of_version: Option<String>,
    as_of: Option<String>,
}

async fn find_definition(state: &AppState, name: Option<&str>) -> Result<Definition, ApiError> {
    let name = name.unwrap_or(DEFAULT_NAME);
    definitions::get(&state.pool, name).await?.ok_or(ApiError::NotFound("Projection definition"))
}

pub async fn projection(
    State(state): State<AppState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(params): Query<ProjectionParams>,
) -> Result<Json<Read>, ApiError> {
    let as_of = match (params.as_of_version.as_deref(), params.as_of.as_deref()) {
        (Some(_), Some(_)) => return Err(ApiError::field("as_of", "give as_of_version or as_of, not both")),
        (Some(version), None) => match version.parse::<i64>() {
            Ok(version) if version >= 1 => AsOf::Version(version),
            _ => return Err(ApiError::field("as_of_version", "must be an integer ≥ 1")),
        },
        (None, Some(time)) => match parse_timestamp(time) {
            Some(time) => AsOf::Time(time),
            None => return Err(ApiError::field("as_of", "must be an ISO 8601 / RFC 3339 timestamp")),
        },
        (None, None) => AsOf::Now,
    };
    let definition = find_definition(&state, params.name.as_deref()).await?;
    if !definition.covers(&entity_type) {
        return Err(ApiError::NotFound("Projection"));
    }
    read::read(&state.pool, &definition, &entity_type, &entity_id, as_of)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("Projection"))
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Db(error) => error.into(),
            ReadError::HistoryExpired { first_version } => ApiError::Gone {
                code: "history_expired",
                detail: format!(
                    "The events before version {first_version} of this stream have left the store \
                     (EVENT_RETENTION_DAYS) and no snapshot covers them"
                ),
            },
        }
    }
}

/// Refuses a rebuild that would fold a stream whose early events have left the store: it
/// would silently give a different state than the one kept.
fn refuse_expired(found: Option<(String, i64)>) -> Result<(), ApiError> {
    match found {
        Some((stream_id, first_version)) => Err(ApiError::Conflict {
            code: "history_expired",
            detail: format!(
                "The events of {stream_id} before version {first_version} have left the store \
                 (EVENT_RETENTION_DAYS); a rebuild would fold only the rest. The kept projections stay as they are"
            ),
        }),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
pub struct RebuildParams {
    name: Option<String>,
}

/// Rebuilds an entity's projections (all of them, or `?name=`) from its stream, now.
pub async fn rebuild(
    State(state): State<AppState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(params): Query<RebuildParams>,
) -> Result<Json<Value>, ApiError> {
    let definitions: Vec<Definition> = match params.name.as_deref() {
        Some(name) => vec![find_definition(&state, Some(name)).await?],
        None => definitions::list(&state.pool).await?,
    };
    let definitions: Vec<Definition> = definitions.into_iter().filter(|d| d.covers(&entity_type)).collect();
    let names: Vec<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
    let stream_id = StreamId::of(&entity_type, &entity_id);
    let first_version = projections::first_version(&state.pool, &stream_id).await?;
    refuse_expired((first_version > 1).then(|| (stream_id.to_string(), first_version)))?;
    projections::delete_entity(&state.pool, &entity_type, &entity_id, &names).await?;
    read::fold_stream(&state.pool, &stream_id, &definitions, state.snapshot_every).await?;
    let mut rebuilt = Vec::new();
    for definition in &definitions {
        if let Some(read) = read::read(&state.pool, definition, &entity_type, &entity_id, AsOf::Now).await? {
            rebuilt.push(read);
        }
    }
    Ok(Json(json!({"status": "rebuilt", "stream_id": stream_id, "projections": rebuilt})))
}

pub async fn create_definition(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Definition>, ApiError> {
    let new = definitions::parse_definition(&body).map_err(ApiError::Validation)?;
    let created = definitions::create(&state.pool, &new).await?.ok_or_else(|| ApiError::Conflict {
        code: "duplicate_projection_name",
        detail: format!("A projection definition named {} already exists", new.name),
    })?;
    registry::announce_change::<Definitions>(&state.bus).await;
    Ok(Json(created))
}

pub async fn definitions(State(state): State<AppState>) -> Result<Json<Vec<Definition>>, ApiError> {
    Ok(Json(definitions::list(&state.pool).await?))
}

/// Drops a definition's projections; the projector folds the history again.
pub async fn rebuild_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let definition = find_definition(&state, Some(&name)).await?;
    refuse_expired(projections::stream_with_expired_history(&state.pool, &definition.entity_type).await?)?;
    if !projections::reset_definition(&state.pool, &name).await? {
        return Err(ApiError::NotFound("Projection definition"));
    }
    Ok(Json(json!({"status": "rebuilding", "name": name})))
}
