//! Health: `GET /health` (the process serves, with the state of each dependency),
//! `GET /health/live` (the process runs) and `GET /health/ready` (503 while NATS or
//! PostgreSQL is unreachable, naming which) for load balancers and Kubernetes probes.
//!
//! Reads the NATS connection state and asks PostgreSQL `SELECT 1`; writes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;
use crate::infra::probe::{self, Dependencies, Probe};

#[derive(Serialize)]
pub struct Health {
    status: &'static str,
    service: &'static str,
    version: &'static str,
    uptime_seconds: u64,
    auth_required: bool,
    dependencies: Dependencies,
    timestamp: DateTime<Utc>,
}

pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "healthy",
        service: "event_service",
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        auth_required: state.keys.enabled(),
        dependencies: Dependencies::check(&state.bus, &state.pool).await,
        timestamp: Utc::now(),
    })
}

/// The process runs (and answers): nothing else is checked.
pub async fn live() -> Json<Probe> {
    probe::live()
}

/// Ready to take traffic: NATS connected and PostgreSQL answering.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Probe>) {
    probe::readiness(Dependencies::check(&state.bus, &state.pool).await)
}
