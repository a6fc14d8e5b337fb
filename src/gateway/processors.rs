//! The processor registry endpoints: register, list, get, toggle, delete.
//!
//! Reads and writes `event.event_processors`; after each change sets the processor
//! consumer's filter ([`crate::stages::interest`]) and tells the workers to reload (core
//! NATS), so they pick it up within a second.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::infra::callback::Guard;
use crate::registry::processors::{self, Processor, RegisterError};
use crate::stages::interest::{self, Idler};

pub async fn register(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Processor>, ApiError> {
    // Whether a URL is reachable is decided at delivery, with the worker's settings; here only
    // what is never right is refused.
    let registration = processors::parse_registration(&body, &Guard::default()).map_err(ApiError::Validation)?;
    let processor = processors::register(&state.pool, registration).await.map_err(|error| match error {
        RegisterError::NameTaken(name) => ApiError::Conflict {
            code: "duplicate_processor_name",
            detail: format!("A processor named {name} already exists; use its processor_id to replace it"),
        },
        RegisterError::Database(error) => ApiError::Database(error),
    })?;
    interest::changed(Idler::Processor, &state.bus, &state.pool).await;
    Ok(Json(processor))
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Processor>>, ApiError> {
    Ok(Json(processors::list(&state.pool).await?))
}

pub async fn get(State(state): State<AppState>, Path(processor_id): Path<String>) -> Result<Json<Processor>, ApiError> {
    processors::get(&state.pool, &processor_id).await?.map(Json).ok_or(ApiError::NotFound("Processor"))
}

#[derive(Deserialize)]
pub struct ToggleParams {
    enabled: Option<String>,
}

#[derive(Serialize)]
pub struct Toggled {
    status: &'static str,
    processor_id: String,
    enabled: bool,
}

pub async fn toggle(
    State(state): State<AppState>,
    Path(processor_id): Path<String>,
    Query(params): Query<ToggleParams>,
) -> Result<Json<Toggled>, ApiError> {
    let enabled = match params.enabled.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("true" | "1") => true,
        Some("false" | "0") => false,
        Some(_) => return Err(ApiError::field("enabled", "must be true or false")),
        None => return Err(ApiError::field("enabled", "is required: ?enabled=true or ?enabled=false")),
    };
    if !processors::set_enabled(&state.pool, &processor_id, enabled).await? {
        return Err(ApiError::NotFound("Processor"));
    }
    interest::changed(Idler::Processor, &state.bus, &state.pool).await;
    Ok(Json(Toggled { status: "updated", processor_id, enabled }))
}

#[derive(Serialize)]
pub struct Deleted {
    status: &'static str,
    processor_id: String,
}

pub async fn delete(
    State(state): State<AppState>,
    Path(processor_id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if !processors::delete(&state.pool, &processor_id).await? {
        return Err(ApiError::NotFound("Processor"));
    }
    interest::changed(Idler::Processor, &state.bus, &state.pool).await;
    Ok(Json(Deleted { status: "deleted", processor_id }))
}
