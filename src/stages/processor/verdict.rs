//! The processor stage's decisions, as pure functions: what a run's outcome means for its
//! result, which processors still have to run on an event, and what the event's status and
//! message outcome are once they ran.
//!
//! Reads nothing, writes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::domain::{EventStatus, ResultStatus};
use crate::infra::consume::Outcome;
use crate::registry::processors::Runnable;
use crate::store::processing::RunResult;
use crate::store::processing::{Prior, StatusChange};
use crate::wire::Rejection;

/// One processor's run on one event, as recorded, with what the caller acts on besides.
#[derive(Debug, Clone)]
pub struct Ran {
    pub result: RunResult,
    /// The endpoint asked to wait this long before the next attempt.
    pub retry_after: Option<Duration>,
    /// The endpoint is gone (410): the processor is disabled.
    pub gone: bool,
}

/// How one run of a processor ended, before its retries are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded(String),
    /// Failed; another attempt may succeed (not before `after` when the endpoint said).
    Retryable {
        message: String,
        after: Option<Duration>,
    },
    /// Failed; another attempt cannot succeed.
    Failed(String),
    /// The endpoint is gone (410): failed, and the processor is disabled.
    Gone(String),
}

impl RunOutcome {
    pub fn retry(message: String) -> Self {
        RunOutcome::Retryable { message, after: None }
    }

    pub fn message(&self) -> &str {
        match self {
            RunOutcome::Succeeded(message)
            | RunOutcome::Retryable { message, .. }
            | RunOutcome::Failed(message)
            | RunOutcome::Gone(message) => message,
        }
    }

    pub fn into_message(self) -> String {
        match self {
            RunOutcome::Succeeded(message)
            | RunOutcome::Retryable { message, .. }
            | RunOutcome::Failed(message)
            | RunOutcome::Gone(message) => message,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RunOutcome::Retryable { after, .. } => *after,
            _ => None,
        }
    }
}

/// The recorded status of a run: a retryable failure on the last attempt is final.
pub fn result_status(outcome: &RunOutcome, last_attempt: bool) -> ResultStatus {
    match outcome {
        RunOutcome::Succeeded(_) => ResultStatus::Success,
        RunOutcome::Retryable { .. } if !last_attempt => ResultStatus::Retry,
        RunOutcome::Retryable { .. } | RunOutcome::Failed(_) | RunOutcome::Gone(_) => ResultStatus::Failed,
    }
}

/// A live attempt is the last when the processor has no retries left after it.
pub fn last_attempt(runnable: &Runnable, attempt: i32) -> bool {
    attempt > runnable.processor.max_retries
}

/// A processor that used up its retries on an earlier delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub name: String,
    pub failures: i32,
    pub last_error: Option<String>,
}

/// What earlier deliveries of an event did with its processors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earlier {
    pub succeeded: Vec<String>,
    pub exhausted: Vec<Exhausted>,
}

/// Splits an event's matching processors by what earlier attempts did: succeeded ones are not
/// run again, exhausted ones are not retried, the others run at their next attempt.
pub fn sort_out(
    event_id: Uuid,
    matching: &[Arc<Runnable>],
    prior: &HashMap<(Uuid, String), Prior>,
) -> (Vec<(Arc<Runnable>, i32)>, Earlier) {
    let mut to_run = Vec::new();
    let mut earlier = Earlier::default();
    for runnable in matching {
        let name = runnable.name().to_owned();
        match prior.get(&(event_id, name.clone())).cloned().unwrap_or_default() {
            Prior { succeeded: true, .. } => earlier.succeeded.push(name),
            Prior { exhausted: true, failures, last_error, .. } => {
                earlier.exhausted.push(Exhausted { name, failures, last_error })
            }
            Prior { failures, .. } => to_run.push((runnable.clone(), failures + 1)),
        }
    }
    (to_run, earlier)
}

