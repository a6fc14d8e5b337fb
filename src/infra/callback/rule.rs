//! The one rule for what an outgoing callback's answer means, for webhook processors and
//! subscription deliveries alike:
//!
//! | answer | verdict |
//! |---|---|
//! | 2xx | success |
//! | 408, 429, 5xx, timeout, connection error | retry, not before `Retry-After` when given |
//! | 410 Gone | gone: the owner (subscription or processor) is disabled |
//! | any other status (3xx included: no redirect is followed) | failed, no retry |
//!
//! A refused address (see [`super::guard`]) is decided before any request and is failed too.
//! Reads nothing, writes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a callback's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// Try again; not before `after` when the endpoint said so.
    Retry {
        after: Option<Duration>,
    },
    /// The endpoint is gone for good.
    Gone,
    /// Failed; retrying cannot help.
    Fail,
}

/// The verdict on an HTTP status, or on no answer at all (`None`: timeout, connection error).
pub fn verdict(status: Option<u16>, retry_after: Option<Duration>) -> Verdict {
    match status {
        Some(200..=299) => Verdict::Success,
        None | Some(408 | 429 | 500..=599) => Verdict::Retry { after: retry_after },
        Some(410) => Verdict::Gone,
        Some(_) => Verdict::Fail,
    }
}

/// A `Retry-After` value: delay seconds, or an HTTP date (a date in the past means now).
/// Capped at [`MAX_RETRY_AFTER`]; `None` when unreadable.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds.min(1e9)),
        Ok(_) => return None,
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
            (at - now).to_std().unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_every_answer() {
        assert_eq!(verdict(Some(200), None), Verdict::Success);
        assert_eq!(verdict(Some(204), None), Verdict::Success);
        for retried in [None, Some(408), Some(429), Some(500), Some(502), Some(503), Some(599)] {
            assert_eq!(verdict(retried, None), Verdict::Retry { after: None }, "{retried:?}");
        }
        let wait = Some(Duration::from_secs(7));
        assert_eq!(verdict(Some(429), wait), Verdict::Retry { after: wait });
        assert_eq!(verdict(Some(410), None), Verdict::Gone);
        for failed in [301, 400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(verdict(Some(failed), wait), Verdict::Fail, "{failed}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 2.5 ", now), Some(Duration::from_millis(2500)));
        assert_eq!(parse_retry_after("Fri, 02 Jan 2026 03:04:35 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Thu, 01 Jan 2026 00:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
