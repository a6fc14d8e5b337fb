//! event-service: a NATS-native event pipeline.
//!
//! Events arrive over HTTP ([`gateway`]) or straight on `events.>` subjects, land in the
//! JetStream stream EVENTS, and every stage reads them from there with a durable consumer.
//! The [`persister`] stores them in PostgreSQL ([`store`]), from which the gateway answers
//! queries and statistics. See ARCHITECTURE.md for the whole pipeline.
//!
//! Modules:
//! - [`model`]: sources, categories, statuses and the canonical [`model::Event`].
//! - [`ingest`]: validation at the edge, turning requests into events.
//! - [`subject`]: every NATS subject, built in one place.
//! - [`bus`]: NATS connection, JetStream topology (`jetstream/`), publish and atomic batch.
//! - [`consume`]: the consume loop and the Ack / Retry / Reject outcomes.
//! - [`db`] and [`store`]: the PostgreSQL pool, migrations (`migrations/`) and queries.
//! - [`gateway`]: the HTTP API.
//! - [`persister`]: the stage that stores events.
//! - [`processors`] (the registry), [`processing`] (running and recording) and
//!   [`processor`] (the stage): event processing. [`replay`]: replay jobs.
//! - [`subscriptions`] and [`dispatcher`]: subscriptions and their webhook deliveries.
//! - [`projections`] and [`projector`]: event sourcing, entity projections and time travel.
//! - [`watermark`]: how far the persister has stored, for the stages that wait for it.
//! - [`callback`]: the guard and HTTP client for outgoing callbacks.
//! - [`service`]: running stages together.
//! - [`local`]: private nats-server and PostgreSQL for the local run and the tests.
//! - [`settings`], [`telemetry`], [`shutdown`]: what every binary needs.

pub mod bus;
pub mod callback;
pub mod consume;
pub mod db;
pub mod dispatcher;
pub mod gateway;
pub mod ingest;
pub mod local;
pub mod model;
pub mod persister;
pub mod processing;
pub mod processor;
pub mod processors;
pub mod projections;
pub mod projector;
pub mod replay;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod subject;
pub mod subscriptions;
pub mod telemetry;
pub mod watermark;
