//! The canonical [`Event`] that the gateway publishes to JetStream and the persister stores,
//! its ids, and the entity stream it belongs to.
//!
//! Reads nothing and writes nothing; everything here is plain data. The JSON shape of
//! [`Event`] is the wire format on the `events.>` subjects, so changing a field name is a
//! breaking change for every stage and every NATS-native producer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::kinds::{EventCategory, EventSource};

/// A JSON object, the type of `data`, `metadata`, `context` and `properties`.
pub type JsonObject = Map<String, Value>;

/// Longest accepted identifier (user, session, organization, device, correlation, stream).
pub const MAX_ID_CHARS: usize = 255;

/// One event as it travels on `events.>` and as the persister stores it.
///
/// Built once at the edge (HTTP gateway or the persister for NATS-native producers) from a
/// validated request; every later stage trusts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_source: EventSource,
    pub event_category: EventCategory,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub organization_id: Option<String>,
    pub device_id: Option<String>,
    pub correlation_id: Option<String>,
    pub data: JsonObject,
    pub metadata: JsonObject,
    pub context: JsonObject,
    pub properties: JsonObject,
    /// The entity stream this event belongs to, if any.
    pub stream_id: Option<StreamId>,
    /// When the event happened, as the producer says.
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub timestamp: DateTime<Utc>,
    /// When the service first accepted it.
    #[serde(serialize_with = "super::rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
}

/// An entity stream: `{entity_type}:{entity_id}`.
///
/// Parsed with [`StreamId::parse`] at the edge (both parts non-blank, at most
/// [`MAX_ID_CHARS`] characters, no control characters); read back from PostgreSQL as stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct StreamId(String);

impl StreamId {
    /// A stream id named by a producer, checked.
    pub fn parse(text: &str) -> Option<Self> {
        let (entity_type, entity_id) = text.split_once(':')?;
        let valid = !entity_type.trim().is_empty()
            && !entity_id.trim().is_empty()
            && text.chars().count() <= MAX_ID_CHARS
            && !text.chars().any(char::is_control);
        valid.then(|| Self(text.to_owned()))
    }

    /// The stream membership rule of ARCHITECTURE.md for events that name no stream: the
    /// user's stream when there is a user, else the device's, else none. An id that makes no
    /// valid stream id (blank, with control characters, too long) makes no stream: every stage
    /// derives the same stream from the same event, and the persister never meets one it
    /// would refuse.
    pub fn implicit(user_id: Option<&str>, device_id: Option<&str>) -> Option<Self> {
        match (user_id, device_id) {
            (Some(user), _) => Self::parse(&format!("user:{user}")),
            (None, Some(device)) => Self::parse(&format!("device:{device}")),
            (None, None) => None,
        }
    }

    /// `{entity_type}:{entity_id}` from its parts, as the projection endpoints name them.
    pub fn of(entity_type: &str, entity_id: &str) -> Self {
        Self(format!("{entity_type}:{entity_id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Entity type and id, when both are non-empty.
    pub fn parts(&self) -> Option<(&str, &str)> {
        self.0.split_once(':').filter(|(kind, id)| !kind.is_empty() && !id.is_empty())
    }

    /// The part before the first colon.
    pub fn entity_type(&self) -> &str {
        self.0.split_once(':').map_or(self.0.as_str(), |(kind, _)| kind)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        StreamId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("a stream id must look like {entity_type}:{entity_id}"))
    }
}

/// A new time-ordered event id (UUID v7).
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// A stable event id derived from an external key (a RudderStack `messageId`, a non-UUID
/// `Nats-Msg-Id`), so that the same key always names the same event.
pub fn event_id_from_key(namespace: &str, key: &str) -> Uuid {
    use sha2::{Digest, Sha256};
    let digest =
        Sha256::new().chain_update(namespace.as_bytes()).chain_update([0u8]).chain_update(key.as_bytes()).finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A time-ordered id that is the same on every redelivery of a message that has no id of its
/// own: from the time JetStream stored it and its stream sequence.
pub fn positional_event_id(published: DateTime<Utc>, stream_seq: u64) -> Uuid {
    let mut tail = [0u8; 10];
    tail[2..].copy_from_slice(&stream_seq.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(published.timestamp_millis().max(0) as u64, &tail).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_are_stable_and_distinct() {
        let a = event_id_from_key("rudderstack", "msg-1");
        assert_eq!(a, event_id_from_key("rudderstack", "msg-1"));
        assert_ne!(a, event_id_from_key("rudderstack", "msg-2"));
        assert_ne!(a, event_id_from_key("nats", "msg-1"));
        let now = Utc::now();
        assert_eq!(positional_event_id(now, 7), positional_event_id(now, 7));
        assert_ne!(positional_event_id(now, 7), positional_event_id(now, 8));
    }

    #[test]
    fn implicit_streams_prefer_the_user() {
        let stream = |user, device| StreamId::implicit(user, device).map(|id| id.as_str().to_owned());
        assert_eq!(stream(Some("u1"), Some("d1")).as_deref(), Some("user:u1"));
        assert_eq!(stream(None, Some("d1")).as_deref(), Some("device:d1"));
        assert_eq!(stream(None, None), None);
    }

    #[test]
    fn stream_ids_are_checked_at_the_edge() {
        let order = StreamId::parse("order:o-1:x").unwrap();
        assert_eq!(order.parts(), Some(("order", "o-1:x")));
        assert_eq!(order.entity_type(), "order");
        for bad in ["nocolon", ":x", "x:", " :x", "a:b\n", &format!("a:{}", "x".repeat(254))] {
            assert!(StreamId::parse(bad).is_none(), "{bad:?}");
        }
        for bad_user in ["", "   ", "a\nb", &"u".repeat(251)] {
            assert_eq!(StreamId::implicit(Some(bad_user), Some("d1")), None, "{bad_user:?}");
        }
        assert!(serde_json::from_str::<StreamId>("\"nocolon\"").is_err());
    }
}
