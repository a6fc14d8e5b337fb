//! The HTTP gateway: ingest endpoints that publish to EVENTS, and the query side that reads
//! PostgreSQL. One `router()` assembles the routes: management routes sit behind the API-key
//! check; the public ingest routes (frontend, the tracking API) answer CORS and are rate
//! limited per client; `/health`, the contract and the RudderStack webhook are open.
//!
//! Reads HTTP, PostgreSQL and this gateway's stored-notification subject; writes `events.>`,
//! replay jobs, and the registries' change notifications. Every response carries an
//! `x-request-id` (the caller's, or a new one), and every log line of a request has it.

mod admission;
mod auth;
mod cloudevents;
mod deadletters;
mod error;
mod events;
mod extract;
mod frontend;
mod health;
mod live;
mod observe;
mod processors;
mod projections;
mod public;
mod redrive;
mod replay;
mod rudderstack;
mod schemas;
mod sorted;
mod subscriptions;
mod tracking;
mod waiters;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use axum::{Extension, Router};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub use auth::{ApiKeys, Keys, Scope};
pub use error::ApiError;
pub use frontend::MAX_FRONTEND_BATCH;
pub use public::BadOrigin;
pub use rudderstack::signature_matches;

use crate::domain::Secret;
use crate::infra::bus::{Bus, BusError};
use crate::infra::settings::GatewayArgs;
use crate::infra::telemetry;
use crate::registry::Registry;
use crate::registry::schemas::Schemas;
use crate::wire::subjects;
use extract::BodyLimit;
use public::ClientLimit;
use waiters::StoredWaiters;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    bus: Bus,
    pool: PgPool,
    waiters: Arc<StoredWaiters>,
    keys: Keys,
    write_keys: ApiKeys,
    rudderstack_secret: Option<Secret>,
    store_timeout: Duration,
    max_batch_events: usize,
    max_event_bytes: usize,
    tracking_max_event_bytes: usize,
    admission: admission::Admission,
    /// Snapshot spacing used when a rebuild folds a stream.
    snapshot_every: i64,
    started: Instant,
    live: Arc<live::feed::LiveFeed>,
    /// The schema registry, kept live.
    schemas: Arc<Registry<Schemas>>,
    max_live_tails: usize,
    /// Cancelled at shutdown: ends what would keep a response open (live tails).
    token: CancellationToken,
}

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Cors(#[from] BadOrigin),
    #[error(
        "the gateway would listen on {0} without EVENT_API_KEYS: anyone reaching it could do everything. Set \
         EVENT_API_KEYS, listen on loopback (EVENT_HTTP_ADDR=127.0.0.1:8230), or set \
         EVENT_ALLOW_UNAUTHENTICATED=true to accept that"
    )]
    Unauthenticated(SocketAddr),
    #[error("EVENT_INGEST_KEYS needs EVENT_API_KEYS: with ingest keys alone nobody could manage the service")]
    IngestKeysWithoutAdmin,
    #[error("cannot load the schema registry")]
    Schemas(#[from] sqlx::Error),
}

/// Refuses a configuration that would expose every endpoint to anyone: no admin key on a
/// non-loopback address (unless allowed explicitly), or ingest keys without admin keys.
fn check_keys(keys: &Keys, addr: SocketAddr, allow_unauthenticated: bool) -> Result<(), GatewayError> {
    if keys.ingest.enabled() && !keys.admin.enabled() {
        return Err(GatewayError::IngestKeysWithoutAdmin);
    }
    if !keys.enabled() && !addr.ip().is_loopback() && !allow_unauthenticated {
        return Err(GatewayError::Unauthenticated(addr));
    }
    Ok(())
}

/// A built gateway, ready to serve.
pub struct Gateway {
    app: Router,
}

