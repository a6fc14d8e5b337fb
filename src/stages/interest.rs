//! Whether a stage's consumer of EVENTS takes events at all. The dispatcher's takes every
//! event while some subscription can take one (enabled, with a callback URL), the
//! processor's while some processor is enabled; otherwise it takes none. An idle consumer
//! costs nearly nothing: nats-server skips the events its filter leaves out, instead of
//! delivering each one for the stage to ack unread.
//!
//! Reads the subscriptions or processors from PostgreSQL and the consumer's configuration;
//! writes the consumer's filter subject (`events.>`, or [`subjects::EVENTS_NONE`] to idle)
//! and moves it to the stream's head. Guarantees:
//! - Every change is decided under the consumer's PostgreSQL advisory lock from a fresh read
//!   of the table, so processes deciding at once cannot leave a consumer idle while the table
//!   needs it: the last to decide read the latest commit.
//! - The gateway follows a change after it is committed and before it answers and tells the
//!   stages to reload ([`changed`]): a new subscription or processor takes effect when the
//!   stages have reloaded (within a second), as it did before consumers could idle.
//! - The stages follow at start and after each reload of their set, so a change made
//!   elsewhere (a subscription or processor disabled for its failures, a gateway that died
//!   before following) is followed within the registry's reload interval.
//!
//! A consumer idles at the stream's head and opens from there: events accepted while it
//! idled are never handed over later, as there was nothing to take them when they came.

use std::sync::Arc;

use async_nats::jetstream::consumer::Config as ConsumerConfig;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::infra::bus::{Bus, BusError};
use crate::infra::metrics::ConsumerLabels;
use crate::registry::processors::{self, Processors};
use crate::registry::subscriptions::{self, SubscriptionSet, Subscriptions};
use crate::registry::{self, Registry, Source};
use crate::wire::subjects::{self, streams};

/// A stage whose consumer idles while nothing could take an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idler {
    Dispatcher,
    Processor,
}

impl Idler {
    /// The durable consumer of EVENTS.
    pub fn consumer(self) -> &'static str {
        match self {
            Idler::Dispatcher => crate::stages::dispatcher::STAGE,
            Idler::Processor => crate::stages::processor::STAGE,
        }
    }

    /// Whether anything in the table could take an event now. For processors any enabled
    /// row counts, even one whose configuration cannot run: the consumer may take more than
    /// it needs, never less.
    async fn needed(self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        Ok(match self {
            Idler::Dispatcher => SubscriptionSet::new(subscriptions::list(conn).await?).delivers(),
            Idler::Processor => processors::list(conn).await?.iter().any(|processor| processor.enabled),
        })
    }

    /// Tells every process to reload the table this stage serves.
    async fn announce(self, bus: &Bus) {
        match self {
            Idler::Dispatcher => registry::announce_change::<Subscriptions>(bus).await,
            Idler::Processor => registry::announce_change::<Processors>(bus).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InterestError {
    #[error("cannot read what the consumer serves")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One change to a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Forget what it holds and start at the stream's head.
    MoveToHead,
    /// Take the events this filter matches.
    Filter(&'static str),
}

/// The steps from the consumer's filter now to the one the table calls for.
/// - Opening: to the head first, while the filter still takes nothing, so the events
///   accepted while the consumer idled are never handed over (they would all be taken by
///   the new subscription or processor).
/// - Idling: to the head every time, so the consumer never sits on a growing stretch of
///   skipped events (nats-server would look through it again at each pull). An older
///   nats-server refuses the move and the filter stays open: idling needs it.
fn steps(filter: &str, needed: bool) -> Vec<Step> {
    match (needed, filter) {
        (true, subjects::EVENTS_WILDCARD) => vec![],
        (true, subjects::EVENTS_NONE) => vec![Step::MoveToHead, Step::Filter(subjects::EVENTS_WILDCARD)],
        // Set by hand: take every event again without skipping any.
        (true, _) => vec![Step::Filter(subjects::EVENTS_WILDCARD)],
        (false, subjects::EVENTS_NONE) => vec![Step::MoveToHead],
        (false, _) => vec![Step::MoveToHead, Step::Filter(subjects::EVENTS_NONE)],
    }
}

/// Sets the consumer's filter from the table as committed now. Returns whether the consumer
/// takes events.
pub async fn follow(idler: Idler, bus: &Bus, pool: &PgPool) -> Result<bool, InterestError> {
    let consumer = idler.consumer();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('consumer filter ' || $1))")
        .bind(consumer)
        .execute(&mut *tx)
        .await?;
    // Read after the lock is held: every decision before this one is already applied.
    let needed = idler.needed(&mut tx).await?;
    let config = bus.consumer_info(streams::EVENTS, consumer).await?.config;
    for step in steps(&config.filter_subject, needed) {
        match step {
            Step::MoveToHead => bus.move_consumer_to_head(streams::EVENTS, consumer).await?,
            Step::Filter(wanted) => {
                let config = ConsumerConfig { filter_subject: wanted.to_owned(), ..config.clone() };
                bus.update_consumer(streams::EVENTS, config).await?;
                tracing::info!(consumer, filter = wanted, "consumer filter changed");
            }
        }
    }
    tx.commit().await?;
    let labels = ConsumerLabels { stream: streams::EVENTS.to_owned(), consumer: consumer.to_owned() };
    bus.metrics().consumer_takes_events.get_or_create(&labels).set(i64::from(needed));
    Ok(needed)
}

/// After a committed change to what `idler`'s stage serves (a subscription or a processor
/// created, changed or deleted): its consumer follows first, so it takes events again before
/// any stage reloads, then every process is told to reload that registry. A failure to
/// follow is logged: the stages follow when they reload.
pub async fn changed(idler: Idler, bus: &Bus, pool: &PgPool) {
    if let Err(error) = follow(idler, bus, pool).await {
        tracing::warn!(consumer = idler.consumer(), error = %error,
            "cannot set the consumer's filter; the stages set it when they reload");
    }
    idler.announce(bus).await;
}

/// Follows at start and after every reload of `registry`, until cancelled. A failure is
/// logged and tried again at the next reload.
pub async fn follow_reloads<S: Source>(
    idler: Idler,
    bus: Bus,
    pool: PgPool,
    registry: Arc<Registry<S>>,
    token: CancellationToken,
) {
    let mut reloads = registry.reloads();
    loop {
        if let Err(error) = follow(idler, &bus, &pool).await {
            tracing::warn!(consumer = idler.consumer(), error = %error, "cannot set the consumer's filter");
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_opens_from_the_head_and_idles_at_the_head() {
        use Step::*;
        let (all, none) = ("events.>", "events._none");
        assert_eq!(steps(all, true), []);
        assert_eq!(steps(none, true), [MoveToHead, Filter(all)]);
        assert_eq!(steps("events.backend.>", true), [Filter(all)]);
        assert_eq!(steps(all, false), [MoveToHead, Filter(none)]);
        assert_eq!(steps(none, false), [MoveToHead]);
    }

    #[test]
    fn the_idle_filter_matches_no_event_subject() {
        // It has no wildcard, so only the same subject would match.
        for (source, category, event_type) in [("_none", "", ""), ("", "", ""), ("backend", "_none", "x")] {
            assert_ne!(subjects::event_subject(source, category, event_type), subjects::EVENTS_NONE);
        }
    }
}
