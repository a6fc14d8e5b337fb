//! Read-your-writes: lets a create request wait until the persister has stored its events.
//!
//! Reads this gateway's core-NATS notification subject (the persister publishes the ids it
//! stored there, named by the `Event-Service-Notify` header of each event), and PostgreSQL as
//! the fallback when a notification is late or lost. Writes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::infra::bus::{Bus, BusError};
use crate::store::events;
use crate::wire::subjects;

type Pending = HashMap<Uuid, Vec<mpsc::UnboundedSender<Uuid>>>;

/// The waiting requests of one gateway.
pub struct StoredWaiters {
    subject: String,
    pending: Mutex<Pending>,
}

impl StoredWaiters {
    /// Subscribes to this gateway's notification subject and starts routing notifications.
    pub async fn start(bus: &Bus, token: CancellationToken) -> Result<Arc<Self>, BusError> {
        let subject = subjects::stored_notify_subject(&Uuid::now_v7().simple().to_string());
        let mut subscription = bus.client().subscribe(subject.clone()).await?;
        let waiters = Arc::new(Self { subject, pending: Mutex::new(HashMap::new()) });
        let routed = Arc::clone(&waiters);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = token.cancelled() => break,
                    message = subscription.next() => message,
                };
                let Some(message) = message else { break };
                if let Ok(ids) = serde_json::from_slice::<Vec<Uuid>>(&message.payload) {
                    routed.complete(&ids);
                }
            }
        });
        Ok(waiters)
    }

    /// The subject to put in the `Event-Service-Notify` header.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Registers interest in `ids`. Call before publishing, so no notification can be missed.
    pub fn register(self: &Arc<Self>, ids: &[Uuid]) -> Waiting {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut pending = self.lock();
        for id in ids {
            pending.entry(*id).or_default().push(sender.clone());
        }
        Waiting { waiters: Arc::clone(self), remaining: ids.iter().copied().collect(), sender, receiver }
    }

    fn complete(&self, ids: &[Uuid]) {
        let mut pending = self.lock();
        for id in ids {
            for sender in pending.remove(id).unwrap_or_default() {
                let _ = sender.send(*id);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave the map inconsistent; keep serving.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One request's wait.
pub struct Waiting {
    waiters: Arc<StoredWaiters>,
    remaining: HashSet<Uuid>,
    sender: mpsc::UnboundedSender<Uuid>,
    receiver: mpsc::UnboundedReceiver<Uuid>,
}

impl Waiting {
    /// Waits until every event is stored, at most `timeout`. True when they all are.
    /// PostgreSQL is asked directly now and then (at once when `check_first`), which covers
    /// duplicates (JetStream stored nothing new, so nobody will notify) and lost notifications;
    /// see [`ask_store`] for when.
    pub async fn wait(mut self, pool: &PgPool, timeout: Duration, check_first: bool) -> bool {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut interval = Duration::from_millis(250);
        let mut check_at = if check_first { start } else { start + interval };
        let mut heard = false;
        while !self.remaining.is_empty() {
            match tokio::time::timeout_at(check_at.min(deadline), self.receiver.recv()).await {
                Ok(Some(id)) => {
                    heard |= self.remaining.remove(&id);
                }
                Ok(None) | Err(_) => {
                    let now = tokio::time::Instant::now();
                    if ask_store(heard, now >= deadline) {
                        let ids: Vec<Uuid> = self.remaining.iter().copied().collect();
                        if let Ok(found) = events::stored_ids(pool, &ids).await {
                            self.remaining.retain(|id| !found.contains(id));
                        }
                        if self.remaining.is_empty() || tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        interval = (interval * 2).min(Duration::from_secs(1));
                    }
                    heard = false;
                    check_at = tokio::time::Instant::now() + interval;
                }
            }
        }
        self.remaining.is_empty()
    }
}

/// Whether a waiting request asks PostgreSQL which of its events are stored, when its check
/// is due. Not while notifications for it are still coming in (`heard` since the last check):
/// the persister is working through its events, and a lost notification is found by the
/// check after the last one. Always at the deadline, the last chance to answer "stored".
fn ask_store(heard: bool, at_deadline: bool) -> bool {
    at_deadline || !heard
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut pending = self.waiters.lock();
        for id in &self.remaining {
            if let Some(senders) = pending.get_mut(id) {
                senders.retain(|sender| !sender.same_channel(&self.sender));
                if senders.is_empty() {
                    pending.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ask_store;

    #[test]
    fn the_store_is_asked_when_notifications_stall_or_time_is_up() {
        assert!(ask_store(false, false), "nothing heard since the last check");
        assert!(!ask_store(true, false), "the persister is still notifying");
        assert!(ask_store(true, true), "the deadline is the last chance");
        assert!(ask_store(false, true));
    }
}