impl Gateway {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        settings: &GatewayArgs,
        token: CancellationToken,
    ) -> Result<Self, GatewayError> {
        let waiters = StoredWaiters::start(&bus, pool.clone(), token.clone()).await?;
        let keys = Keys { admin: ApiKeys::new(&settings.api_keys), ingest: ApiKeys::new(&settings.ingest_keys) };
        check_keys(&keys, settings.http_addr, settings.allow_unauthenticated)?;
        if !keys.enabled() {
            tracing::warn!("EVENT_API_KEYS is not set: the management endpoints accept anyone");
        }
        let write_keys = ApiKeys::new(&settings.public.write_keys);
        if !write_keys.enabled() {
            tracing::warn!("EVENT_WRITE_KEYS is not set: the tracking API (/v1/*) accepts any write key");
        }
        // An event must fit in one NATS message with room for the headers.
        let max_payload = bus.client().server_info().max_payload;
        let max_event_bytes = max_payload.saturating_sub(4096).min(settings.max_body_bytes).max(1024);
        let admission = admission::Admission::new(settings.max_inflight_events, bus.metrics().inflight_events.clone());
        let live = live::feed::LiveFeed::new(bus.clone(), token.clone());
        let schemas = Registry::load(pool.clone(), Schemas).await?;
        match bus.jetstream().get_stream(subjects::streams::DEADLETTER).await {
            Ok(stream) => bus.metrics().watch_dead_letters(stream),
            Err(error) => tracing::warn!(%error, "cannot read DEADLETTER: event_dead_letters_stored stays empty"),
        }
        tokio::spawn(schemas.clone().watch(bus.clone(), token.clone()));
        let state = AppState {
            bus,
            pool,
            waiters,
            keys,
            write_keys,
            rudderstack_secret: settings.rudderstack_secret.clone().filter(|secret| !secret.is_empty()),
            store_timeout: settings.store_timeout(),
            max_batch_events: usize::from(settings.max_batch_events),
            max_event_bytes,
            tracking_max_event_bytes: settings.public.max_event_bytes.min(max_event_bytes),
            admission,
            snapshot_every: settings.snapshot_every as i64,
            started: Instant::now(),
            live,
            schemas,
            max_live_tails: settings.live_max_tails as usize,
            token: token.clone(),
        };
        let limit = ClientLimit::new(settings.public.rate_limit, token);
        Ok(Self { app: router(state, settings, limit)? })
    }

    /// Serves on `listener` until `token` is cancelled, then drains open requests.
    pub async fn run(self, listener: TcpListener, token: CancellationToken) -> std::io::Result<()> {
        tracing::info!(addr = %listener.local_addr()?, "gateway listening");
        axum::serve(listener, self.app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(token.cancelled_owned())
            .await
    }
}

