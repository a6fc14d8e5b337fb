//! Integration tests: the real service against a real nats-server and PostgreSQL that the
//! harness starts (one PostgreSQL cluster per run with a fresh database per test, one
//! nats-server per test). Tests talk to it the way users do: HTTP, NATS, SQL to check.
//! Set TEST_LOG=1 to see the service's logs.

mod harness;
mod receiver;

mod api;
mod binaries;
mod bodies;
mod clients;
mod deadletters;
mod fuzz;
mod ingest;
mod live;
mod observability;
mod processing;
mod projections;
mod replay;
mod resilience;
mod retention;
mod schemas;
mod stored;
mod subscriptions;
mod tracking;
