//! The sender stage: sends the deliveries the dispatcher queued to the subscribers' webhooks.
//!
//! Reads the durable `sender` consumer of DELIVERIES and the subscription registry; writes
//! HTTP callbacks, `event.delivery_attempts`, subscriptions' failure records, and
//! `event.subscription.disabled`. Guarantees:
//! - The body is the event JSON with Standard Webhooks headers (`webhook-id` is the same on
//!   every attempt of a delivery).
//! - Answers follow the one callback rule ([`crate::infra::callback::rule`]): 2xx delivered;
//!   408, 429, 5xx, timeouts and connection errors retried on the subscription's schedule
//!   plus jitter (NAK with delay), or after `Retry-After` when the endpoint gives one; 410
//!   disables the subscription; other answers fail at once. Past the last retry: failed,
//!   recorded and dead-lettered (`deadletter.sender`).
//! - Every attempt is recorded in `event.delivery_attempts` before its message is settled.
//!   When the record fails (PostgreSQL away), the batch is held and its attempts are recorded
//!   when PostgreSQL is back, without calling the subscribers again.
//! - A delivery for a deleted subscription is dropped; for a disabled one it is recorded as
//!   skipped (so `recover` can queue it again); a refused address is recorded, not retried.
//! - Deliveries are independent: each holds one of `EVENT_SENDER_CONCURRENCY` call slots only
//!   while it is being sent (and a place in hand until it is recorded), and at most `EVENT_SENDER_SUBSCRIPTION_CONCURRENCY`
//!   of one subscription's are in flight at once (the rest wait in JetStream), so a slow or
//!   dead endpoint costs only its own deliveries.
//! - `rate_limit_per_second` holds per sender process (a delivery over it waits in JetStream).
//! - A subscription whose deliveries all fail for the configured window is disabled.

mod handler;
pub mod lanes;
pub mod rate;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StageError;
use crate::infra::bus::Bus;
use crate::infra::callback::Callbacks;
use crate::infra::consume::ConsumeLoop;
use crate::infra::settings::{CallbackArgs, DispatcherArgs};
use crate::registry::subscriptions::SubscriptionRegistry;
use crate::wire::subjects::streams;
use handler::Handler;

pub const STAGE: &str = "sender";

/// A built sender, ready to run.
pub struct Sender {
    consume: ConsumeLoop,
    handler: Handler,
    /// Deliveries in hand at once.
    window: usize,
}

impl Sender {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        registry: Arc<SubscriptionRegistry>,
        settings: &DispatcherArgs,
        callbacks: &CallbackArgs,
    ) -> Result<Self, StageError> {
        let callbacks = Callbacks::new(callbacks, Duration::from_millis(settings.delivery_timeout_ms))?;
        // Deliveries in hand: twice the webhook calls, so that reads and records of
        // PostgreSQL overlap the calls.
        let window = settings.sender_concurrency.max(1) * 2;
        let consume = ConsumeLoop::build(&bus, streams::DELIVERIES, STAGE, window * 2).await?;
        let handler = Handler::new(pool, bus, registry, callbacks, settings);
        Ok(Self { consume, handler, window })
    }

    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        tracing::info!(stage = STAGE, "sender running");
        Ok(self.consume.run_each(&self.handler, self.window, token).await?)
    }
}
