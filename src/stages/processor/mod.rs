//! The processor stage: runs the registered processors on every event, records what happened
//! and moves each event's processing status.
//!
//! Reads the durable `processor` consumer of EVENTS and the processor registry. Writes
//! `processing_results`, statuses and counters ([`crate::store::processing`]), then
//! `event.processed.success` / `event.processed.failed`; the consume loop then acks.
//! Guarantees:
//! - A processor that succeeded for an event is not run again on a redelivery; one that
//!   failed is retried with a growing delay (NAK) until `max_retries`, by the one callback rule
//!   ([`crate::infra::callback::rule`]): only 408, 429, 5xx and network errors are retried,
//!   `Retry-After` is honoured, 410 disables the processor, other answers fail at once.
//! - When any processor failed for good, the event is `failed` and its message is
//!   dead-lettered (`deadletter.processor`); otherwise `processed`.
//! - The status write waits for the persister's position (an event not stored after a
//!   second is NAKed; succeeded processors are not run again).
//! - An event no processor takes is acked without a write (the persister stored it
//!   `processed`); one stored `pending` for a processor that is gone since, or that the
//!   consumer passed without a run, is settled `processed` by the [`sweep`] within seconds
//!   when idle, a minute under load.
//! - While no processor is enabled the consumer takes no events
//!   ([`crate::stages::interest`]).
//! - Any number of workers share the consumer: each event is handled by one at a time.

mod handler;
pub mod runner;
mod sweep;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StageError;
use super::interest::{self, Idler};
use super::watermark::Watermark;
use crate::domain::{Event, ResultStatus};
use crate::infra::bus::Bus;
use crate::infra::callback::{Callbacks, Guard};
use crate::infra::consume::ConsumeLoop;
use crate::infra::settings::{CallbackArgs, ProcessorArgs};
use crate::registry::processors::{ProcessorRegistry, Processors};
use crate::registry::{self, Registry};
use crate::store::processing::{self, RunResult};
use crate::wire::Outgoing;
use crate::wire::domain_events::{DomainEvent, ProcessedFailed, ProcessedSuccess};
use crate::wire::subjects::streams;
use handler::Handler;
use runner::Runner;
use verdict::Ran;

pub const STAGE: &str = "processor";
/// Longest a webhook processor may take when its config says nothing shorter.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(60);

/// What the processor stage shares with the replayer: the registry and the runner.
pub struct Engine {
    pub registry: Arc<ProcessorRegistry>,
    pub runner: Runner,
}

impl Engine {
    pub async fn build(bus: &Bus, pool: &PgPool, callbacks: &CallbackArgs) -> Result<Arc<Self>, StageError> {
        let registry = Registry::load(pool.clone(), Processors { guard: Guard::new(callbacks) }).await?;
        let runner = Runner::new(bus.clone(), Callbacks::new(callbacks, CALLBACK_TIMEOUT)?);
        Ok(Arc::new(Self { registry, runner }))
    }
}

/// A built processor stage, ready to run.
pub struct ProcessorStage {
    consume: ConsumeLoop,
    handler: Handler,
}

impl ProcessorStage {
    pub async fn build(
        bus: Bus,
        pool: PgPool,
        engine: Arc<Engine>,
        settings: &ProcessorArgs,
    ) -> Result<Self, StageError> {
        let consume = ConsumeLoop::build(&bus, streams::EVENTS, STAGE, settings.batch_size).await?;
        let watermark = Watermark::start(&bus, pool.clone()).await?;
        let handler = Handler { pool, bus, engine, watermark, settings: settings.clone(), sweep: Default::default() };
        Ok(Self { consume, handler })
    }

    /// Runs until `token` is cancelled; the batch in hand is finished first.
    pub async fn run(self, token: CancellationToken) -> Result<(), StageError> {
        tracing::info!(stage = STAGE, "processor running");
        let registry = self.handler.engine.registry.clone();
        let (bus, pool) = (&self.handler.bus, &self.handler.pool);
        let follow = tokio::spawn(interest::follow_reloads(
            Idler::Processor,
            bus.clone(),
            pool.clone(),
            registry.clone(),
            token.clone(),
        ));
        let watch = tokio::spawn(registry.watch(bus.clone(), token.clone()));
        let result = self.consume.run(&self.handler, token).await;
        watch.abort();
        follow.abort();
        Ok(result?)
    }
}

/// The domain event of one processor run that ended (succeeded, or failed for good).
pub fn processed_message(result: &RunResult, event: &Event, retry_count: i32) -> Option<Outgoing> {
    let message = match result.status {
        ResultStatus::Success => ProcessedSuccess {
            event_id: event.event_id,
            event_type: &event.event_type,
            processor_name: &result.processor_name,
            duration_ms: result.duration_ms,
            run_id: &result.run_id,
            timestamp: result.processed_at,
            attempt: result.attempt,
        }
        .to_message(),
        ResultStatus::Failed => ProcessedFailed {
            event_id: event.event_id,
            event_type: &event.event_type,
            processor_name: &result.processor_name,
            error_message: result.message.as_deref(),
            retry_count,
            run_id: &result.run_id,
            timestamp: result.processed_at,
            attempt: result.attempt,
        }
        .to_message(),
        ResultStatus::Retry | ResultStatus::Skipped => return None,
    };
    message.ok()
}

/// Disables the processors whose endpoint answered 410 Gone, and tells every worker.
pub async fn disable_gone<'a>(pool: &PgPool, bus: &Bus, ran: impl Iterator<Item = &'a Ran>) {
    let gone: Vec<(String, String)> = ran
        .filter(|ran| ran.gone)
        .map(|ran| {
            let reason =
                format!("disabled: the endpoint answered 410 Gone ({})", ran.result.message.as_deref().unwrap_or(""));
            (ran.result.processor_id.clone(), reason)
        })
        .collect();
    if gone.is_empty() {
        return;
    }
    match processing::disable_gone(pool, &gone).await {
        Ok(disabled) if !disabled.is_empty() => {
            tracing::warn!(stage = STAGE, processors = ?disabled, "processors disabled: their endpoint is gone");
            registry::announce_change::<Processors>(bus).await;
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(stage = STAGE, error = %error, "cannot disable processors whose endpoint is gone"),
    }
}
