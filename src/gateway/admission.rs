//! Admission: a bound on the events the gateway has handed to JetStream and not yet seen
//! acknowledged, so more load than the machine can take meets a quick 503 `overloaded` (with
//! `Retry-After`) instead of an ever longer queue in the gateway's memory.
//!
//! Reads and writes only its semaphore. Guarantees: at most `EVENT_MAX_INFLIGHT_EVENTS` events
//! are in flight at once (a request larger than the whole bound takes all of it); a request
//! waits at most [`WAIT`] for room, then is refused before anything of it was published, so
//! the 503 means "nothing accepted".

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The longest a request waits for room before it is refused.
pub const WAIT: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    capacity: u32,
    /// Events in flight, for `/metrics`.
    gauge: Gauge,
}

/// Room for a request's events, held until they are acknowledged (dropped).
pub struct Admitted {
    permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.dec_by(i64::from(self.permit.num_permits() as u32));
    }
}

impl Admission {
    pub fn new(capacity: u32, gauge: Gauge) -> Self {
        let capacity = capacity.max(1);
        Self { permits: Arc::new(Semaphore::new(capacity as usize)), capacity, gauge }
    }

    /// Room for `events` events, waiting at most [`WAIT`].
    pub async fn admit(&self, path: &'static str, events: usize) -> Result<Admitted, ApiError> {
        let wanted = room_for(events, self.capacity);
        let acquire = self.permits.clone().acquire_many_owned(wanted);
        match tokio::time::timeout(WAIT, acquire).await {
            Ok(Ok(permit)) => {
                self.gauge.inc_by(i64::from(wanted));
                Ok(Admitted { permit, gauge: self.gauge.clone() })
            }
            // Timed out (or, never, closed): the gateway has all it can take.
            _ => Err(ApiError::Overloaded(path)),
        }
    }
}

/// The permits a request of `events` events takes: one per event, at least one, at most the
/// whole bound (so a request larger than the bound can still go, alone).
pub fn room_for(events: usize, capacity: u32) -> u32 {
    u32::try_from(events).unwrap_or(u32::MAX).clamp(1, capacity.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_takes_one_permit_per_event_within_the_bound() {
        assert_eq!(room_for(0, 100), 1);
        assert_eq!(room_for(40, 100), 40);
        assert_eq!(room_for(1_000, 100), 100, "larger than the bound: alone");
        assert_eq!(room_for(usize::MAX, 100), 100);
    }

    #[tokio::test]
    async fn a_full_gateway_refuses_after_a_short_wait_and_admits_again_once_acked() {
        let admission = Admission::new(10, Gauge::default());
        let held = admission.admit("create", 8).await.expect("room");
        assert_eq!(admission.gauge.get(), 8);
        let started = tokio::time::Instant::now();
        let refused = admission.admit("batch", 5).await;
        assert!(matches!(refused, Err(ApiError::Overloaded("batch"))));
        assert!(started.elapsed() >= WAIT);
        let small = admission.admit("create", 2).await;
        assert!(small.is_ok(), "what fits still goes");
        assert_eq!(admission.gauge.get(), 10);
        drop((held, small));
        assert_eq!(admission.gauge.get(), 0);
        assert!(admission.admit("batch", 5).await.is_ok());
    }
}
