//! The schema registry endpoints (register a version, list a type's versions, list the newest
//! of every type) and the check every ingest path makes before it publishes ([`AppState::conform`]).
//!
//! Reads and writes `event.event_schemas`; tells gateways and persisters to reload. Guarantees:
//! a version is stored only when it compiles and, unless `compatibility=none`, stays backward
//! compatible with the one before (409 `incompatible_schema` lists why not).

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::domain::{Event, FieldError};
use crate::infra::metrics::Metrics;
use crate::registry;
use crate::registry::schemas::{self, RegisterError, SchemaSet, SchemaVersion, Schemas};

#[derive(Deserialize)]
pub struct RegisterParams {
    /// `backward` (default) or `none`.
    compatibility: Option<String>,
}

pub async fn register(
    State(state): State<AppState>,
    Path(event_type): Path<String>,
    Query(params): Query<RegisterParams>,
    JsonBody(body): JsonBody,
) -> Result<Json<SchemaVersion>, ApiError> {
    let backward = match params.compatibility.as_deref() {
        None | Some("backward") => true,
        Some("none") => false,
        Some(_) => return Err(ApiError::field("compatibility", "must be backward or none")),
    };
    let new = schemas::parse_version(&event_type, &body).map_err(ApiError::Validation)?;
    let stored = schemas::register(&state.pool, &event_type, &new, backward).await.map_err(|error| match error {
        RegisterError::Incompatible(reasons) => ApiError::IncompatibleSchema(reasons),
        RegisterError::Database(error) => ApiError::Database(error),
    })?;
    registry::announce_change::<Schemas>(&state.bus).await;
    // This gateway checks with it from the next request on, whatever the notification does.
    state.schemas.reload().await?;
    Ok(Json(stored))
}

pub async fn versions(State(state): State<AppState>, Path(event_type): Path<String>) -> Result<Json<Value>, ApiError> {
    let versions = schemas::versions(&state.pool, &event_type).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound("Schema"));
    }
    Ok(Json(json!({"event_type": event_type, "versions": versions})))
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"schemas": schemas::newest(&state.pool).await?})))
}

impl AppState {
    /// Checks an event against its type's newest schema, if it has one: refused (mode
    /// `reject`) with the failing paths, or accepted with the version recorded, the errors
    /// recorded (mode `flag`) and the redaction rules applied.
    pub(super) fn conform(&self, event: &mut Event) -> Result<(), Vec<FieldError>> {
        conform_with(&self.schemas.snapshot(), self.bus.metrics(), event)
    }

    /// [`Self::conform`] for every event of an all-or-nothing batch: the errors of all, each
    /// under its index.
    pub(super) fn conform_all(&self, events: &mut [Event]) -> Result<(), ApiError> {
        let (schemas, metrics) = (self.schemas.snapshot(), self.bus.metrics());
        let mut errors = Vec::new();
        for (index, event) in events.iter_mut().enumerate() {
            if let Err(found) = conform_with(&schemas, metrics, event) {
                errors.extend(found.into_iter().map(|error| error.nested(&format!("[{index}]"))));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(ApiError::SchemaViolation(errors)) }
    }
}

/// [`SchemaSet::check`] with the refusal as the answer's field errors.
fn conform_with(schemas: &SchemaSet, metrics: &Metrics, event: &mut Event) -> Result<(), Vec<FieldError>> {
    schemas.check(event, metrics).map_err(|errors| errors.iter().map(|error| error.to_field_error()).collect())
}
