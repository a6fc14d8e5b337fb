//! The one HTTP error type. 4xx bodies are `{"code", "detail"}` (plus `errors` for
//! validation); 5xx bodies say nothing internal, the log says all (with the request id that
//! the `x-request-id` response header carries).
//!
//! Database errors are mapped once, by their kind ([`crate::infra::db::kind`]): PostgreSQL
//! unreachable is 503 `database_unavailable` with `Retry-After`; a unique violation is 409
//! `conflict`; anything else is 500 `internal_error`, because retrying cannot help.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::FieldError;
use crate::infra::bus::BusError;
use crate::infra::db::{self, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// A new schema version would refuse events the one before accepted.
    #[error("incompatible schema")]
    IncompatibleSchema(Vec<String>),
    /// The event's `data` does not match its type's schema (mode `reject`).
    #[error("schema violation")]
    SchemaViolation(Vec<FieldError>),
    /// A tracking API message that cannot be taken: 400, as the SDKs' own endpoints answer.
    #[error("invalid message")]
    InvalidMessage(Vec<FieldError>),
    #[error("not found: {0}")]
    NotFound(&'static str),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("the API key may not do this")]
    Forbidden,
    #[error("invalid webhook signature")]
    BadSignature,
    #[error("missing or invalid write key")]
    BadWriteKey,
    #[error("too many requests")]
    RateLimited { retry_after: std::time::Duration },
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("event too large: {0}")]
    EventTooLarge(String),
    #[error("conflict: {detail}")]
    Conflict { code: &'static str, detail: String },
    /// What was asked for existed once and has left the store (retention).
    #[error("gone: {detail}")]
    Gone { code: &'static str, detail: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A client error the HTTP framework answered (an unreadable query string or path
    /// parameter), with its status.
    #[error("bad request: {1}")]
    BadRequestStatus(StatusCode, String),
    /// A `Content-Encoding` the gateway does not undo.
    #[error("unsupported content encoding")]
    UnsupportedEncoding,
    #[error("event bus unavailable")]
    Bus(#[from] BusError),
    /// The in-flight bound is full: nothing of the request was published.
    #[error("overloaded")]
    Overloaded(&'static str),
    /// The events went to JetStream and no acknowledgement came back: stored or not, nobody
    /// knows. The client retries with these ids, which is idempotent.
    #[error("outcome unknown")]
    OutcomeUnknown { event_ids: Vec<uuid::Uuid> },
    /// The gateway serves as many live tails as it may.
    #[error("too many live tails")]
    TooManyTails(usize),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// A failed publish of these events: outcome unknown when they went out unanswered,
    /// otherwise nothing was accepted.
    pub fn publish_failed(error: BusError, event_ids: impl FnOnce() -> Vec<uuid::Uuid>) -> Self {
        if error.is_outcome_unknown() {
            ApiError::OutcomeUnknown { event_ids: event_ids() }
        } else {
            ApiError::Bus(error)
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_ids: Option<&'a [uuid::Uuid]>,
}

impl ApiError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail, errors) = match &self {
            ApiError::Validation(errors) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "validation_error", summarize(errors), Some(errors.as_slice()))
            }
            ApiError::IncompatibleSchema(reasons) => (
                StatusCode::CONFLICT,
                "incompatible_schema",
                format!(
                    "This version could refuse events the one before accepted ({}); register it with \
                     ?compatibility=none to accept that",
                    reasons.join("; ")
                ),
                None,
            ),
            ApiError::SchemaViolation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "schema_violation",
                format!("The event's data does not match its type's schema: {}", summarize(errors)),
                Some(errors.as_slice()),
            ),
            ApiError::InvalidMessage(errors) => {
                (StatusCode::BAD_REQUEST, "invalid_message", summarize(errors), Some(errors.as_slice()))
            }
            ApiError::BadWriteKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_write_key",
                "A valid write key is required: Basic auth with the key as user name, or writeKey".to_owned(),
                None,
            ),
            ApiError::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("Too many requests from this address; retry in {} ms", retry_after.as_millis()),
                None,
            ),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, "not_found", format!("{what} not found"), None),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A valid API key is required: Authorization: Bearer <key>".to_owned(),
                None,
            ),
            ApiError::BadSignature => (
                StatusCode::UNAUTHORIZED,
                "invalid_signature",
                "X-Signature does not match the configured secret".to_owned(),
                None,
            ),
            ApiError::PayloadTooLarge => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "The request body is too large".to_owned(), None)
            }
            ApiError::EventTooLarge(detail) => (StatusCode::PAYLOAD_TOO_LARGE, "event_too_large", detail.clone(), None),
            ApiError::Conflict { code, detail } => (StatusCode::CONFLICT, *code, detail.clone(), None),
            ApiError::Gone { code, detail } => (StatusCode::GONE, *code, detail.clone(), None),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This endpoint does not accept that method".to_owned(),
                None,
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "This API key may only send events; this endpoint needs an admin key (EVENT_API_KEYS)".to_owned(),
                None,
            ),
            ApiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, "bad_request", detail.clone(), None),
            ApiError::BadRequestStatus(status, detail) => (*status, "bad_request", detail.clone(), None),
            ApiError::UnsupportedEncoding => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                "Content-Encoding must be gzip, deflate or identity".to_owned(),
                None,
            ),
            ApiError::Bus(error) if error.is_payload_too_large() => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                "The event is larger than the event bus accepts".to_owned(),
                None,
            ),
            ApiError::Bus(error) => {
                tracing::error!(error = %error, source = ?std::error::Error::source(error), "event bus error");
                let detail = match error {
                    BusError::ReadRaw { .. } | BusError::Delete { .. } | BusError::StreamLookup { .. } => {
                        "The event bus could not be read or changed; nothing was changed. Retry later."
                    }
                    _ => "The event bus did not accept the events; nothing was accepted. Retry later.",
                };
                (StatusCode::SERVICE_UNAVAILABLE, "nats_unavailable", detail.to_owned(), None)
            }
            ApiError::Overloaded(path) => {
                tracing::debug!(path, "overloaded; request refused");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "The service has as many events in flight as it takes; nothing was accepted. Retry after the \
                     Retry-After delay."
                        .to_owned(),
                    None,
                )
            }
            ApiError::TooManyTails(limit) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_tails",
                format!("This gateway already serves {limit} live tails (EVENT_LIVE_MAX_TAILS). Retry later."),
                None,
            ),
            ApiError::OutcomeUnknown { event_ids } => {
                tracing::warn!(events = event_ids.len(), "no acknowledgement from the event bus; outcome unknown");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    "The event bus did not answer in time: the events may or may not be stored. Retry with the same \
                     event_ids (listed here); a retry is idempotent."
                        .to_owned(),
                    None,
                )
            }
            ApiError::Database(error) => match db::kind(error) {
                ErrorKind::Transient => {
                    tracing::error!(error = %error, "database unavailable");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database_unavailable",
                        "The event store is unavailable. Retry later.".to_owned(),
                        None,
                    )
                }
                ErrorKind::UniqueViolation => {
                    tracing::info!(error = %error, "unique violation");
                    (StatusCode::CONFLICT, "conflict", "The resource exists already".to_owned(), None)
                }
                ErrorKind::Permanent => internal(error),
            },
            ApiError::Internal(error) => internal(error.as_ref()),
        };
        let event_ids = match &self {
            ApiError::OutcomeUnknown { event_ids } => Some(event_ids.as_slice()),
            _ => None,
        };
        let mut response = (status, axum::Json(Body { code, detail, errors, event_ids })).into_response();
        match &self {
            ApiError::Unauthorized => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::BadWriteKey => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
            }
            ApiError::RateLimited { retry_after } => {
                // Whole seconds, rounded up: a client waiting that long is let through.
                let seconds = retry_after.as_millis().div_ceil(1000).max(1);
                if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
            }
            _ => {}
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A 500 that tells the client nothing internal; the log line (in the request's span, with
/// its request id) tells the operator everything.
fn internal(error: &dyn std::error::Error) -> (StatusCode, &'static str, String, Option<&'static [FieldError]>) {
    tracing::error!(error = %error, source = ?error.source().map(ToString::to_string), "internal error");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "Something went wrong on our side; it was logged under the request id in the x-request-id header".to_owned(),
        None,
    )
}

