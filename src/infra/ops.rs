//! The worker stages' ops server: `/metrics`, `/health/live` and `/health/ready` on
//! `EVENT_METRICS_ADDR` (the gateway serves the same on its own HTTP port).
//!
//! Reads the process's [`Metrics`](super::metrics::Metrics) and the dependencies' state;
//! writes nothing. Guarantees: it answers as long as the process runs, whatever the stage is
//! doing, and stops with the shutdown token.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::bus::Bus;
use super::metrics::CONTENT_TYPE;
use super::probe::{self, Dependencies, Probe};

#[derive(Clone)]
struct Ops {
    bus: Bus,
    pool: PgPool,
}

/// Binds `addr` (start-up fails loudly when it cannot) and serves until `token` is cancelled.
pub async fn start(addr: SocketAddr, bus: Bus, pool: PgPool, token: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics and probes listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { probe::live() }))
        .route("/health/ready", get(ready))
        .with_state(Ops { bus, pool });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await {
            tracing::error!(error = %error, "the metrics server failed");
        }
    });
    Ok(())
}

/// The Prometheus text of this process's metrics.
async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    scrape(&ops.bus).await
}

/// A scrape answer: every metric of the process `bus` belongs to.
pub async fn scrape(bus: &Bus) -> impl IntoResponse + use<> {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], bus.metrics().scrape().await)
}

async fn ready(State(ops): State<Ops>) -> (StatusCode, Json<Probe>) {
    probe::readiness(Dependencies::check(&ops.bus, &ops.pool).await)
}