/// Every route, each with the largest body it reads: management routes behind an admin key,
/// create, batch and CloudEvents behind an ingest (or admin) key; public ingest routes with CORS and the per-client rate limit; `/health` and the
/// contract open. Request bodies may be gzip- or deflate-encoded anywhere.
fn router(state: AppState, settings: &GatewayArgs, limit: ClientLimit) -> Result<Router, BadOrigin> {
    let single = settings.max_body_bytes;
    let batch = settings.max_batch_body_bytes;
    let tracking = (settings.public.max_event_bytes, settings.public.max_batch_bytes);
    let sending = Router::new()
        .route("/api/v1/events/create", limited(post(events::create), single))
        .route("/api/v1/events/batch", limited(post(events::batch), batch))
        .route("/api/v1/events/cloudevents", limited(post(cloudevents::ingest), batch))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_ingest));
    let management = Router::new()
        .route("/api/v1/events/query", limited(post(events::query), single))
        .route("/api/v1/events/statistics", get(events::statistics))
        .route("/api/v1/events/{event_id}", get(events::get_event))
        .route("/api/v1/events/processors", limited(get(processors::list).post(processors::register), single))
        .route("/api/v1/events/processors/{processor_id}", get(processors::get).delete(processors::delete))
        .route("/api/v1/events/processors/{processor_id}/toggle", put(processors::toggle))
        .route("/api/v1/events/replay", limited(post(replay::start), single))
        .route("/api/v1/events/replay/{replay_id}", get(replay::status))
        .route("/api/v1/events/stream/{stream_id}", get(projections::stream))
        .route(
            "/api/v1/events/projections/definitions",
            limited(get(projections::definitions).post(projections::create_definition), single),
        )
        .route("/api/v1/events/projections/definitions/{name}/rebuild", post(projections::rebuild_definition))
        .route("/api/v1/events/projections/{entity_type}/{entity_id}", get(projections::projection))
        .route("/api/v1/events/projections/{entity_type}/{entity_id}/rebuild", post(projections::rebuild))
        .route("/api/v1/events/subscriptions", limited(get(subscriptions::list).post(subscriptions::create), single))
        .route(
            "/api/v1/events/subscriptions/{subscription_id}",
            limited(get(subscriptions::get).patch(subscriptions::update).delete(subscriptions::delete), single),
        )
        .route("/api/v1/events/subscriptions/{subscription_id}/secret", get(subscriptions::secret))
        .route(
            "/api/v1/events/subscriptions/{subscription_id}/secret/rotate",
            limited(post(subscriptions::rotate_secret), single),
        )
        .route("/api/v1/events/subscriptions/{subscription_id}/deliveries", get(subscriptions::deliveries))
        .route(
            "/api/v1/events/subscriptions/{subscription_id}/deliveries/{event_id}/resend",
            post(subscriptions::resend),
        )
        .route("/api/v1/events/subscriptions/{subscription_id}/recover", limited(post(subscriptions::recover), single))
        .route("/api/v1/events/live", get(live::live))
        .route("/api/v1/events/schemas", get(schemas::list))
        .route("/api/v1/events/schemas/{event_type}", limited(get(schemas::versions).put(schemas::register), single))
        .route("/api/v1/events/deadletters", get(deadletters::list).delete(deadletters::purge))
        .route("/api/v1/events/deadletters/redrive", limited(post(deadletters::redrive), single))
        .route("/api/v1/events/deadletters/{seq}", get(deadletters::show).delete(deadletters::delete))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_admin));
    let ingest = Router::new()
        .route("/api/v1/events/frontend", browser(post(frontend::collect), single))
        .route("/api/v1/events/frontend/batch", browser(post(frontend::collect_batch), batch))
        .route("/v1/batch", browser(post(tracking::batch), tracking.1))
        .route("/beacon/v1/batch", browser(post(tracking::batch), tracking.1))
        .route("/v1/{kind}", browser(post(tracking::message), tracking.0))
        .layer(axum::middleware::from_fn_with_state(limit, public::limit))
        .layer(public::cors(&settings.public.cors_origins)?);
    let open = Router::new()
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(observe::metrics))
        .route("/openapi.yaml", get(openapi))
        .route("/api/v1/events/frontend/health", get(frontend::health))
        .route("/webhooks/rudderstack", limited(post(rudderstack::webhook), batch));
    Ok(management
        .merge(sending)
        .merge(ingest)
        .merge(open)
        .fallback(|| async { ApiError::NotFound("Endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(refuse_nul))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe::count))
        .layer(RequestDecompressionLayer::new())
        // Outside the decompression layer, so its bare 415 gets the error shape too.
        .layer(axum::middleware::map_response(error_shape))
        .layer(DefaultBodyLimit::disable())
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .layer(axum::middleware::from_fn(observe::trace))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state))
}

/// Refuses a URL with a NUL character (`%00`) in its path or query: PostgreSQL stores no NUL,
/// so no id or filter holds one, and looking one up would fail in the database instead.
async fn refuse_nul(request: Request, next: Next) -> Result<Response, ApiError> {
    let uri = request.uri();
    let has_nul = |text: &str| text.contains("%00");
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return Err(ApiError::BadRequest("The URL must not contain NUL characters (%00)".to_owned()));
    }
    Ok(next.run(request).await)
}

