//! What every stage stands on: the NATS bus and its topology, the one consume loop and
//! dead-lettering, group commit, the PostgreSQL pool, outgoing callbacks, settings, logging, memory, shutdown, and
//! the private servers of the local run and the tests.

pub mod bus;
pub mod callback;
pub mod coalesce;
pub mod consume;
pub mod db;
pub mod deadletter;
pub mod local;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod probe;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
