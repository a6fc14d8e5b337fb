//! The replay endpoints: start (or preview) a replay, and follow a replay job.
//!
//! Reads `event.events` to count and preview the selection; writes the job row and the job
//! message on `jobs.replay` (see [`crate::stages::replayer`]).

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::stages::replayer::{self, SubmitError};
use crate::store::replay_jobs::{self, Job};

#[derive(Serialize)]
pub struct Started {
    status: &'static str,
    replay_id: Uuid,
    message: String,
    dry_run: bool,
    events_count: i64,
    /// Dry run only: a page of the selected event ids, in stream order.
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids: Option<Vec<Uuid>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
}

pub async fn start(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Started>, ApiError> {
    let request = replayer::parse_request(&body).map_err(ApiError::Validation)?;
    if let Some(names) = &request.processors {
        let unknown = replay_jobs::unknown_processors(&state.pool, names).await?;
        if !unknown.is_empty() {
            return Err(ApiError::field("processors", format!("names unknown processors: {}", unknown.join(", "))));
        }
    }
    let (events_count, until_seq) = replay_jobs::measure(&state.pool, &request.selector).await?;
    if request.dry_run {
        let event_ids = replay_jobs::preview(&state.pool, &request.selector, request.limit, request.offset).await?;
        let replay_id = Uuid::now_v7();
        replayer::announce_started(&state.bus, replay_id, &request, events_count).await;
        return Ok(Json(Started {
            status: "replay_started",
            replay_id,
            message: format!(
                "Dry run: {} would be replayed; nothing was changed",
                super::events(events_count as usize)
            ),
            dry_run: true,
            events_count,
            event_ids: Some(event_ids),
            limit: Some(request.limit),
            offset: Some(request.offset),
        }));
    }
    let replay_id = replayer::submit(&state.pool, &state.bus, &request, events_count, until_seq).await.map_err(
        |error| match error {
            SubmitError::Database(error) => ApiError::Database(error),
            SubmitError::Bus(error) => ApiError::Bus(error),
        },
    )?;
    Ok(Json(Started {
        status: "replay_started",
        replay_id,
        message: format!(
            "Replaying {} in the background; follow it at /api/v1/events/replay/{replay_id}",
            super::events(events_count as usize)
        ),
        dry_run: false,
        events_count,
        event_ids: None,
        limit: None,
        offset: None,
    }))
}

#[derive(Serialize)]
pub struct JobView {
    #[serde(flatten)]
    job: Job,
    dry_run: bool,
    progress: f64,
}

pub async fn status(State(state): State<AppState>, Path(replay_id): Path<String>) -> Result<Json<JobView>, ApiError> {
    let replay_id = Uuid::parse_str(&replay_id).map_err(|_| ApiError::NotFound("Replay"))?;
    let job = replay_jobs::get(&state.pool, replay_id).await?.ok_or(ApiError::NotFound("Replay"))?;
    let progress = job.progress();
    Ok(Json(JobView { job, dry_run: false, progress }))
}
