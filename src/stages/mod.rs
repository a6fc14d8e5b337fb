//! The pipeline's stages, each built (connect, check its stream and consumer, fail loudly) and
//! then run until its shutdown token is cancelled. Each reads what it needs from JetStream
//! through the one consume loop ([`crate::infra::consume`]) and returns outcomes; the loop
//! acks.
//!
//! - [`persister`]: EVENTS → PostgreSQL rows, `event.stored`.
//! - [`processor`]: EVENTS → processor runs, statuses, `event.processed.*`.
//! - [`replayer`]: JOBS → processor runs and republishing over stored events.
//! - [`dispatcher`]: EVENTS → one delivery per matching subscription on DELIVERIES.
//! - [`sender`]: DELIVERIES → signed webhook calls, the delivery log.
//! - [`projector`]: EVENTS → projections of entity streams.
//! - [`watermark`]: how far the persister has stored, for the stages that need the rows.
//! - [`interest`]: the dispatcher's and the processor's consumers idle while nothing could
//!   take an event.

pub mod dispatcher;
pub mod interest;
pub mod persister;
pub mod processor;
pub mod projector;
pub mod replayer;
pub mod sender;
pub mod watermark;

use crate::infra::bus::BusError;
use crate::infra::consume::ConsumeError;

/// Why a stage could not be built or stopped running.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot read what the stage needs from PostgreSQL")]
    Database(#[from] sqlx::Error),
    #[error("cannot build the HTTP client")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
}
