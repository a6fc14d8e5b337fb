//! What the gateway observes about every request: its trace context (the caller's
//! `traceparent`, or a new trace), requests and their duration by route template, method and
//! status, and the `/metrics` scrape itself.
//!
//! Reads the request's trace headers and the matched route (never the raw path:
//! `/api/v1/events/{event_id}` is one series); writes the process's metrics. Guarantees:
//! every request has a trace context its handler can take ([`TraceContext`] is an
//! extractor); label values are bounded: the route is a template of the router or
//! `unmatched`, the method one of the standard ones or `other`.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::infra::metrics::{HttpLabels, RouteLabels};
use crate::infra::{ops, telemetry};
use crate::wire::TraceContext;
use crate::wire::trace::{TRACEPARENT, TRACESTATE};

/// The trace context of whoever sent the request: the caller's, or a new trace.
#[derive(Clone)]
pub struct Caller(pub TraceContext);

/// Gives the request its [`Caller`] context (before the request span is made, which takes it
/// as its parent).
pub async fn trace(mut request: Request, next: Next) -> Response {
    let caller = caller_trace(request.headers()).unwrap_or_else(TraceContext::root);
    request.extensions_mut().insert(Caller(caller));
    next.run(request).await
}

/// The caller's trace context, when its `traceparent` is valid.
fn caller_trace(headers: &HeaderMap) -> Option<TraceContext> {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    TraceContext::parse(header(TRACEPARENT)?, header(TRACESTATE))
}

/// A handler's trace context: the request's span, within the caller's trace. What the
/// handler publishes carries it.
impl<S: Send + Sync> FromRequestParts<S> for TraceContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let caller = parts.extensions.get::<Caller>().map_or_else(TraceContext::root, |caller| caller.0.clone());
        Ok(telemetry::in_current_span(&caller))
    }
}

/// Counts and times one request.
pub async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method()).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = state.bus.metrics();
    let labels = RouteLabels { route, method };
    metrics.http_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    let RouteLabels { route, method } = labels;
    metrics.http_requests.get_or_create(&HttpLabels { route, method, status: response.status().as_u16() }).inc();
    response
}

/// `GET /metrics`: every metric of this process (all stages, in the all-in-one binary).
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ops::scrape(&state.bus).await
}

/// The method as a label: the standard ones by name, anything else as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"PROPFIND").unwrap()), "other");
    }
}
