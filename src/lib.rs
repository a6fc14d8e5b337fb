//! event-service: a NATS-native event pipeline.
//!
//! Events arrive over HTTP ([`gateway`]) or straight on `events.>` subjects, land in the
//! JetStream stream EVENTS, and every stage ([`stages`]) reads them from there with a durable
//! consumer. The persister stores them in PostgreSQL ([`store`]), from which the gateway
//! answers queries and statistics. See ARCHITECTURE.md for the whole pipeline.
//!
//! The module map follows the pipeline, from the bottom up (each layer uses only the ones
//! above it in this list):
//! - [`domain`]: the event, its ids, sources, categories and statuses, event-type patterns,
//!   validation at the edge, secrets. No I/O.
//! - [`wire`]: what travels between stages: stream and subject names, headers, the EVENTS
//!   codec (one decode for every stage), the DELIVERIES message, the domain events on
//!   `event.>`. No I/O.
//! - [`infra`]: the NATS bus and topology, the one consume loop (outcomes, heartbeats, holding
//!   a batch through outages, dead letters), PostgreSQL, outgoing callbacks (one guard, one
//!   client, one rule), settings, logging, shutdown, private servers for local runs and tests.
//! - [`store`]: the SQL, one module per kind of row.
//! - [`registry`]: processors, subscriptions and projection definitions, each with its table,
//!   its validation and its live in-memory set ([`registry::Registry`]).
//! - [`stages`]: persister, processor, replayer, dispatcher, sender, projector: each a folder
//!   with the stage, its handler (the I/O shell) and its decisions as pure functions.
//! - [`gateway`]: the HTTP API, one module per resource, one error type.
//! - [`service`]: running stages together.

pub mod domain;
pub mod gateway;
pub mod infra;
pub mod registry;
pub mod service;
pub mod stages;
pub mod store;
pub mod wire;

/// The allocator every binary of the service declares (`#[global_allocator]`): mimalloc. The
/// stages allocate and free many small buffers per event (messages, JSON values, SQL
/// arguments), and glibc's malloc spent a third of the service's CPU on them (BENCHMARKS.md,
/// "Allocator"). The library does not set it itself, so a program that links it (the
/// benchmark) keeps its own.
pub use mimalloc::MiMalloc as Allocator;
