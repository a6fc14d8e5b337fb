//! The HTTP gateway: ingest endpoints that publish to EVENTS, and the query side that reads
//! PostgreSQL. One `router()` assembles the routes; management routes sit behind the API-key
//! check, `/health`, the frontend endpoints and the RudderStack webhook are public.
//!
//! Reads HTTP, PostgreSQL and this gateway's stored-notification subject; writes `events.>`,
//! replay jobs, and the registries' change notifications. Every response carries an
//! `x-request-id` (the caller's, or a new one), and every log line of a request has it.

mod auth;
mod error;
mod events;
mod extract;
mod frontend;
mod health;
mod processors;
mod projections;
mod replay;
mod rudderstack;
mod subscriptions;
mod waiters;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{get, post, put};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub use auth::ApiKeys;
pub use error::ApiError;
pub use frontend::MAX_FRONTEND_BATCH;
pub use rudderstack::signature_matches;

use crate::domain::Secret;
use crate::infra::bus::{Bus, BusError};
use crate::infra::settings::GatewayArgs;
use waiters::StoredWaiters;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    bus: Bus,
    pool: PgPool,
    waiters: Arc<StoredWaiters>,
    api_keys: ApiKeys,
    rudderstack_secret: Option<Secret>,
    store_timeout: Duration,
    max_batch_events: usize,
    max_event_bytes: usize,
    /// Snapshot spacing used when a rebuild folds a stream.
    snapshot_every: i64,
    started: Instant,
}

/// A built gateway, ready to serve.
pub struct Gateway {
    state: AppState,
    settings: GatewayArgs,
}

impl Gateway {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        settings: &GatewayArgs,
        token: CancellationToken,
    ) -> Result<Self, BusError> {
        let waiters = StoredWaiters::start(&bus, token).await?;
        let api_keys = ApiKeys::new(&settings.api_keys);
        if !api_keys.enabled() {
            tracing::warn!("EVENT_API_KEYS is not set: the management endpoints accept anyone");
        }
        // An event must fit in one NATS message with room for the headers.
        let max_payload = bus.client().server_info().max_payload;
        let max_event_bytes = max_payload.saturating_sub(4096).min(settings.max_body_bytes).max(1024);
        let state = AppState {
            bus,
            pool,
            waiters,
            api_keys,
            rudderstack_secret: settings.rudderstack_secret.clone().filter(|secret| !secret.is_empty()),
            store_timeout: settings.store_timeout(),
            max_batch_events: usize::from(settings.max_batch_events),
            max_event_bytes,
            snapshot_every: settings.snapshot_every as i64,
            started: Instant::now(),
        };
        Ok(Self { state, settings: settings.clone() })
    }

    /// Serves on `listener` until `token` is cancelled, then drains open requests.
    pub async fn run(self, listener: TcpListener, token: CancellationToken) -> std::io::Result<()> {
        let app = router(self.state, &self.settings);
        tracing::info!(addr = %listener.local_addr()?, "gateway listening");
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(token.cancelled_owned())
            .await
    }
}

pub fn router(state: AppState, settings: &GatewayArgs) -> Router {
    let single = DefaultBodyLimit::max(settings.max_body_bytes);
    let batch = DefaultBodyLimit::max(settings.max_batch_body_bytes);
    let management = Router::new()
        .route("/api/v1/events/create", post(events::create).layer(single))
        .route("/api/v1/events/batch", post(events::batch).layer(batch))
        .route("/api/v1/events/query", post(events::query).layer(single))
        .route("/api/v1/events/statistics", get(events::statistics))
        .route("/api/v1/events/{event_id}", get(events::get_event))
        .route("/api/v1/events/processors", get(processors::list).post(processors::register).layer(single))
        .route("/api/v1/events/processors/{processor_id}", get(processors::get).delete(processors::delete))
        .route("/api/v1/events/processors/{processor_id}/toggle", put(processors::toggle))
        .route("/api/v1/events/replay", post(replay::start).layer(single))
        .route("/api/v1/events/replay/{replay_id}", get(replay::status))
        .route("/api/v1/events/stream/{stream_id}", get(projections::stream))
        .route(
            "/api/v1/events/projections/definitions",
            get(projections::definitions).post(projections::create_definition).layer(single),
        )
        .route("/api/v1/events/projections/definitions/{name}/rebuild", post(projections::rebuild_definition))
        .route("/api/v1/events/projections/{entity_type}/{entity_id}", get(projections::projection))
        .route("/api/v1/events/projections/{entity_type}/{entity_id}/rebuild", post(projections::rebuild))
        .route("/api/v1/events/subscriptions", get(subscriptions::list).post(subscriptions::create).layer(single))
        .route(
            "/api/v1/events/subscriptions/{subscription_id}",
            get(subscriptions::get).patch(subscriptions::update).delete(subscriptions::delete).layer(single),
        )
        .route("/api/v1/events/subscriptions/{subscription_id}/secret", get(subscriptions::secret))
        .route("/api/v1/events/subscriptions/{subscription_id}/deliveries", get(subscriptions::deliveries))
        .route(
            "/api/v1/events/subscriptions/{subscription_id}/deliveries/{event_id}/resend",
            post(subscriptions::resend),
        )
        .route("/api/v1/events/subscriptions/{subscription_id}/recover", post(subscriptions::recover).layer(single))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_api_key));
    let public = Router::new()
        .route("/health", get(health::health))
        .route("/openapi.yaml", get(openapi))
        .route("/api/v1/events/frontend", post(frontend::collect).layer(single))
        .route("/api/v1/events/frontend/batch", post(frontend::collect_batch).layer(batch))
        .route("/api/v1/events/frontend/health", get(frontend::health))
        .route("/webhooks/rudderstack", post(rudderstack::webhook).layer(batch));
    management
        .merge(public)
        .fallback(|| async { ApiError::NotFound("Endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// The span every log line of a request is in: method, path and request id.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request.headers().get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or("");
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
}

/// "1 event", "3 events": for answer messages.
fn events(count: usize) -> String {
    if count == 1 { "1 event".to_owned() } else { format!("{count} events") }
}

/// The OpenAPI document of this API (`docs/openapi.yaml`, built in).
async fn openapi() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/yaml")], include_str!("../../docs/openapi.yaml"))
}