/// The event's new status and what to do with its message, from what earlier deliveries did
/// and what ran now. `takes` says whether any processor takes the event; `retry_delay` is the
/// stage's schedule by attempt.
pub fn verdict(
    event_id: Uuid,
    takes: bool,
    earlier: &Earlier,
    ran: &[&Ran],
    retry_delay: impl Fn(u32) -> Duration,
) -> (StatusChange, Outcome) {
    let results = || ran.iter().map(|ran| &ran.result);
    let mut succeeded = earlier.succeeded.clone();
    succeeded.extend(results().filter(|r| r.status == ResultStatus::Success).map(|r| r.processor_name.clone()));
    let retry_count =
        results().map(|r| r.attempt - 1).chain(earlier.exhausted.iter().map(|e| e.failures - 1)).max().unwrap_or(0);
    let last_error = results()
        .rfind(|r| r.status != ResultStatus::Success)
        .map(|r| format!("{}: {}", r.processor_name, r.message.as_deref().unwrap_or("failed")))
        .or_else(|| {
            earlier.exhausted.last().map(|e| format!("{}: {}", e.name, e.last_error.as_deref().unwrap_or("failed")))
        });
    let change = |status: EventStatus, only_from: Option<Vec<EventStatus>>| StatusChange {
        event_id,
        status,
        processors: Some(succeeded.clone()),
        error_message: last_error.clone(),
        retry_count: Some(retry_count),
        only_from,
    };
    if !takes {
        // Nothing takes it: the persister stored it `pending` for a processor that is gone
        // now (the sweep's case). Only from `pending` or `processing`: nothing else moves.
        let from = vec![EventStatus::Pending, EventStatus::Processing];
        return (change(EventStatus::Processed, Some(from)), Outcome::Ack);
    }
    let retrying: Vec<&Ran> = ran.iter().copied().filter(|ran| ran.result.status == ResultStatus::Retry).collect();
    if let Some(first) = retrying.iter().map(|ran| ran.result.attempt).min() {
        // The schedule, or later when an endpoint asked for more time.
        let asked = retrying.iter().filter_map(|ran| ran.retry_after).max().unwrap_or_default();
        let after = retry_delay(first.max(1) as u32).max(asked);
        return (change(EventStatus::Processing, None), Outcome::Retry { after });
    }
    let failed: Vec<&str> = results()
        .filter(|r| r.status == ResultStatus::Failed)
        .map(|r| r.processor_name.as_str())
        .chain(earlier.exhausted.iter().map(|e| e.name.as_str()))
        .collect();
    if !failed.is_empty() {
        let detail = format!(
            "processors failed after their retries: {}; last error: {}",
            failed.join(", "),
            last_error.as_deref().unwrap_or("unknown")
        );
        return (
            change(EventStatus::Failed, None),
            Outcome::Reject(Rejection::new("processor_failed", detail).about(event_id)),
        );
    }
    (change(EventStatus::Processed, None), Outcome::Ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn ran(name: &str, attempt: i32, status: ResultStatus, retry_after: Option<Duration>) -> Ran {
        Ran {
            result: RunResult {
                event_id: Uuid::nil(),
                processor_id: name.into(),
                processor_name: name.into(),
                run_id: String::new(),
                attempt,
                status,
                message: Some(format!("{name} said so")),
                duration_ms: 1.0,
                processed_at: Utc::now(),
            },
            retry_after,
            gone: false,
        }
    }

    fn schedule(attempt: u32) -> Duration {
        Duration::from_millis(100 * u64::from(attempt))
    }

    #[test]
    fn retryable_failures_are_final_on_the_last_attempt_only() {
        let retry = RunOutcome::retry("503".into());
        assert_eq!(result_status(&retry, false), ResultStatus::Retry);
        assert_eq!(result_status(&retry, true), ResultStatus::Failed);
        assert_eq!(result_status(&RunOutcome::Failed("400".into()), false), ResultStatus::Failed);
        assert_eq!(result_status(&RunOutcome::Gone("410".into()), false), ResultStatus::Failed);
        assert_eq!(result_status(&RunOutcome::Succeeded("200".into()), true), ResultStatus::Success);
    }

    #[test]
    fn all_succeeded_means_processed() {
        let a = ran("a", 1, ResultStatus::Success, None);
        let earlier = Earlier { succeeded: vec!["b".into()], exhausted: vec![] };
        let (change, outcome) = verdict(Uuid::nil(), true, &earlier, &[&a], schedule);
        assert_eq!(outcome, Outcome::Ack);
        assert_eq!(change.status, EventStatus::Processed);
        assert_eq!(change.processors.as_deref(), Some(&["b".to_owned(), "a".to_owned()][..]));
        assert_eq!(change.error_message, None);
    }

    #[test]
    fn a_retry_waits_for_the_schedule_or_what_the_endpoint_asked() {
        let a = ran("a", 2, ResultStatus::Retry, None);
        let (change, outcome) = verdict(Uuid::nil(), true, &Earlier::default(), &[&a], schedule);
        assert_eq!(change.status, EventStatus::Processing);
        assert_eq!(outcome, Outcome::Retry { after: Duration::from_millis(200) });
        let b = ran("b", 1, ResultStatus::Retry, Some(Duration::from_secs(3)));
        let (_, outcome) = verdict(Uuid::nil(), true, &Earlier::default(), &[&a, &b], schedule);
        assert_eq!(outcome, Outcome::Retry { after: Duration::from_secs(3) });
        assert_eq!(change.retry_count, Some(1));
    }

    #[test]
    fn a_final_failure_rejects_with_the_last_error() {
        let a = ran("a", 1, ResultStatus::Success, None);
        let b = ran("b", 4, ResultStatus::Failed, None);
        let (change, outcome) = verdict(Uuid::nil(), true, &Earlier::default(), &[&a, &b], schedule);
        assert_eq!(change.status, EventStatus::Failed);
        assert_eq!(change.error_message.as_deref(), Some("b: b said so"));
        let Outcome::Reject(rejection) = outcome else { panic!("not rejected") };
        assert_eq!(rejection.code, "processor_failed");
        assert!(rejection.detail.contains("b"), "{}", rejection.detail);
        let exhausted = Earlier {
            succeeded: vec![],
            exhausted: vec![Exhausted { name: "c".into(), failures: 3, last_error: Some("boom".into()) }],
        };
        let (change, outcome) = verdict(Uuid::nil(), true, &exhausted, &[], schedule);
        assert_eq!((change.status, change.retry_count), (EventStatus::Failed, Some(2)));
        assert_eq!(change.error_message.as_deref(), Some("c: boom"));
        assert!(matches!(outcome, Outcome::Reject(_)));
    }

    #[test]
    fn an_event_nothing_takes_is_processed_unless_it_moved_on() {
        let (change, outcome) = verdict(Uuid::nil(), false, &Earlier::default(), &[], schedule);
        assert_eq!(outcome, Outcome::Ack);
        assert_eq!(change.status, EventStatus::Processed);
        assert_eq!(change.only_from, Some(vec![EventStatus::Pending, EventStatus::Processing]));
    }
}
