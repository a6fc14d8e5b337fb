//! The persister's decisions, as pure functions of where the store and STORED are and what
//! arrived.
//!
//! Reads nothing, writes nothing.

use std::collections::HashSet;
use std::time::Duration;

use crate::domain::EventStatus;

/// What one attempt at a batch does, from the stored position and the batch's stream
/// sequences (ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Indices of messages at or below the position: stored already (redeliveries).
    pub stored: Vec<usize>,
    /// Indices of messages to store now.
    pub store: Vec<usize>,
    /// Indices of messages beyond what this attempt can store (a gap too long to fill at
    /// once): handed back to come again at once.
    pub later: Vec<usize>,
    /// Sequences the consumer has not delivered (yet) that must be read from the stream and
    /// stored first: a lost delivery comes back only after the ack wait.
    pub missing: Vec<u64>,
    /// Where the position moves; `None` when there is nothing new to store.
    pub advance_to: Option<u64>,
}

/// Plans an attempt. `catch_up_to` asks for everything up to that sequence even when no
/// message of the batch reaches it (the idle catch-up); `max_fill` bounds how many missing
/// messages one attempt reads.
pub fn plan(stored_up_to: u64, seqs: &[u64], catch_up_to: u64, max_fill: usize) -> Plan {
    let (stored, fresh): (Vec<usize>, Vec<usize>) = (0..seqs.len()).partition(|&i| seqs[i] <= stored_up_to);
    let last = fresh.last().map_or(catch_up_to, |&i| seqs[i].max(catch_up_to));
    if last <= stored_up_to {
        return Plan { stored, store: Vec::new(), later: Vec::new(), missing: Vec::new(), advance_to: None };
    }
    let have: HashSet<u64> = fresh.iter().map(|&i| seqs[i]).collect();
    let missing: Vec<u64> = (stored_up_to + 1..=last).filter(|seq| !have.contains(seq)).take(max_fill).collect();
    // A gap too long to fill at once: store up to where it is filled, the rest later.
    let advance_to = match missing.last() {
        Some(&checked) if missing.len() == max_fill => checked.min(last),
        _ => last,
    };
    let (store, later) = fresh.into_iter().partition(|&i| seqs[i] <= advance_to);
    Plan { stored, store, later, missing, advance_to: Some(advance_to) }
}

/// The status an event is stored with: `pending` for the processor stage when an enabled
/// processor takes it, else `processed` at once (nothing to wait for).
pub fn initial_status(taken_by_a_processor: bool) -> EventStatus {
    if taken_by_a_processor { EventStatus::Pending } else { EventStatus::Processed }
}

/// Where STORED ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// STORED's last sequence: the next message is published expecting it.
    pub stored_last: u64,
    /// Every stored row whose EVENTS sequence is at or below this one is on STORED.
    pub through: u64,
}

/// From where the persister publishes to STORED after a restart: the EVENTS sequence on
/// STORED's last message (`on_stored`) when there is one, else what was `recorded` in
/// PostgreSQL. Never beyond the stored position: a STORED message from beyond it means EVENTS
/// was recreated and numbers anew, and then only the recorded position (reset with it) holds.
pub fn stored_resume_point(on_stored: Option<u64>, recorded: u64, stored_position: u64) -> u64 {
    match on_stored {
        Some(last) if last <= stored_position => last.max(recorded).min(stored_position),
        _ => recorded.min(stored_position),
    }
}

/// The rows `(after, through]` STORED passes over when it resumes: stored while it was off
/// (recorded as announced beyond its last message). `None` when there are none, or when
/// STORED's last message is from before EVENTS was recreated.
pub fn passed_over(on_stored: Option<u64>, recorded: u64, stored_position: u64) -> Option<(u64, u64)> {
    let last = on_stored.filter(|&last| last <= stored_position)?;
    let through = stored_resume_point(on_stored, recorded, stored_position);
    (through > last).then_some((last, through))
}

/// What a write records as on STORED (`announced_seq`), given how far this instance knows
/// STORED holds the rows (`None`: it has not looked yet): what it has published, or with
/// STORED off, every row up to the write's end. The rows stored while STORED is off are never
/// published, also not once it is on again: it goes on from the rows stored after. Until it
/// has looked, it records nothing: rows an earlier run stored with STORED on may still wait
/// to be published.
pub fn announced_with_write(publishing: bool, known: Option<u64>, advance_to: u64) -> u64 {
    match (publishing, known) {
        (true, known) => known.unwrap_or(0),
        (false, Some(known)) => advance_to.max(known),
        (false, None) => 0,
    }
}

