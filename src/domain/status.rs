//! The states things move through: an event's processing status, a processor run's result,
//! a delivery attempt's outcome, a replay job's and a projection definition's progress.
//!
//! Reads nothing, writes nothing. Each is a [`string_enum!`](super::kinds::string_enum), so the
//! database's text and the API's JSON are the same names, and a stored name the code does not
//! know is a decoding error, never a silent default.

use super::kinds::string_enum;

string_enum!(
    /// Processing status; the only part of a stored event that changes.
    EventStatus {
        Pending => "pending",
        Processing => "processing",
        Processed => "processed",
        Failed => "failed",
        Archived => "archived",
    }
);

string_enum!(
    /// How one processor run ended (`processing_results.status`).
    ResultStatus {
        Success => "success",
        /// Failed for good (no retries left).
        Failed => "failed",
        Skipped => "skipped",
        /// Failed; will be tried again.
        Retry => "retry",
    }
);

string_enum!(
    /// How one delivery attempt ended (`delivery_attempts.status`).
    DeliveryStatus {
        Delivered => "delivered",
        /// Failed; will be tried again.
        Retry => "retry",
        /// Failed for good.
        Failed => "failed",
        /// The callback address was refused by the guard.
        Refused => "refused",
        /// Not attempted: the subscription is disabled or has no callback URL.
        Skipped => "skipped",
    }
);

string_enum!(
    /// Where a replay job is (`replay_jobs.status`).
    JobStatus {
        Queued => "queued",
        Running => "running",
        Completed => "completed",
        /// Allowed by the schema; no version of the replayer sets it yet.
        Failed => "failed",
    }
);

string_enum!(
    /// Where a projection definition is (`projection_definitions.status`).
    DefinitionStatus {
        /// Folding the stored history (new, or being rebuilt).
        CatchingUp => "catching_up",
        /// Up to date; folded as events arrive.
        Live => "live",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_use_their_stored_names() {
        assert_eq!(EventStatus::parse("processed"), Some(EventStatus::Processed));
        assert_eq!(DefinitionStatus::CatchingUp.as_str(), "catching_up");
        assert_eq!(serde_json::to_value(DeliveryStatus::Refused).unwrap(), "refused");
        assert_eq!(ResultStatus::parse("retry"), Some(ResultStatus::Retry));
        assert_eq!(JobStatus::parse("done"), None);
    }
}
