//! One lane per subscription, per sender process: at most `limit` of its deliveries in flight
//! at once, so a slow or dead endpoint holds a few of the sender's slots, never all of them.
//!
//! Reads and writes only its own map. A delivery over the limit goes back to JetStream for
//! about as long as the subscription's recent deliveries took ([`busy_delay`]), so a dead
//! endpoint's backlog is not spun through every few milliseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The shortest wait of a delivery whose lane is full.
const MIN_BUSY_DELAY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Lane {
    in_flight: usize,
    /// A moving average of how long its deliveries took.
    recent: Option<Duration>,
}

/// The lanes of every subscription.
pub struct Lanes {
    limit: usize,
    ceiling: Duration,
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
}

/// A taken slot of a lane; dropping it frees the slot.
pub struct Slot {
    subscription_id: String,
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    took: Option<Duration>,
}

impl Lanes {
    /// `limit` deliveries per subscription at once; a full lane's delay never exceeds `ceiling`
    /// (the delivery timeout).
    pub fn new(limit: usize, ceiling: Duration) -> Self {
        Self { limit: limit.max(1), ceiling, lanes: Default::default() }
    }

    /// A slot in this subscription's lane, or how long to wait when the lane is full.
    pub fn enter(&self, subscription_id: &str) -> Result<Slot, Duration> {
        let Ok(mut lanes) = self.lanes.lock() else {
            return Err(MIN_BUSY_DELAY);
        };
        let lane = lanes.entry(subscription_id.to_owned()).or_default();
        if lane.in_flight >= self.limit {
            return Err(busy_delay(lane.recent, self.ceiling));
        }
        lane.in_flight += 1;
        Ok(Slot { subscription_id: subscription_id.to_owned(), lanes: self.lanes.clone(), took: None })
    }
}

impl Slot {
    /// How long the delivery in this slot took (kept in the lane's average when it is freed).
    pub fn took(&mut self, duration: Duration) {
        self.took = Some(duration);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(mut lanes) = self.lanes.lock() else { return };
        let Some(lane) = lanes.get_mut(&self.subscription_id) else { return };
        lane.in_flight = lane.in_flight.saturating_sub(1);
        if let Some(took) = self.took {
            lane.recent = Some(average(lane.recent, took));
        }
        if lane.in_flight == 0 && lane.recent.is_none_or(|recent| recent < MIN_BUSY_DELAY) {
            // A quick, idle lane holds nothing worth keeping.
            lanes.remove(&self.subscription_id);
        }
    }
}

/// How long a delivery waits in JetStream when its lane is full: about as long as the lane's
/// deliveries take lately, within [`MIN_BUSY_DELAY`] and `ceiling`.
pub fn busy_delay(recent: Option<Duration>, ceiling: Duration) -> Duration {
    recent.unwrap_or(MIN_BUSY_DELAY).clamp(MIN_BUSY_DELAY, ceiling.max(MIN_BUSY_DELAY))
}

/// An exponential moving average weighing the newest duration a quarter.
fn average(recent: Option<Duration>, took: Duration) -> Duration {
    match recent {
        None => took,
        Some(recent) => recent.mul_f64(0.75) + took.mul_f64(0.25),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_S: Duration = Duration::from_secs(10);

    #[test]
    fn a_full_lane_waits_and_a_freed_slot_lets_the_next_in() {
        let lanes = Lanes::new(2, TEN_S);
        let first = lanes.enter("slow").expect("free");
        let _second = lanes.enter("slow").expect("free");
        assert_eq!(lanes.enter("slow").err(), Some(MIN_BUSY_DELAY), "full, nothing measured yet");
        assert!(lanes.enter("other").is_ok(), "each subscription has its own lane");
        drop(first);
        assert!(lanes.enter("slow").is_ok());
    }

    #[test]
    fn a_slow_lane_makes_its_waiting_deliveries_wait_longer() {
        let lanes = Lanes::new(1, TEN_S);
        let mut slot = lanes.enter("dead").expect("free");
        slot.took(TEN_S);
        drop(slot);
        let _held = lanes.enter("dead").expect("free again");
        assert_eq!(lanes.enter("dead").err(), Some(TEN_S));
    }

    #[test]
    fn the_delay_stays_between_its_bounds() {
        assert_eq!(busy_delay(None, TEN_S), MIN_BUSY_DELAY);
        assert_eq!(busy_delay(Some(Duration::from_millis(3)), TEN_S), MIN_BUSY_DELAY);
        assert_eq!(busy_delay(Some(Duration::from_secs(60)), TEN_S), TEN_S);
        assert_eq!(busy_delay(Some(Duration::from_secs(2)), TEN_S), Duration::from_secs(2));
    }

    #[test]
    fn the_average_leans_to_history() {
        assert_eq!(average(None, TEN_S), TEN_S);
        assert_eq!(average(Some(Duration::from_secs(4)), Duration::ZERO), Duration::from_secs(3));
    }
}
