//! Whether this process can do its work: NATS connected and PostgreSQL answering, and the
//! probes' answers (`/health/live`, `/health/ready`) the gateway and the worker stages' ops
//! server give.
//!
//! Reads the NATS connection state and runs `SELECT 1` (at most 1 s); writes nothing.

use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::bus::Bus;

/// The state of the dependencies, as a probe sees them.
#[derive(Debug, Clone, Serialize)]
pub struct Dependencies {
    pub nats: Dependency,
    pub postgres: Dependency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dependency {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

impl Dependencies {
    /// Checks both now.
    pub async fn check(bus: &Bus, pool: &PgPool) -> Self {
        let nats =
            Dependency { status: if bus.is_connected() { "connected" } else { "disconnected" }, latency_ms: None };
        let started = Instant::now();
        let ping = tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(pool)).await;
        let postgres = match ping {
            Ok(Ok(_)) => Dependency { status: "connected", latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0) },
            _ => Dependency { status: "unavailable", latency_ms: None },
        };
        Self { nats, postgres }
    }

    /// The dependencies that are not reachable, by name; empty when ready.
    pub fn unavailable(&self) -> Vec<&'static str> {
        let mut down = Vec::new();
        if self.nats.status != "connected" {
            down.push("nats");
        }
        if self.postgres.status != "connected" {
            down.push("postgres");
        }
        down
    }
}

/// A probe's answer.
#[derive(Serialize)]
pub struct Probe {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dependencies: Option<Dependencies>,
    timestamp: DateTime<Utc>,
}

/// The process runs (and answers): nothing else is checked.
pub fn live() -> Json<Probe> {
    Json(Probe { status: "live", code: None, detail: None, dependencies: None, timestamp: Utc::now() })
}

/// The readiness answer for the state of the dependencies.
pub fn readiness(dependencies: Dependencies) -> (StatusCode, Json<Probe>) {
    let down = dependencies.unavailable();
    let (status, code, detail) = match down.as_slice() {
        [] => (StatusCode::OK, None, None),
        down => (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready"), Some(format!("unavailable: {}", down.join(", ")))),
    };
    let probe = Probe {
        status: if status.is_success() { "ready" } else { "not_ready" },
        code,
        detail,
        dependencies: Some(dependencies),
        timestamp: Utc::now(),
    };
    (status, Json(probe))
}
