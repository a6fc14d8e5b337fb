//! API-key authentication for the management endpoints: `Authorization: Bearer <key>`.
//!
//! Reads the `Authorization` header; writes nothing. Keys are kept as SHA-256 digests and
//! compared in constant time.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::domain::Secret;

/// The configured keys; empty means authentication is off.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(keys: &[Secret]) -> Self {
        let digests = keys.iter().map(|key| key.expose().trim()).filter(|key| !key.is_empty()).map(digest).collect();
        Self { digests }
    }

    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        // Check every key, so the time taken does not tell which one matched.
        self.digests.iter().fold(false, |found, key| found | bool::from(key.ct_eq(&presented)))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.api_keys.enabled() {
        return Ok(next.run(request).await);
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    match presented {
        Some(key) if state.api_keys.accepts(key) => Ok(next.run(request).await),
        _ => Err(ApiError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let keys = ApiKeys::new(&["one".into(), " two ".into(), "".into()]);
        assert!(keys.enabled());
        assert!(keys.accepts("one") && keys.accepts("two"));
        assert!(!keys.accepts("three") && !keys.accepts(""));
        assert!(!ApiKeys::new(&[]).enabled());
    }
}
