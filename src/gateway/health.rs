//! `GET /health`: "healthy" while the process serves, with the state of each dependency.
//! Reads the NATS connection state and asks PostgreSQL `SELECT 1`; writes nothing.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::AppState;

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

#[derive(Serialize)]
pub struct Dependencies {
    nats: Dependency,
    postgres: Dependency,
}

#[derive(Serialize)]
pub struct Dependency {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
}

pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let nats =
        Dependency { status: if state.bus.is_connected() { "connected" } else { "disconnected" }, latency_ms: None };
    let started = Instant::now();
    let ping = tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(&state.pool)).await;
    let postgres = match ping {
        Ok(Ok(_)) => Dependency { status: "connected", latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0) },
        _ => Dependency { status: "unavailable", latency_ms: None },
    };
    Json(Health {
        status: "healthy",
        service: "event_service",
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        auth_required: state.api_keys.enabled(),
        dependencies: Dependencies { nats, postgres },
        timestamp: Utc::now(),
    })
}
