//! How far the persister has stored EVENTS, as the stages that need an event's row before
//! they act on it (the processor's status write, the projector's fold) see it, and as the
//! gateway's waiting requests see it (to know when asking PostgreSQL is worth it).
//!
//! Reads the core-NATS subject `_EVSVC.persisted`, on which the persister publishes its
//! position after every commit, and `event.persister_position` as the fallback when a notice
//! is late or lost. Writes nothing. Guarantees: [`Watermark::wait_for`] returns true only once
//! the persister's position has reached the sequence, that is when every EVENTS message up to
//! it is committed in PostgreSQL (or was dead-lettered). Waiting on it replaces NAKing a
//! message and having it redelivered while the persister is a batch behind.

use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::infra::bus::{Bus, BusError};
use crate::store::position;
use crate::wire::subjects::{self, streams};

/// How often a waiter reads the position itself, in case a notice was missed.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// The persister's position in EVENTS, kept current in the background while it lives.
pub struct Watermark {
    position: watch::Sender<u64>,
    pool: PgPool,
    _follow: DropGuard,
}

impl Watermark {
    /// Subscribes to the persister's notices.
    pub async fn start(bus: &Bus, pool: PgPool) -> Result<Self, BusError> {
        let mut notices = bus.client().subscribe(subjects::PERSISTED).await?;
        let (position, _) = watch::channel(0);
        let token = CancellationToken::new();
        let sender = position.clone();
        let watermark = Self { position, pool, _follow: token.clone().drop_guard() };
        tokio::spawn(async move {
            loop {
                let notice = tokio::select! {
                    _ = token.cancelled() => break,
                    notice = notices.next() => notice,
                };
                let Some(notice) = notice else { break };
                if let Some(seq) = std::str::from_utf8(&notice.payload).ok().and_then(|text| text.parse().ok()) {
                    raise(&sender, seq);
                }
            }
        });
        Ok(watermark)
    }

    /// Waits up to `timeout` until everything up to `seq` is stored; false when it is not by
    /// then (or PostgreSQL cannot be read).
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        let mut changes = self.position.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if *changes.borrow_and_update() >= seq {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return self.read().await >= seq;
            }
            let poll = tokio::time::sleep((deadline - now).min(POLL_EVERY));
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return self.read().await >= seq },
                _ = poll => { self.read().await; }
            }
        }
    }

    /// The position as the persister's notices told it, without asking PostgreSQL: 0 until
    /// the first notice, behind the truth when a notice was lost.
    pub fn heard(&self) -> u64 {
        *self.position.borrow()
    }

    /// Reads the position from PostgreSQL, takes it in and returns the watermark.
    async fn read(&self) -> u64 {
        match position::read_position(&self.pool, streams::EVENTS).await {
            Ok(seq) => raise(&self.position, seq),
            Err(error) => tracing::debug!(error = %error, "cannot read the persister position"),
        }
        *self.position.borrow()
    }
}

/// Positions only grow: a late notice never moves the watermark back.
fn raise(position: &watch::Sender<u64>, seq: u64) {
    position.send_if_modified(|current| {
        let raised = seq > *current;
        if raised {
            *current = seq;
        }
        raised
    });
}