/// With STORED off, whether to stop trying to publish an earlier run's rows after failing
/// for `failing_for`.
pub fn give_up_settling(failing_for: Duration, patience: Duration) -> bool {
    failing_for >= patience
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_continues_the_position_is_stored_whole() {
        let plan = plan(10, &[11, 12, 13], 0, 100);
        assert_eq!(plan.store, [0, 1, 2]);
        assert!(plan.stored.is_empty() && plan.later.is_empty() && plan.missing.is_empty());
        assert_eq!(plan.advance_to, Some(13));
    }

    #[test]
    fn redeliveries_are_answered_for_not_stored_again() {
        let plan = plan(12, &[11, 12, 13], 0, 100);
        assert_eq!((plan.stored, plan.store), (vec![0, 1], vec![2]));
        let nothing_new = super::plan(20, &[11, 12], 0, 100);
        assert_eq!(nothing_new.advance_to, None);
        assert_eq!(nothing_new.stored, [0, 1]);
    }

    #[test]
    fn gaps_before_and_inside_the_batch_are_read_first() {
        let plan = plan(10, &[13, 15], 0, 100);
        assert_eq!(plan.missing, [11, 12, 14]);
        assert_eq!(plan.advance_to, Some(15));
        assert_eq!(plan.store, [0, 1]);
    }

    #[test]
    fn a_gap_too_long_is_filled_in_parts() {
        let plan = plan(0, &[10, 20], 0, 3);
        assert_eq!(plan.missing, [1, 2, 3]);
        assert_eq!(plan.advance_to, Some(3));
        assert_eq!((plan.store, plan.later), (vec![], vec![0, 1]));
    }

    #[test]
    fn the_idle_catch_up_reads_what_nobody_delivered() {
        let plan = plan(5, &[], 8, 100);
        assert_eq!(plan.missing, [6, 7, 8]);
        assert_eq!(plan.advance_to, Some(8));
        assert_eq!(super::plan(8, &[], 8, 100).advance_to, None);
    }

    #[test]
    fn status_and_announcements() {
        assert_eq!(initial_status(true), EventStatus::Pending);
        assert_eq!(initial_status(false), EventStatus::Processed);
    }

    #[test]
    fn with_stored_off_a_write_marks_its_rows_announced() {
        assert_eq!(announced_with_write(true, Some(40), 50), 40, "published rows only");
        assert_eq!(announced_with_write(true, None, 50), 0);
        assert_eq!(announced_with_write(false, Some(40), 50), 50);
        // Not before the earlier run's rows are published: they may still wait.
        assert_eq!(announced_with_write(false, None, 50), 0);
        // Once on again, STORED goes on after the rows stored while it was off.
        assert_eq!(stored_resume_point(Some(30), announced_with_write(false, Some(40), 50), 50), 50);
        assert_eq!(passed_over(Some(30), 50, 50), Some((30, 50)));
    }

    #[test]
    fn only_rows_stored_while_off_are_passed_over() {
        assert_eq!(passed_over(Some(50), 40, 60), None, "the record lags STORED");
        assert_eq!(passed_over(None, 40, 60), None, "nothing on STORED to compare");
        assert_eq!(passed_over(Some(5_000), 40, 60), None, "EVENTS recreated");
    }

    #[test]
    fn an_earlier_runs_rows_hold_acks_for_a_while_only() {
        let patience = Duration::from_secs(30);
        assert!(!give_up_settling(Duration::from_secs(29), patience));
        assert!(give_up_settling(patience, patience));
    }

    #[test]
    fn stored_resumes_after_its_last_message() {
        // STORED's last message knows best; the recorded position lags behind it.
        assert_eq!(stored_resume_point(Some(90), 80, 100), 90);
        // Every message expired: the recorded position.
        assert_eq!(stored_resume_point(None, 80, 100), 80);
        // EVENTS recreated: STORED's last message is from the old numbering.
        assert_eq!(stored_resume_point(Some(5_000), 0, 100), 0);
        assert_eq!(stored_resume_point(None, 500, 100), 100);
    }
}
