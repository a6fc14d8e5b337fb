//! Read-your-writes: lets a create request wait until the persister has stored its events.
//!
//! Reads this gateway's core-NATS notification subject (the persister publishes the ids it
//! stored there, named by the `Event-Service-Notify` header of each event), the persister's
//! position notices ([`Watermark`]), and PostgreSQL as the fallback when a notification is
//! late or lost. Writes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::infra::bus::{Bus, BusError};
use crate::stages::watermark::Watermark;
use crate::store::events;
use crate::wire::subjects;

type Pending = HashMap<Uuid, Vec<mpsc::UnboundedSender<Uuid>>>;

/// The waiting requests of one gateway.
pub struct StoredWaiters {
    subject: String,
    pending: Mutex<Pending>,
    persisted: Watermark,
}

impl StoredWaiters {
    /// Subscribes to this gateway's notification subject and starts routing notifications.
    pub async fn start(bus: &Bus, pool: PgPool, token: CancellationToken) -> Result<Arc<Self>, BusError> {
        let subject = subjects::stored_notify_subject(&Uuid::now_v7().simple().to_string());
        let mut subscription = bus.client().subscribe(subject.clone()).await?;
        let persisted = Watermark::start(bus, pool).await?;
        let waiters = Arc::new(Self { subject, pending: Mutex::new(HashMap::new()), persisted });
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
    /// `through` is the EVENTS sequence of the request's last event, when known.
    /// PostgreSQL is asked directly now and then (at once when `check_first`), which covers
    /// duplicates (JetStream stored nothing new, so nobody will notify) and lost notifications;
    /// see [`ask_store`] for when.
    pub async fn wait(mut self, pool: &PgPool, timeout: Duration, mut check_first: bool, through: Option<u64>) -> bool {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut interval = Duration::from_millis(250);
        let mut check_at = if check_first { start } else { start + interval };
        let mut persisted = self.waiters.persisted.heard();
        while !self.remaining.is_empty() {
            match tokio::time::timeout_at(check_at.min(deadline), self.receiver.recv()).await {
                Ok(Some(id)) => {
                    self.remaining.remove(&id);
                }
                Ok(None) | Err(_) => {
                    let (before, now) = (persisted, self.waiters.persisted.heard());
                    persisted = now;
                    let at_deadline = tokio::time::Instant::now() >= deadline;
                    if check_first || ask_store(at_deadline, through, before, now) {
                        let ids: Vec<Uuid> = self.remaining.iter().copied().collect();
                        if let Ok(found) = events::stored_ids(pool, &ids).await {
                            self.remaining.retain(|id| !found.contains(id));
                        }
                        if self.remaining.is_empty() || tokio::time::Instant::now() >= deadline {
                            break;
                        }
                        interval = (interval * 2).min(Duration::from_secs(1));
                    }
                    check_first = false;
                    check_at = tokio::time::Instant::now() + interval;
                }
            }
        }
        self.remaining.is_empty()
    }
}

/// Whether a waiting request asks PostgreSQL which of its events are stored, when its check
/// is due. Not while the persister is still short of the request's last event (`through`)
/// and has moved since the last check (`before` → `now`, as its notices told): its
/// notifications will come, and asking would only add load to a busy database. Otherwise yes:
/// the persister is past the request (a notification was lost, or an event dead-lettered),
/// or stalled, or its notices are not arriving; and always at the deadline.
fn ask_store(at_deadline: bool, through: Option<u64>, before: u64, now: u64) -> bool {
    let working_towards = through.is_some_and(|through| now < through) && now > before;
    at_deadline || !working_towards
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
    fn the_store_is_asked_unless_the_persister_is_working_towards_the_request() {
        assert!(!ask_store(false, Some(100), 10, 50), "moving, not there yet");
        assert!(ask_store(false, Some(100), 50, 50), "stalled");
        assert!(ask_store(false, Some(100), 50, 100), "past the request: a notification is missing");
        assert!(ask_store(false, None, 10, 50), "the request's sequence is unknown");
        assert!(ask_store(true, Some(100), 10, 50), "the deadline is the last chance");
    }
}
