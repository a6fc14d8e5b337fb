//! [`Outgoing`]: one message to publish, with its headers, built by the wire modules and
//! published by [`crate::infra::bus`].
//!
//! Reads nothing, writes nothing.

use async_nats::HeaderMap;
use bytes::Bytes;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Outgoing {
    /// A message whose `Nats-Msg-Id` is `message_id`, so a retried publish inside the
    /// duplicate window is stored once.
    pub fn with_id(subject: String, message_id: &str, payload: Bytes) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
        Self { subject, headers, payload }
    }

    /// An event message: `Nats-Msg-Id` is the event id.
    pub fn event(subject: String, event_id: uuid::Uuid, payload: Bytes) -> Self {
        Self::with_id(subject, &event_id.to_string(), payload)
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Carries `trace` on (`traceparent`, `tracestate`): the receiver's parent is its span.
    pub fn with_trace(mut self, trace: &super::TraceContext) -> Self {
        for (name, value) in trace.headers() {
            self.headers.insert(name, value.as_str());
        }
        self
    }
}
