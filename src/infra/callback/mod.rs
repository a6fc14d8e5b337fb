//! Outgoing HTTP callbacks (webhook processors and subscription deliveries): one guard, one
//! client, one signing scheme, one rule for what an answer means, and one [`Callbacks::post`]
//! that every caller goes through.
//!
//! Reads callback settings; writes HTTP requests. Guarantees: every request passes the guard
//! first (a refused address is reported as such, never sent); every answer is judged by
//! [`rule::verdict`]; bodies are signed the Standard Webhooks way when there is a secret.

mod guard;
pub mod rule;
mod sign;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;

pub use guard::{CallbackError, Guard, install_crypto_provider};
pub use rule::Verdict;
pub use sign::sign;

use crate::infra::settings::CallbackArgs;

/// Longest error text kept from an answer or a failure.
const MAX_DETAIL_CHARS: usize = 500;

/// One callback to make.
pub struct Request<'a> {
    pub url: &'a reqwest::Url,
    pub body: &'a Bytes,
    /// Extra headers (`content-type: application/json` is always sent).
    pub headers: Vec<(&'static str, &'a str)>,
    /// Overrides the client's timeout.
    pub timeout: Option<Duration>,
    /// `(secrets, webhook id)`: sign the body, once with each secret.
    pub signed: Option<(Vec<&'a str>, &'a str)>,
}

/// What came of a callback.
#[derive(Debug, Clone)]
pub enum Posted {
    /// The guard refused the address; nothing was sent.
    Refused(CallbackError),
    Answered(Answer),
}

/// An answer, or the failure to get one.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status; `None` when there was no answer (timeout, connection error).
    pub status: Option<u16>,
    pub verdict: Verdict,
    /// `HTTP 200`, `HTTP 503: <body>`, or what went wrong; at most 500 characters.
    pub detail: String,
    pub duration_ms: f64,
}

/// The guarded HTTP client of one process. Cheap to share.
#[derive(Clone)]
pub struct Callbacks {
    guard: Guard,
    http: reqwest::Client,
}

impl Callbacks {
    /// A client whose requests time out after `timeout` unless a request says otherwise.
    pub fn new(settings: &CallbackArgs, timeout: Duration) -> Result<Self, reqwest::Error> {
        let guard = Guard::new(settings);
        let http = guard.client(timeout)?;
        Ok(Self { guard, http })
    }

    /// Checks the address, posts the body, and judges the answer.
    pub async fn post(&self, request: Request<'_>) -> Posted {
        if let Err(error) = self.guard.check_resolved(request.url).await {
            return Posted::Refused(error);
        }
        let mut builder =
            self.http.post(request.url.clone()).header("content-type", "application/json").body(request.body.clone());
        if let Some(timeout) = request.timeout {
            builder = builder.timeout(timeout);
        }
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        if let Some((secrets, webhook_id)) = request.signed {
            for (name, value) in sign(&secrets, webhook_id, Utc::now().timestamp(), request.body) {
                builder = builder.header(name, value);
            }
        }
        let started = Instant::now();
        let sent = builder.send().await;
        let elapsed = || started.elapsed().as_secs_f64() * 1000.0;
        let answer = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|text| rule::parse_retry_after(text, Utc::now()));
                let verdict = rule::verdict(Some(status), retry_after);
                let detail = match verdict {
                    Verdict::Success => format!("HTTP {status}"),
                    _ => {
                        let text = response.text().await.unwrap_or_default();
                        clip(&format!("HTTP {status}: {}", text.trim()))
                    }
                };
                Answer { status: Some(status), verdict, detail, duration_ms: elapsed() }
            }
            Err(error) => Answer {
                status: None,
                verdict: rule::verdict(None, None),
                detail: clip(&describe(&error)),
                duration_ms: elapsed(),
            },
        };
        Posted::Answered(answer)
    }
}

/// An HTTP failure with its causes, which name what actually went wrong.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() { format!("timed out: {text}") } else { text }
}

/// At most [`MAX_DETAIL_CHARS`] characters, marked when cut.
pub fn clip(text: &str) -> String {
    if text.chars().count() <= MAX_DETAIL_CHARS {
        text.to_owned()
    } else {
        text.chars().take(MAX_DETAIL_CHARS).chain("…".chars()).collect()
    }
}
