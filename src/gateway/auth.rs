//! API keys for the management and ingest endpoints: `Authorization: Bearer <key>`, with two
//! scopes. Admin keys (`EVENT_API_KEYS`) may do everything; ingest keys (`EVENT_INGEST_KEYS`)
//! may only send events (create, batch, CloudEvents, the tracking API).
//!
//! Reads the `Authorization` header; writes nothing. Keys are kept as SHA-256 digests and
//! compared in constant time, every key each time.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::domain::Secret;

/// A set of keys; empty means this set lets nobody in.
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

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Send events.
    Ingest,
    /// Everything.
    Admin,
}

/// The keys of both scopes. With no admin key, authentication is off (the gateway refuses to
/// start that way on a non-loopback address unless told to).
#[derive(Clone, Default)]
pub struct Keys {
    pub admin: ApiKeys,
    pub ingest: ApiKeys,
}

impl Keys {
    pub fn enabled(&self) -> bool {
        self.admin.enabled()
    }

    /// The scope of a presented key; `None` when it is no key of ours. Both sets are always
    /// checked, so the time taken does not tell which one matched.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let (admin, ingest) = (self.admin.accepts(presented), self.ingest.accepts(presented));
        match (admin, ingest) {
            (true, _) => Some(Scope::Admin),
            (false, true) => Some(Scope::Ingest),
            (false, false) => None,
        }
    }

    /// Whether `presented` (the bearer key, if any) may do what `needed` allows.
    pub fn authorize(&self, presented: Option<&str>, needed: Scope) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        match presented.and_then(|key| self.scope_of(key)) {
            None => Err(ApiError::Unauthorized),
            Some(scope) if scope >= needed => Ok(()),
            Some(_) => Err(ApiError::Forbidden),
        }
    }
}

/// The bearer key of a request.
fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
}

/// Management routes: an admin key.
pub async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    state.keys.authorize(bearer(&request), Scope::Admin)?;
    Ok(next.run(request).await)
}

/// Event ingest routes (create, batch, CloudEvents): an ingest or an admin key.
pub async fn require_ingest(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    state.keys.authorize(bearer(&request), Scope::Ingest)?;
    Ok(next.run(request).await)
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

    #[test]
    fn scopes() {
        let keys = Keys { admin: ApiKeys::new(&["root".into()]), ingest: ApiKeys::new(&["send".into()]) };
        assert!(keys.authorize(Some("root"), Scope::Admin).is_ok());
        assert!(keys.authorize(Some("root"), Scope::Ingest).is_ok());
        assert!(keys.authorize(Some("send"), Scope::Ingest).is_ok());
        assert!(matches!(keys.authorize(Some("send"), Scope::Admin), Err(ApiError::Forbidden)));
        assert!(matches!(keys.authorize(Some("nope"), Scope::Ingest), Err(ApiError::Unauthorized)));
        assert!(matches!(keys.authorize(None, Scope::Ingest), Err(ApiError::Unauthorized)));
        assert!(Keys::default().authorize(None, Scope::Admin).is_ok());
    }
}
