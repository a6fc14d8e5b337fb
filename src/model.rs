//! The domain vocabulary: event sources, categories and statuses, and the canonical [`Event`]
//! that the gateway publishes to JetStream and the persister stores.
//!
//! Reads nothing and writes nothing; everything here is plain data. The JSON shape of
//! [`Event`] is the wire format on the `events.>` subjects, so changing a field name is a
//! breaking change for every stage and every NATS-native producer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A JSON object, the type of `data`, `metadata`, `context` and `properties`.
pub type JsonObject = Map<String, Value>;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The snake_case name used in JSON, subjects and the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the snake_case name; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }

            /// The accepted names, for error messages.
            pub fn expected() -> String {
                [$($text),+].join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Where an event comes from.
    EventSource {
        Frontend => "frontend",
        Backend => "backend",
        System => "system",
        IotDevice => "iot_device",
        ExternalApi => "external_api",
        Scheduled => "scheduled",
    }
);

string_enum!(
    /// What kind of thing happened.
    EventCategory {
        UserAction => "user_action",
        PageView => "page_view",
        FormSubmit => "form_submit",
        Click => "click",
        UserLifecycle => "user_lifecycle",
        Payment => "payment",
        Order => "order",
        Task => "task",
        System => "system",
        Security => "security",
        Performance => "performance",
        Error => "error",
        Device => "device",
        DeviceStatus => "device_status",
        Telemetry => "telemetry",
        Command => "command",
        Alert => "alert",
    }
);

string_enum!(
    /// Processing status; the only part of a stored event that changes.
    EventStatus {
        Pending => "pending",
        Processing => "processing",
        Processed => "processed",
        Failed => "failed",
        Archived => "archived",
    }
);

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
    /// The entity stream this event belongs to (`{entity_type}:{entity_id}`), if any.
    pub stream_id: Option<String>,
    /// When the event happened, as the producer says.
    pub timestamp: DateTime<Utc>,
    /// When the service first accepted it.
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// The stream membership rule of ARCHITECTURE.md for events that name no stream.
    pub fn implicit_stream_id(user_id: Option<&str>, device_id: Option<&str>) -> Option<String> {
        match (user_id, device_id) {
            (Some(user), _) => Some(format!("user:{user}")),
            (None, Some(device)) => Some(format!("device:{device}")),
            (None, None) => None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_names() {
        for source in EventSource::ALL {
            assert_eq!(EventSource::parse(source.as_str()), Some(*source));
            let json = serde_json::to_value(source).unwrap();
            assert_eq!(json, Value::String(source.as_str().to_owned()));
        }
        for category in EventCategory::ALL {
            assert_eq!(EventCategory::parse(category.as_str()), Some(*category));
        }
        assert_eq!(EventStatus::parse("processed"), Some(EventStatus::Processed));
        assert_eq!(EventSource::parse("Backend"), None);
    }

    #[test]
    fn keyed_ids_are_stable_and_distinct() {
        let a = event_id_from_key("rudderstack", "msg-1");
        assert_eq!(a, event_id_from_key("rudderstack", "msg-1"));
        assert_ne!(a, event_id_from_key("rudderstack", "msg-2"));
        assert_ne!(a, event_id_from_key("nats", "msg-1"));
    }

    #[test]
    fn implicit_streams_prefer_the_user() {
        assert_eq!(Event::implicit_stream_id(Some("u1"), Some("d1")).as_deref(), Some("user:u1"));
        assert_eq!(Event::implicit_stream_id(None, Some("d1")).as_deref(), Some("device:d1"));
        assert_eq!(Event::implicit_stream_id(None, None), None);
    }
}
