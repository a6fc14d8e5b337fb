//! Request bodies as clients really send them: size-limited (after `Content-Encoding` is
//! undone, so a gzip bomb stops at the limit), parsed as JSON whatever the `Content-Type` says
//! (`navigator.sendBeacon` posts `text/plain`), and answered in the service's error shape:
//! malformed JSON or an empty body is a 422, an oversized body a 413, never axum's plain text.
//!
//! Reads request bodies; writes nothing. Guarantees: at most the route's [`BodyLimit`] is held
//! in memory; an oversized body is read on and discarded (up to [`DRAIN_BYTES`] or
//! [`DRAIN_FOR`]) before the 413 goes out, so a client still sending sees the answer instead of
//! a connection reset.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use bytes::BytesMut;
use futures::StreamExt;
use serde_json::Value;

use super::error::ApiError;

/// The largest body a route reads, as a request extension (set per route in the router).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// When a route sets no limit.
const DEFAULT_LIMIT: usize = 1024 * 1024;
/// Most bytes of an oversized body read and thrown away before answering 413.
pub const DRAIN_BYTES: usize = 64 * 1024 * 1024;
/// Longest time spent reading an oversized body before answering 413.
pub const DRAIN_FOR: Duration = Duration::from_secs(10);

/// The raw body, size-limited, after any `Content-Encoding` was undone.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = request.extensions().get::<BodyLimit>().map_or(DEFAULT_LIMIT, |limit| limit.0);
        read_limited(request.into_body(), limit).await.map(RawBody)
    }
}

/// Reads a body up to `limit` bytes; past it, drains the rest and answers 413.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut collected = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if collected.len() + chunk.len() > limit {
            let read = collected.len() + chunk.len();
            drop(collected);
            drain(stream, read).await;
            return Err(ApiError::PayloadTooLarge);
        }
        collected.extend_from_slice(&chunk);
    }
    Ok(collected.freeze())
}

/// Reads and discards what is left, bounded in bytes and time.
async fn drain(mut stream: axum::body::BodyDataStream, mut read: usize) {
    let deadline = tokio::time::Instant::now() + DRAIN_FOR;
    while read < DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len(),
            _ => return,
        }
    }
}

/// A body that could not be read: a broken `Content-Encoding`, or a client that went away.
fn unreadable(error: axum::Error) -> ApiError {
    ApiError::BadRequest(format!("the request body could not be read: {error}"))
}

/// A JSON body of any shape; the handler validates it field by field.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    require_content(bytes)?;
    serde_json::from_slice(bytes).map_err(not_json)
}

/// The error of an empty (or all-whitespace) body.
pub fn require_content(bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("body", "is empty; a JSON body is required"));
    }
    Ok(())
}

/// The error of a body that is not JSON.
pub fn not_json(error: serde_json::Error) -> ApiError {
    ApiError::field("body", format!("is not valid JSON: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: Vec<&'static [u8]>) -> Body {
        let stream = futures::stream::iter(chunks.into_iter().map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))));
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_and_drained_past_it() {
        let read = read_limited(body_of(vec![b"{\"a\":", b"1}"]), 16).await.unwrap();
        assert_eq!(&read[..], b"{\"a\":1}");
        let too_large = read_limited(body_of(vec![b"0123456789", b"0123456789", b"tail"]), 16).await;
        assert!(matches!(too_large, Err(ApiError::PayloadTooLarge)));
    }
}
