//! One EVENTS message as the persister handles it, whether its consumer delivered it or it
//! was read straight from the stream to fill a gap.
//!
//! Reads messages; writes nothing.

use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::infra::deadletter::Original;
use crate::wire::subjects::streams;
use crate::wire::{Incoming, Rejection, codec, headers};

/// One EVENTS message, from the consumer or read straight from the stream.
pub(super) struct Envelope<'a> {
    /// Index in the batch; `None` for a message read to fill a gap.
    pub position: Option<usize>,
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    pub seq: u64,
    pub published: DateTime<Utc>,
}

impl<'a> Envelope<'a> {
    pub fn of(position: usize, message: &'a Message) -> Result<Self, Rejection> {
        let info = message.info().map_err(|error| Rejection::new("no_metadata", error.to_string()))?;
        Ok(Envelope {
            position: Some(position),
            subject: message.subject.as_str(),
            headers: message.headers.as_ref(),
            payload: &message.payload,
            seq: info.stream_sequence,
            published: info.published,
        })
    }

    pub fn decode(&self) -> Result<Incoming, Rejection> {
        codec::decode_parts(self.subject, self.headers, self.payload, self.seq, self.published)
    }

    /// The gateway waiting for this event, if one is.
    pub fn notify(&self) -> Option<&'a str> {
        self.headers.and_then(|headers| headers.get(headers::NOTIFY)).map(|value| value.as_str())
    }

    /// Whether the service encoded it (else a NATS-native producer published it).
    pub fn ingested(&self) -> bool {
        codec::is_ingested(self.headers)
    }

    pub fn original(&self) -> Original<'a> {
        Original {
            subject: self.subject,
            headers: self.headers,
            payload: self.payload,
            stream: streams::EVENTS,
            sequence: self.seq,
        }
    }
}

/// A message read straight from the stream, owning its parts.
pub(super) struct OwnedEnvelope {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    seq: u64,
    published: DateTime<Utc>,
}

impl From<async_nats::jetstream::message::StreamMessage> for OwnedEnvelope {
    fn from(message: async_nats::jetstream::message::StreamMessage) -> Self {
        Self {
            subject: message.subject.to_string(),
            headers: message.headers,
            payload: message.payload,
            seq: message.sequence,
            published: message.time,
        }
    }
}

impl<'a> From<&'a OwnedEnvelope> for Envelope<'a> {
    fn from(owned: &'a OwnedEnvelope) -> Self {
        Envelope {
            position: None,
            subject: &owned.subject,
            headers: Some(&owned.headers),
            payload: &owned.payload,
            seq: owned.seq,
            published: owned.published,
        }
    }
}
