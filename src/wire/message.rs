//! [`Outgoing`]: one message to publish, with its headers, built by the wire modules and
//! published by [`crate::infra::bus`].
//!
//! Reads nothing, writes nothing.

use async_nats::HeaderMap;
use async_nats::header::HeaderName;
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

    /// The event id of an event message (its `Nats-Msg-Id`).
    pub fn event_id(&self) -> Option<uuid::Uuid> {
        let id = self.headers.get(async_nats::header::NATS_MESSAGE_ID)?;
        uuid::Uuid::parse_str(id.as_str()).ok()
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        // A static name needs neither parsing nor a copy of its own.
        self.headers.insert(HeaderName::from_static(name), value);
        self
    }

    /// Carries `trace` on (`traceparent`, `tracestate`): the receiver's parent is its span.
    pub fn with_trace(mut self, trace: &super::TraceContext) -> Self {
        for (name, value) in trace.headers() {
            self.headers.insert(HeaderName::from_static(name), value.as_str());
        }
        self
    }
}