/// Puts the framework's own 4xx answers (a query string or path parameter axum cannot read,
/// tower-http's bare 415 for a `Content-Encoding` it does not undo) in the `Error` shape, so
/// every client error has a stable `code`.
async fn error_shape(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024).await.unwrap_or_default();
    let mut shaped = framework_error(status, &String::from_utf8_lossy(&text)).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            shaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    shaped
}

/// The error a framework's plain 4xx answer stands for.
fn framework_error(status: StatusCode, text: &str) -> ApiError {
    match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedEncoding,
        status => {
            let detail = if text.trim().is_empty() { status.to_string() } else { text.trim().to_owned() };
            ApiError::BadRequestStatus(status, detail)
        }
    }
}

/// A route that reads at most `bytes` of body (once decoded).
fn limited(route: MethodRouter<AppState>, bytes: usize) -> MethodRouter<AppState> {
    route.layer(Extension(BodyLimit(bytes)))
}

/// A public ingest route: [`limited`], and with an `OPTIONS` route for the CORS layer to answer
/// preflights on (without one, the router's 405 would answer before the layer sees them).
fn browser(route: MethodRouter<AppState>, bytes: usize) -> MethodRouter<AppState> {
    limited(route.options(|| async { axum::http::StatusCode::NO_CONTENT }), bytes)
}

/// The span every log line of a request is in: method, path, request id and trace id; a
/// child of the caller's span.
fn request_span(request: &Request) -> tracing::Span {
    let request_id = request.headers().get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or("");
    let caller = request.extensions().get::<observe::Caller>();
    let trace_id = caller.map(|caller| caller.0.trace_id_hex()).unwrap_or_default();
    let span =
        tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id, trace_id);
    if let Some(caller) = caller {
        telemetry::within(&span, &caller.0);
    }
    span
}

/// "1 event", "3 events": for answer messages.
fn events(count: usize) -> String {
    if count == 1 { "1 event".to_owned() } else { format!("{count} events") }
}

/// The OpenAPI document of this API (`docs/openapi.yaml`, built in).
async fn openapi() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/yaml")], include_str!("../../docs/openapi.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_open_to_anyone_needs_saying_so() {
        let none = Keys::default();
        let admin = Keys { admin: ApiKeys::new(&["root".into()]), ingest: ApiKeys::default() };
        let ingest_only = Keys { admin: ApiKeys::default(), ingest: ApiKeys::new(&["send".into()]) };
        let (local, public) = ("127.0.0.1:8230".parse().unwrap(), "0.0.0.0:8230".parse().unwrap());
        assert!(check_keys(&none, local, false).is_ok());
        assert!(matches!(check_keys(&none, public, false), Err(GatewayError::Unauthenticated(_))));
        assert!(check_keys(&none, public, true).is_ok());
        assert!(check_keys(&admin, public, false).is_ok());
        assert!(matches!(check_keys(&ingest_only, local, false), Err(GatewayError::IngestKeysWithoutAdmin)));
    }

    #[test]
    fn the_frameworks_plain_answers_keep_their_status_and_get_a_code() {
        let query =
            framework_error(StatusCode::BAD_REQUEST, "Failed to deserialize query string: limit: invalid digit\n");
        assert!(matches!(&query, ApiError::BadRequestStatus(StatusCode::BAD_REQUEST, detail)
            if detail == "Failed to deserialize query string: limit: invalid digit"));
        assert!(matches!(framework_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, ""), ApiError::UnsupportedEncoding));
        assert!(matches!(framework_error(StatusCode::URI_TOO_LONG, " "),
            ApiError::BadRequestStatus(StatusCode::URI_TOO_LONG, detail) if detail == "414 URI Too Long"));
    }
}
