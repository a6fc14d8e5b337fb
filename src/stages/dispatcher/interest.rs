//! Whether the dispatcher's consumer takes events at all: every event while some
//! subscription can take one, none while no subscription could (none enabled with a
//! callback URL). An idle consumer costs nearly nothing: nats-server skips the events its
//! filter leaves out, instead of delivering each one for the dispatcher to ack unread.
//!
//! Reads the subscriptions from PostgreSQL and the `dispatcher` consumer's configuration;
//! writes that consumer's filter subject (`events.>`, or [`subjects::EVENTS_NONE`] to idle).
//! Guarantees:
//! - Every change is decided under one PostgreSQL advisory lock from a fresh read of the
//!   table, so processes deciding at once cannot leave the filter idle while the table holds
//!   a deliverable subscription: the last to decide read the latest commit.
//! - The gateway calls [`follow`] after a subscription change is committed and before it
//!   answers and tells the dispatchers to reload: a new subscription takes effect when the
//!   dispatchers have reloaded (within a second), as it did before the consumer could idle.
//! - The dispatcher calls it at start and after each reload of its subscription set, so a
//!   change made elsewhere (a subscription disabled by the sender for its failures, a
//!   gateway that died before following) is followed within the registry's reload interval.
//!
//! An idle consumer moves along EVENTS with the stream: events accepted while no
//! subscription could take them are never matched later, as they would have been matched
//! against no subscription then.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::STAGE;
use crate::infra::bus::{Bus, BusError};
use crate::registry::subscriptions::{self, SubscriptionRegistry, SubscriptionSet};
use crate::wire::subjects::{self, streams};

/// The advisory lock that serializes decisions about the dispatcher's filter.
const FILTER_LOCK: i64 = 0x6576_7376_6469_7370; // "evsvdisp"

#[derive(Debug, thiserror::Error)]
pub enum InterestError {
    #[error("cannot read the subscriptions")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One change to the dispatcher's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Forget what it holds and start at the stream's head.
    MoveToHead,
    /// Take the events this filter matches.
    Filter(&'static str),
}

/// The steps from the consumer's filter now to the one the subscriptions call for.
/// - Opening: to the head first, while the filter still takes nothing, so the events
///   accepted while the consumer idled are never handed over (they would all be matched
///   against the new subscriptions).
/// - Idling: to the head every time, so the consumer never sits on a growing stretch of
///   skipped events (nats-server would look through it again at each pull). An older
///   nats-server refuses the move and the filter stays open: idling needs it.
fn steps(filter: &str, delivers: bool) -> Vec<Step> {
    match (delivers, filter) {
        (true, subjects::EVENTS_WILDCARD) => vec![],
        (true, subjects::EVENTS_NONE) => vec![Step::MoveToHead, Step::Filter(subjects::EVENTS_WILDCARD)],
        // Set by hand: take every event again without skipping any.
        (true, _) => vec![Step::Filter(subjects::EVENTS_WILDCARD)],
        (false, subjects::EVENTS_NONE) => vec![Step::MoveToHead],
        (false, _) => vec![Step::MoveToHead, Step::Filter(subjects::EVENTS_NONE)],
    }
}

/// Sets the dispatcher consumer's filter from the subscriptions as committed now. Returns
/// whether the consumer takes events.
pub async fn follow(bus: &Bus, pool: &PgPool) -> Result<bool, InterestError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(FILTER_LOCK).execute(&mut *tx).await?;
    // Read after the lock is held: every decision before this one is already applied.
    let delivers = SubscriptionSet::new(subscriptions::list(&mut *tx).await?).delivers();
    let filter = bus.consumer_filter(streams::EVENTS, STAGE).await?;
    for step in steps(&filter, delivers) {
        match step {
            Step::MoveToHead => bus.move_consumer_to_head(streams::EVENTS, STAGE).await?,
            Step::Filter(wanted) => {
                bus.set_consumer_filter(streams::EVENTS, STAGE, wanted).await?;
                tracing::info!(stage = STAGE, filter = wanted, "dispatcher consumer filter changed");
            }
        }
    }
    tx.commit().await?;
    bus.metrics().dispatcher_takes_events.set(i64::from(delivers));
    Ok(delivers)
}

/// Follows the subscriptions at start and after every reload of `registry`, until cancelled.
/// A failure is logged and tried again at the next reload.
pub async fn follow_reloads(bus: Bus, pool: PgPool, registry: Arc<SubscriptionRegistry>, token: CancellationToken) {
    let mut reloads = registry.reloads();
    loop {
        if let Err(error) = follow(&bus, &pool).await {
            tracing::warn!(stage = STAGE, error = %error, "cannot set the dispatcher consumer's filter");
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
    fn the_consumer_opens_from_the_head_and_idles_at_the_head() {
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
