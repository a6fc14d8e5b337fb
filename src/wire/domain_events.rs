//! The service's own domain events on EVENT_SERVICE (`event.processed.>`, `event.replay.>`,
//! `event.subscription.>`, `event.projection.>`): every payload in one place,
//! with the subject it goes to and the `Nats-Msg-Id` that makes a repeated announcement land
//! once. Stages build these; [`crate::infra::bus::Bus::announce`] publishes them.
//!
//! Reads nothing, writes nothing. Field names here are a contract with subscribers of
//! these subjects: renaming one is a breaking change.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::message::Outgoing;
use super::subjects;
use crate::domain::{EventCategory, EventSource, EventTypePattern};

/// A domain event: where it goes and the id that deduplicates it.
pub trait DomainEvent: Serialize {
    fn subject(&self) -> &'static str;
    fn message_id(&self) -> String;

    /// The message to publish.
    fn to_message(&self) -> Result<Outgoing, serde_json::Error> {
        let payload = serde_json::to_vec(self)?;
        Ok(Outgoing::with_id(self.subject().to_owned(), &self.message_id(), payload.into()))
    }
}

/// `event.processed.success`: one processor run succeeded.
#[derive(Debug, Serialize)]
pub struct ProcessedSuccess<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub processor_name: &'a str,
    pub duration_ms: f64,
    pub run_id: &'a str,
    pub timestamp: DateTime<Utc>,
    #[serde(skip)]
    pub attempt: i32,
}

impl DomainEvent for ProcessedSuccess<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_PROCESSED_SUCCESS
    }

    fn message_id(&self) -> String {
        run_message_id(self.subject(), self.event_id, self.processor_name, self.run_id, self.attempt)
    }
}

/// `event.processed.failed`: one processor run failed for good.
#[derive(Debug, Serialize)]
pub struct ProcessedFailed<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub processor_name: &'a str,
    pub error_message: Option<&'a str>,
    pub retry_count: i32,
    pub run_id: &'a str,
    pub timestamp: DateTime<Utc>,
    #[serde(skip)]
    pub attempt: i32,
}

impl DomainEvent for ProcessedFailed<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_PROCESSED_FAILED
    }

    fn message_id(&self) -> String {
        run_message_id(self.subject(), self.event_id, self.processor_name, self.run_id, self.attempt)
    }
}

fn run_message_id(subject: &str, event_id: Uuid, processor: &str, run_id: &str, attempt: i32) -> String {
    format!("{subject}.{event_id}.{processor}.{run_id}.{attempt}")
}

/// `event.replay.started` (dry runs too: `dry_run` says which it was).
#[derive(Debug, Serialize)]
pub struct ReplayStarted<'a> {
    pub replay_id: Uuid,
    pub events_count: i64,
    pub stream_id: Option<&'a str>,
    pub target_service: Option<&'a str>,
    pub dry_run: bool,
    pub timestamp: DateTime<Utc>,
}

impl DomainEvent for ReplayStarted<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_REPLAY_STARTED
    }

    fn message_id(&self) -> String {
        format!("{}.{}", self.subject(), self.replay_id)
    }
}

/// `event.replay.completed`.
#[derive(Debug, Serialize)]
pub struct ReplayCompleted<'a> {
    pub replay_id: Uuid,
    pub events_count: i64,
    pub replayed: i64,
    pub failed: i64,
    pub stream_id: Option<&'a str>,
    pub target_service: Option<&'a str>,
    pub dry_run: bool,
    pub timestamp: DateTime<Utc>,
}

impl DomainEvent for ReplayCompleted<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_REPLAY_COMPLETED
    }

    fn message_id(&self) -> String {
        format!("{}.{}", self.subject(), self.replay_id)
    }
}

/// `event.subscription.created`.
#[derive(Debug, Serialize)]
pub struct SubscriptionCreated<'a> {
    pub subscription_id: &'a str,
    pub subscriber_name: &'a str,
    pub event_types: &'a [EventTypePattern],
    pub event_sources: Option<&'a [EventSource]>,
    pub event_categories: Option<&'a [EventCategory]>,
    pub enabled: bool,
    pub timestamp: DateTime<Utc>,
}

impl DomainEvent for SubscriptionCreated<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_SUBSCRIPTION_CREATED
    }

    fn message_id(&self) -> String {
        format!("subscription.created.{}", self.subscription_id)
    }
}

/// `event.subscription.disabled`: a subscription was disabled for its failures (each disable
/// is its own announcement).
#[derive(Debug, Serialize)]
pub struct SubscriptionDisabled<'a> {
    pub subscription_id: &'a str,
    pub reason: &'a str,
    pub timestamp: DateTime<Utc>,
}

impl DomainEvent for SubscriptionDisabled<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_SUBSCRIPTION_DISABLED
    }

    fn message_id(&self) -> String {
        format!("disabled.{}.{}", self.subscription_id, Uuid::now_v7())
    }
}

/// `event.projection.created`: a projection was materialized for the first time.
#[derive(Debug, Serialize)]
pub struct ProjectionCreated<'a> {
    pub projection_id: Uuid,
    pub projection_name: &'a str,
    pub entity_id: &'a str,
    pub entity_type: &'a str,
    pub events_count: i64,
    pub version: i64,
    pub timestamp: DateTime<Utc>,
}

impl DomainEvent for ProjectionCreated<'_> {
    fn subject(&self) -> &'static str {
        subjects::EVENT_PROJECTION_CREATED
    }

    fn message_id(&self) -> String {
        format!("projection.created.{}.{}.{}", self.projection_name, self.entity_type, self.entity_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_keyed_for_dedupe() {
        let id = Uuid::now_v7();
        let failed = ProcessedFailed {
            event_id: id,
            event_type: "t",
            processor_name: "crm",
            error_message: None,
            retry_count: 2,
            run_id: "",
            timestamp: Utc::now(),
            attempt: 3,
        };
        assert_eq!(failed.message_id(), format!("event.processed.failed.{id}.crm..3"));
        assert!(!serde_json::to_value(&failed).unwrap().as_object().unwrap().contains_key("attempt"));
    }
}
