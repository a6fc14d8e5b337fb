//! What the public ingest endpoints (frontend, the tracking API) add for browsers and the open
//! internet: CORS from an allow-list, and a per-client-address rate limit.
//!
//! Reads the request's origin and peer address; writes CORS headers and 429 answers.
//! Guarantees: only routes given these layers answer CORS (management endpoints never do); a
//! client over its limit gets 429 with `Retry-After`, and the limiter's memory is bounded by the
//! addresses seen recently.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::error::ApiError;

/// Why the CORS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("EVENT_CORS_ORIGINS holds {0:?}, which is not an origin (like https://shop.example.com) or *")]
pub struct BadOrigin(String);

/// CORS for the public ingest endpoints: `*`, or the listed origins.
pub fn cors(origins: &[String]) -> Result<CorsLayer, BadOrigin> {
    let origins: Vec<&str> = origins.iter().map(|origin| origin.trim()).filter(|origin| !origin.is_empty()).collect();
    let allow = if origins.is_empty() || origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let parsed: Result<Vec<HeaderValue>, BadOrigin> = origins
            .iter()
            .map(|origin| {
                let valid = origin.starts_with("http://") || origin.starts_with("https://");
                HeaderValue::from_str(origin).ok().filter(|_| valid).ok_or_else(|| BadOrigin((*origin).to_owned()))
            })
            .collect();
        AllowOrigin::list(parsed?)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
        // SDKs send Authorization (Basic write keys) and Content-Type; mirror what is asked.
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(600)))
}

/// Requests per second per client address, when limited.
#[derive(Clone, Default)]
pub struct ClientLimit {
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl ClientLimit {
    /// `per_second` requests a second (and bursts as large) per address; 0: no limit. The
    /// limiter forgets idle addresses every minute until `token` is cancelled.
    pub fn new(per_second: u32, token: CancellationToken) -> Self {
        let Some(rate) = NonZeroU32::new(per_second) else { return Self::default() };
        let limiter = Arc::new(RateLimiter::keyed(Quota::per_second(rate)));
        let held = Arc::clone(&limiter);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = every.tick() => {
                        held.retain_recent();
                        held.shrink_to_fit();
                    }
                }
            }
        });
        Self { limiter: Some(limiter) }
    }

    /// How long `address` must wait, or `None` when it may go now.
    pub fn wait(&self, address: IpAddr) -> Option<Duration> {
        let limiter = self.limiter.as_ref()?;
        limiter.check_key(&address).err().map(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The rate-limit middleware of the public ingest routes (by peer address: a proxy in front
/// should limit by its own means).
pub async fn limit(
    State(limit): State<ClientLimit>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.method() != Method::OPTIONS
        && let Some(wait) = limit.wait(peer.ip())
    {
        return Err(ApiError::RateLimited { retry_after: wait });
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_at_start() {
        assert!(cors(&["*".into()]).is_ok());
        assert!(cors(&[]).is_ok());
        assert!(cors(&["https://shop.example.com".into(), " http://localhost:3000".into()]).is_ok());
        assert!(cors(&["shop.example.com".into()]).is_err());
    }

    #[tokio::test]
    async fn a_client_over_its_rate_waits_and_others_do_not() {
        let limit = ClientLimit::new(2, CancellationToken::new());
        let (one, two): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!((limit.wait(one), limit.wait(one)), (None, None));
        let wait = limit.wait(one).expect("third request in a second waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(limit.wait(two), None);
        assert_eq!(ClientLimit::default().wait(one), None);
    }
}