fn summarize(errors: &[FieldError]) -> String {
    match errors {
        [] => "Invalid request".to_owned(),
        [one] if one.field.is_empty() => one.message.clone(),
        [one] => format!("{} {}", one.field, one.message),
        many => format!("{} fields are invalid", many.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(error: ApiError) -> (StatusCode, Option<String>) {
        let response = error.into_response();
        let retry_after = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap_or("").to_owned());
        (response.status(), retry_after)
    }

    #[test]
    fn database_errors_map_by_their_kind() {
        assert_eq!(
            status(ApiError::Database(sqlx::Error::PoolTimedOut)),
            (StatusCode::SERVICE_UNAVAILABLE, Some("1".to_owned()))
        );
        assert_eq!(status(ApiError::Database(sqlx::Error::RowNotFound)), (StatusCode::INTERNAL_SERVER_ERROR, None));
        let decode = sqlx::Error::ColumnDecode { index: "status".into(), source: "unknown EventStatus".into() };
        assert_eq!(status(ApiError::Database(decode)), (StatusCode::INTERNAL_SERVER_ERROR, None));
    }

    #[test]
    fn a_publish_failure_says_whether_anything_was_accepted() {
        let refused = ApiError::publish_failed(BusError::Disconnected, Vec::new);
        assert!(matches!(refused, ApiError::Bus(BusError::Disconnected)));
        assert_eq!(status(refused), (StatusCode::SERVICE_UNAVAILABLE, Some("1".to_owned())));
        let id = uuid::Uuid::now_v7();
        let unknown = ApiError::OutcomeUnknown { event_ids: vec![id] };
        assert_eq!(status(ApiError::OutcomeUnknown { event_ids: vec![id] }).0, StatusCode::SERVICE_UNAVAILABLE);
        let body =
            futures::executor::block_on(axum::body::to_bytes(unknown.into_response().into_body(), 4096)).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (body["code"].as_str(), body["event_ids"][0].as_str()),
            (Some("outcome_unknown"), Some(id.to_string().as_str()))
        );
    }
}
