//! The domain vocabulary, plain data with no I/O: the canonical event and its ids, the closed
//! vocabularies (sources, categories, statuses), event-type patterns, request validation at
//! the edge, and the secret type.

pub mod event;
pub mod fields;
pub mod kinds;
pub mod parse;
pub mod pattern;
pub mod rfc3339;
pub mod secret;
pub mod status;
pub mod typed;

pub use event::{Event, JsonObject, MAX_ID_CHARS, StreamId, event_id_from_key, new_event_id};
pub use fields::{FieldError, Fields};
pub use kinds::{EventCategory, EventSource};
pub use pattern::EventTypePattern;
pub use secret::Secret;
pub use status::{DefinitionStatus, DeliveryStatus, EventStatus, JobStatus, ResultStatus};
