//! The sender's decisions, as pure functions: whether a delivery is attempted at all, and
//! what an attempt's result means for the delivery log, the message and the subscription.
//!
//! Reads nothing, writes nothing. The meaning of an answer is the one callback rule
//! ([`crate::infra::callback::rule`]); this adds the subscription's retry budget and schedule.

use std::time::Duration;

use crate::domain::DeliveryStatus;
use crate::infra::callback::{Posted, Verdict};
use crate::infra::consume::Outcome;
use crate::registry::subscriptions::{RetryPolicy, Subscription};

/// Whether a delivery goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate<'a> {
    /// Send it to this URL.
    Send(&'a reqwest::Url),
    /// Recorded as skipped, not sent: `recover` can queue it again.
    Skip(&'static str),
}

/// A disabled subscription or one without a usable callback URL (`callback`, parsed) is
/// skipped.
pub fn gate<'a>(subscription: &Subscription, callback: Option<&'a reqwest::Url>) -> Gate<'a> {
    if !subscription.enabled {
        return Gate::Skip("subscription disabled");
    }
    match callback {
        Some(url) => Gate::Send(url),
        None => Gate::Skip("subscription has no callback_url"),
    }
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: DeliveryStatus,
    pub outcome: Outcome,
    /// When the next attempt is due (retries only).
    pub retry_in: Option<Duration>,
    /// Disable the subscription, for this reason.
    pub disable: Option<String>,
}

/// What an attempt's result means. `retries_used`: retries of this delivery before this
/// attempt; `jitter`: a fraction from 0 to 0.2 added to the scheduled delay, so retries of
/// many deliveries spread out.
pub fn decide(posted: &Posted, policy: &RetryPolicy, retries_used: i32, label: &str, jitter: f64) -> Decision {
    let answer = match posted {
        Posted::Refused(error) => {
            let reason = format!("callback_url {error}");
            return failed(DeliveryStatus::Refused, Outcome::reject("callback_refused", reason));
        }
        Posted::Answered(answer) => answer,
    };
    match answer.verdict {
        Verdict::Success => {
            Decision { status: DeliveryStatus::Delivered, outcome: Outcome::Ack, retry_in: None, disable: None }
        }
        Verdict::Gone => Decision {
            disable: Some("the endpoint answered 410 Gone".to_owned()),
            ..failed(DeliveryStatus::Failed, Outcome::reject("endpoint_gone", answer.detail.clone()))
        },
        Verdict::Retry { after } if retries_used < policy.max_retries as i32 => {
            let scheduled = policy.delay(retries_used as u32 + 1).mul_f64(1.0 + jitter.clamp(0.0, 0.2));
            let wait = after.unwrap_or(scheduled);
            Decision {
                status: DeliveryStatus::Retry,
                outcome: Outcome::Retry { after: wait },
                retry_in: Some(wait),
                disable: None,
            }
        }
        Verdict::Retry { .. } => {
            failed(DeliveryStatus::Failed, Outcome::reject("delivery_failed", format!("{label}: {}", answer.detail)))
        }
        Verdict::Fail => {
            failed(DeliveryStatus::Failed, Outcome::reject("delivery_rejected", format!("{label}: {}", answer.detail)))
        }
    }
}

fn failed(status: DeliveryStatus, outcome: Outcome) -> Decision {
    Decision { status, outcome, retry_in: None, disable: None }
}

/// The attempts already made for a delivery, when its message says so without asking
/// PostgreSQL: on the message's first delivery nothing was tried since it was queued, so the
/// count is the base it was queued with (0 from the dispatcher; the attempts so far for a
/// resend or recover). A redelivered message may have been tried: `None`, look it up.
pub fn known_prior(delivered: i64, base: i32) -> Option<i32> {
    (delivered == 1).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::callback::{Answer, CallbackError};

    fn answered(status: Option<u16>, verdict: Verdict) -> Posted {
        Posted::Answered(Answer { status, verdict, detail: format!("HTTP {status:?}"), duration_ms: 1.0 })
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { max_retries: 2, backoff_seconds: vec![1.0, 10.0] }
    }

    #[test]
    fn only_an_enabled_subscription_with_a_url_is_sent_to() {
        let url = reqwest::Url::parse("https://hooks.example.com/in").expect("a URL");
        let mut subscription = crate::registry::subscriptions::tests::subscription("s", Some(url.as_str()));
        assert_eq!(gate(&subscription, Some(&url)), Gate::Send(&url));
        assert_eq!(gate(&subscription, None), Gate::Skip("subscription has no callback_url"));
        subscription.enabled = false;
        assert_eq!(gate(&subscription, Some(&url)), Gate::Skip("subscription disabled"));
    }

    #[test]
    fn success_delivers() {
        let decision = decide(&answered(Some(204), Verdict::Success), &policy(), 0, "s", 0.0);
        assert_eq!((decision.status, decision.outcome), (DeliveryStatus::Delivered, Outcome::Ack));
    }

    #[test]
    fn retries_follow_the_schedule_until_the_budget_is_spent() {
        let retry = answered(Some(503), Verdict::Retry { after: None });
        let first = decide(&retry, &policy(), 0, "s", 0.0);
        assert_eq!((first.status, first.retry_in), (DeliveryStatus::Retry, Some(Duration::from_secs(1))));
        let second = decide(&retry, &policy(), 1, "s", 0.1);
        assert_eq!(second.outcome, Outcome::Retry { after: Duration::from_secs(11) });
        let spent = decide(&retry, &policy(), 2, "s", 0.0);
        assert_eq!(spent.status, DeliveryStatus::Failed);
        assert!(matches!(spent.outcome, Outcome::Reject(ref r) if r.code == "delivery_failed"));
    }

    #[test]
    fn retry_after_wins_over_the_schedule() {
        let busy = answered(Some(429), Verdict::Retry { after: Some(Duration::from_secs(30)) });
        assert_eq!(decide(&busy, &policy(), 0, "s", 0.2).retry_in, Some(Duration::from_secs(30)));
    }

    #[test]
    fn gone_disables_and_other_answers_fail_at_once() {
        let gone = decide(&answered(Some(410), Verdict::Gone), &policy(), 0, "s", 0.0);
        assert!(gone.disable.is_some());
        assert!(matches!(gone.outcome, Outcome::Reject(ref r) if r.code == "endpoint_gone"));
        let rejected = decide(&answered(Some(400), Verdict::Fail), &policy(), 0, "s", 0.0);
        assert_eq!((rejected.status, rejected.disable), (DeliveryStatus::Failed, None));
        assert!(matches!(rejected.outcome, Outcome::Reject(ref r) if r.code == "delivery_rejected"));
        let refused = decide(&Posted::Refused(CallbackError::NoHost), &policy(), 0, "s", 0.0);
        assert_eq!(refused.status, DeliveryStatus::Refused);
        assert!(matches!(refused.outcome, Outcome::Reject(ref r) if r.code == "callback_refused"));
    }

    #[test]
    fn only_a_first_delivery_knows_its_attempts_without_a_lookup() {
        assert_eq!(known_prior(1, 0), Some(0));
        assert_eq!(known_prior(1, 3), Some(3), "a resend starts after the attempts made so far");
        assert_eq!(known_prior(2, 0), None, "redelivered: it may have been tried");
        assert_eq!(known_prior(0, 0), None, "no delivery count: look it up");
    }
}
