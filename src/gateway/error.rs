//! The one HTTP error type. 4xx bodies are `{"code", "detail"}` (plus `errors` for
//! validation); 5xx bodies say nothing internal, the log says all.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::bus::BusError;
use crate::ingest::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("not found: {0}")]
    NotFound(&'static str),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("invalid webhook signature")]
    BadSignature,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("event too large: {0}")]
    EventTooLarge(String),
    #[error("conflict: {detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("event bus unavailable")]
    Bus(#[from] BusError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
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
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This endpoint does not accept that method".to_owned(),
                None,
            ),
            ApiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, "bad_request", detail.clone(), None),
            ApiError::Bus(error) if error.is_payload_too_large() => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                "The event is larger than the event bus accepts".to_owned(),
                None,
            ),
            ApiError::Bus(error) => {
                tracing::error!(error = %error, source = ?std::error::Error::source(error), "event bus error");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "nats_unavailable",
                    "The event bus did not accept the event; nothing was stored. Retry later.".to_owned(),
                    None,
                )
            }
            ApiError::Database(error) => {
                tracing::error!(error = %error, "database error");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "The event store is unavailable. Retry later.".to_owned(),
                    None,
                )
            }
        };
        let mut response = (status, axum::Json(Body { code, detail, errors })).into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn summarize(errors: &[FieldError]) -> String {
    match errors {
        [] => "Invalid request".to_owned(),
        [one] if one.field.is_empty() => one.message.clone(),
        [one] => format!("{} {}", one.field, one.message),
        many => format!("{} fields are invalid", many.len()),
    }
}
