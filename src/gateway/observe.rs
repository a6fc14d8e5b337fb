//! What the gateway counts about every request: requests and their duration by route
//! template, method and status, and the `/metrics` scrape itself.
//!
//! Reads the matched route (never the raw path: `/api/v1/events/{event_id}` is one series);
//! writes the process's metrics. Guarantees: label values are bounded: the route is a
//! template of the router or `unmatched`, the method one of the standard ones or `other`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::infra::metrics::{HttpLabels, RouteLabels};
use crate::infra::ops;

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
