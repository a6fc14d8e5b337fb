//! Carrying out a dead letter's redrive route: the I/O shell around
//! [`crate::infra::deadletter::redrive::route`].
//!
//! Writes EVENTS or JOBS (a republished message), DELIVERIES (a requeued delivery), or a
//! replay job (`event.replay_jobs` and `jobs.replay`); reads the event, the subscription and
//! the processing results it needs. Guarantees: `Ok` only once what it wrote was accepted;
//! every refusal says why with a stable code.

use uuid::Uuid;

use super::AppState;
use crate::infra::deadletter::letters::DeadLetter;
use crate::infra::deadletter::redrive::Route;
use crate::registry::subscriptions;
use crate::stages::{dispatcher, replayer};
use crate::store::replay_jobs::Selector;
use crate::store::{events, processing, replay_jobs};

/// What was done (`republished`, `requeued`, or `reprocessing` by the replay job named) or
/// why nothing was.
pub type Carried = Result<(&'static str, Option<Uuid>), (&'static str, String)>;

fn unavailable(error: impl std::fmt::Display) -> (&'static str, String) {
    tracing::warn!(error = %error, "redrive failed");
    ("redrive_failed", format!("nothing was redriven: {error}; retry later"))
}

pub async fn carry_out(state: &AppState, letter: &DeadLetter, route: Route) -> Carried {
    match route {
        Route::Refuse { code, detail } => Err((code, detail)),
        Route::Republish(message) => {
            state.bus.publish(message).await.map_err(unavailable)?;
            Ok(("republished", None))
        }
        Route::Requeue { subscription_id, event_id } => {
            match subscriptions::get(&state.pool, &subscription_id).await.map_err(unavailable)? {
                None => return Err(("subscription_gone", format!("subscription {subscription_id} was deleted"))),
                Some(subscription) if !subscription.enabled => {
                    let detail = format!("subscription {subscription_id} is disabled: enable it, then redrive");
                    return Err(("subscription_disabled", detail));
                }
                Some(_) => {}
            }
            let event = events::get_event(&state.pool, event_id).await.map_err(unavailable)?;
            let event = event.ok_or_else(|| ("event_not_stored", format!("event {event_id} is not stored")))?;
            let message_id = |_: &crate::domain::Event| format!("redrive.{}", letter.seq);
            dispatcher::requeue_as(&state.bus, &state.pool, &subscription_id, &[event.to_event()], message_id)
                .await
                .map_err(unavailable)?;
            Ok(("requeued", None))
        }
        Route::Reprocess { event_id } => reprocess(state, letter, event_id).await,
    }
}

/// A replay job of one event, for the processors whose latest result is still a failure.
async fn reprocess(state: &AppState, letter: &DeadLetter, event_id: Uuid) -> Carried {
    if replay_jobs::redriving(&state.pool, letter.seq).await.map_err(unavailable)? {
        let detail = format!("a replay job is redriving dead letter {} already", letter.seq);
        return Err(("already_redriving", detail));
    }
    let failed = processing::still_failed(&state.pool, event_id).await.map_err(unavailable)?;
    if failed.is_empty() {
        let detail =
            format!("no processor's latest result for event {event_id} is a failure (dead letter {})", letter.seq);
        return Err(("not_failed", detail));
    }
    let selector = Selector { event_ids: Some(vec![event_id]), ..Selector::default() };
    let (events_count, until_seq) = replay_jobs::measure(&state.pool, &selector).await.map_err(unavailable)?;
    if events_count == 0 {
        return Err(("event_not_stored", format!("event {event_id} is not stored")));
    }
    let request = replayer::ReplayRequest {
        selector,
        target_service: None,
        dry_run: false,
        processors: Some(failed),
        limit: 1,
        offset: 0,
        dead_letter_seq: Some(letter.seq),
    };
    let replay_id =
        replayer::submit(&state.pool, &state.bus, &request, events_count, until_seq).await.map_err(unavailable)?;
    Ok(("reprocessing", Some(replay_id)))
}
