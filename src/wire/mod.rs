//! The wire format between stages: stream and subject names, header names, the EVENTS
//! message codec, the domain events on `event.>`, the STORED stream's message, W3C trace context, and the [`Outgoing`]
//! message they build.
//! Nothing here does I/O; [`crate::infra::bus`] publishes what these modules build.

pub mod codec;
pub mod deliveries;
pub mod domain_events;
pub mod headers;
pub mod message;
pub mod stored;
pub mod subjects;
pub mod trace;

pub use codec::{Incoming, Rejection};
pub use message::Outgoing;
pub use trace::TraceContext;
