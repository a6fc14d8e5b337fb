//! The stores in PostgreSQL: one module per kind of row, each a thin layer of SQL over the
//! `event` schema (files in `migrations/`).
//!
//! - [`position`]: how far the persister has stored each JetStream stream.
//! - [`write`]: the persister's batch write (events, stream versions, rollups, position).
//! - [`rollups`]: the statistics counters every writer keeps current.
//! - [`events`], [`query`], [`statistics`]: the read side of the API; [`by_id`] keeps reads by
//!   id to the partitions that hold the ids.
//! - [`processing`]: processor results and status changes.
//! - [`deliveries`]: the subscriptions' delivery log.
//! - [`projections`]: projections, snapshots and the stream reads folds need.
//! - [`replay_jobs`]: replay jobs and their pages.
//! - [`retention`]: the day partitions of `event.events`, kept ready and dropped when expired.

pub mod by_id;
pub mod deliveries;
pub mod events;
pub mod position;
pub mod processing;
pub mod projections;
pub mod query;
pub mod replay_jobs;
pub mod retention;
pub mod rollups;
pub mod statistics;
pub mod write;

use crate::domain::EventStatus;
use crate::wire::Incoming;

/// An event to store, with the status it starts in: `pending`, or `processed` when no
/// processor takes it (the persister decides). What [`write`] stores and [`rollups`] counts.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    pub incoming: &'a Incoming,
    pub status: EventStatus,
}
