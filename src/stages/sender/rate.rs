//! `rate_limit_per_second` of a subscription, per sender process: a token bucket holding one
//! token, so deliveries are spaced at least `1/rate` apart.
//!
//! Reads and writes only its own map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The next free slot of each rate-limited subscription.
#[derive(Default)]
pub struct Limits {
    next_free: Mutex<HashMap<String, Instant>>,
}

impl Limits {
    /// How long a delivery to this subscription must wait (`None`: it may go now, and the
    /// slot is taken).
    pub fn wait(&self, subscription_id: &str, rate_per_second: Option<i32>, now: Instant) -> Option<Duration> {
        let rate = f64::from(rate_per_second?.max(1));
        let mut slots = self.next_free.lock().ok()?;
        let next_free = slots.entry(subscription_id.to_owned()).or_insert(now);
        if *next_free > now {
            return Some(*next_free - now);
        }
        *next_free = now + Duration::from_secs_f64(1.0 / rate);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_spaced_by_the_rate() {
        let limits = Limits::default();
        let start = Instant::now();
        assert_eq!(limits.wait("s", Some(2), start), None);
        assert_eq!(limits.wait("s", Some(2), start + Duration::from_millis(100)), Some(Duration::from_millis(400)));
        assert_eq!(limits.wait("s", Some(2), start + Duration::from_millis(500)), None);
        assert_eq!(limits.wait("other", Some(2), start), None, "each subscription has its own slot");
        assert_eq!(limits.wait("s", None, start), None, "no limit");
    }
}
