//! Dead letters as operators see them: one by its DEADLETTER sequence, a filtered page in
//! stream order, and deletion.
//!
//! Reads DEADLETTER with JetStream's message-get API (the next message on a subject from a
//! sequence on); deletes DEADLETTER messages. Writes nothing else. Guarantees: a page is in
//! DEADLETTER order and a `next` cursor resumes it without gaps or repeats; one call reads at
//! most [`SCAN_LIMIT`] messages, so a filter that matches little still answers quickly.

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind, Stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::EventTypePattern;
use crate::infra::bus::{Bus, BusError};
use crate::wire::{headers, subjects};

/// Messages one list, purge or redrive call reads at most.
pub const SCAN_LIMIT: usize = 10_000;

/// One dead letter: where it came from, why, and the original message.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its DEADLETTER sequence: the id to show, delete or redrive it by.
    pub seq: u64,
    pub stage: String,
    pub reason_code: String,
    pub reason: String,
    pub dead_lettered_at: DateTime<Utc>,
    pub original_subject: String,
    pub original_sequence: Option<u64>,
    pub event_id: Option<Uuid>,
    pub event_type: Option<String>,
    pub subscription_id: Option<String>,
    #[serde(skip)]
    pub headers: HeaderMap,
    #[serde(skip)]
    pub payload: Bytes,
}

impl DeadLetter {
    /// Reads a DEADLETTER message; what its headers do not say stays empty.
    pub fn from_message(message: StreamMessage) -> Self {
        let header = |name: &str| message.headers.get(name).map(|value| value.as_str().to_owned());
        let stage = header(headers::STAGE)
            .or_else(|| message.subject.strip_prefix("deadletter.").map(str::to_owned))
            .unwrap_or_default();
        let original_subject = header(headers::ORIGINAL_SUBJECT).unwrap_or_default();
        let payload: Option<serde_json::Value> = serde_json::from_slice(&message.payload).ok();
        let field = |name: &str| payload.as_ref()?.get(name)?.as_str().map(str::to_owned);
        let event_id = header(headers::EVENT_ID)
            .and_then(|id| Uuid::parse_str(&id).ok())
            .or_else(|| field("event_id").and_then(|id| Uuid::parse_str(&id).ok()));
        let event_type = field("event_type")
            .or_else(|| subjects::parse_event_subject(&original_subject).map(|(_, _, event_type)| event_type));
        Self {
            seq: message.sequence,
            reason_code: header(headers::REASON_CODE).unwrap_or_default(),
            reason: header(headers::REASON).unwrap_or_default(),
            dead_lettered_at: message.time,
            original_sequence: header(headers::ORIGINAL_SEQUENCE).and_then(|seq| seq.parse().ok()),
            event_id,
            event_type,
            subscription_id: header(headers::SUBSCRIPTION),
            stage,
            original_subject,
            headers: message.headers,
            payload: message.payload,
        }
    }
}

/// Which dead letters an operator means. Every field narrows; none means all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub stage: Option<String>,
    pub reason_code: Option<String>,
    pub event_type: Option<EventTypePattern>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    /// Whether the filter says anything (a purge of everything must be asked for as such).
    pub fn is_empty(&self) -> bool {
        self.stage.is_none()
            && self.reason_code.is_none()
            && self.event_type.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    /// The DEADLETTER subject to read: one stage's, or all.
    pub fn subject(&self) -> String {
        match &self.stage {
            Some(stage) => subjects::deadletter_subject(stage),
            None => subjects::DEADLETTER_WILDCARD.to_owned(),
        }
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.stage.as_ref().is_none_or(|stage| *stage == letter.stage)
            && self.reason_code.as_ref().is_none_or(|code| *code == letter.reason_code)
            && self.event_type.as_ref().is_none_or(|pattern| {
                letter.event_type.as_deref().is_some_and(|event_type| pattern.matches(event_type))
            })
            && self.since.is_none_or(|since| letter.dead_lettered_at >= since)
            && self.until.is_none_or(|until| letter.dead_lettered_at < until)
    }
}

/// A page of dead letters; `next` (the last sequence read) resumes it when more may follow.
#[derive(Debug, Default)]
pub struct Page {
    pub letters: Vec<DeadLetter>,
    pub next: Option<u64>,
}

/// Reads DEADLETTER for the operator endpoints.
pub struct DeadLetters {
    stream: Stream<()>,
}

impl DeadLetters {
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let name = subjects::streams::DEADLETTER;
        let stream = bus
            .jetstream()
            .get_stream_no_info(name)
            .await
            .map_err(|source| BusError::StreamLookup { name: name.to_owned(), source })?;
        Ok(Self { stream })
    }

    /// One dead letter; `None` when there is none at `seq`.
    pub async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, BusError> {
        match self.stream.get_raw_message(seq).await {
            Ok(message) if message.subject.starts_with("deadletter.") => Ok(Some(DeadLetter::from_message(message))),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(read_error(seq, error)),
        }
    }

    /// Up to `limit` dead letters matching `filter`, after sequence `after`.
    pub async fn page(&self, filter: &Filter, after: u64, limit: usize) -> Result<Page, BusError> {
        let subject = filter.subject();
        let mut page = Page::default();
        let mut from = after.saturating_add(1);
        for _ in 0..SCAN_LIMIT {
            let message = self.stream.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send();
            let letter = match message.await {
                Ok(message) => DeadLetter::from_message(message),
                Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(page),
                Err(error) => return Err(read_error(from, error)),
            };
            from = letter.seq + 1;
            if filter.matches(&letter) {
                page.letters.push(letter);
                if page.letters.len() >= limit {
                    break;
                }
            }
        }
        page.next = Some(from - 1);
        Ok(page)
    }

    /// Deletes one dead letter; `false` when there was none at `seq`.
    pub async fn delete(&self, seq: u64) -> Result<bool, BusError> {
        match self.stream.delete_message(seq).await {
            Ok(deleted) => Ok(deleted),
            Err(error) => match error.kind() {
                DeleteMessageErrorKind::JetStream(cause) if cause.error_code() == ErrorCode::NO_MESSAGE_FOUND => {
                    Ok(false)
                }
                _ => Err(BusError::Delete {
                    stream: subjects::streams::DEADLETTER.to_owned(),
                    sequence: seq,
                    source: error,
                }),
            },
        }
    }
}

fn read_error(sequence: u64, error: async_nats::jetstream::stream::RawMessageError) -> BusError {
    BusError::ReadRaw { stream: subjects::streams::DEADLETTER.to_owned(), sequence, source: error }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(stage: &str, code: &str, event_type: Option<&str>, at: &str) -> DeadLetter {
        DeadLetter {
            seq: 1,
            stage: stage.into(),
            reason_code: code.into(),
            reason: String::new(),
            dead_lettered_at: at.parse().unwrap(),
            original_subject: String::new(),
            original_sequence: None,
            event_id: None,
            event_type: event_type.map(str::to_owned),
            subscription_id: None,
            headers: HeaderMap::new(),
            payload: Bytes::new(),
        }
    }

    #[test]
    fn every_field_of_a_filter_narrows() {
        let poison = letter("persister", "invalid_json", Some("order.placed"), "2026-12-01T10:00:00Z");
        assert!(Filter::default().matches(&poison));
        let stage = |stage: &str| Filter { stage: Some(stage.into()), ..Filter::default() };
        assert!(stage("persister").matches(&poison) && !stage("sender").matches(&poison));
        let code = Filter { reason_code: Some("processor_failed".into()), ..Filter::default() };
        assert!(!code.matches(&poison));
        let pattern =
            |text: &str| Filter { event_type: Some(EventTypePattern::parse(text).unwrap()), ..Filter::default() };
        assert!(pattern("order.*").matches(&poison) && !pattern("user.*").matches(&poison));
        assert!(!pattern("*").matches(&letter("persister", "invalid_json", None, "2026-12-01T10:00:00Z")));
        let since = Filter { since: Some("2026-12-01T10:00:00Z".parse().unwrap()), ..Filter::default() };
        let until = Filter { until: Some("2026-12-01T10:00:00Z".parse().unwrap()), ..Filter::default() };
        assert!(since.matches(&poison) && !until.matches(&poison), "since is inclusive, until exclusive");
        assert_eq!(stage("sender").subject(), "deadletter.sender");
        assert_eq!(Filter::default().subject(), "deadletter.>");
    }

    /// The event type `from_message` reads from a dead letter of this original.
    fn event_type_of(original_subject: &str, payload: &[u8]) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(headers::ORIGINAL_SUBJECT, original_subject);
        let message = StreamMessage {
            subject: "deadletter.persister".into(),
            sequence: 1,
            headers,
            payload: Bytes::copy_from_slice(payload),
            time: chrono::Utc::now(),
        };
        DeadLetter::from_message(message).event_type
    }

    #[test]
    fn the_event_type_comes_from_the_payload_or_the_event_subject() {
        assert_eq!(event_type_of("deliveries.s1", br#"{"event_type": "a.b"}"#).as_deref(), Some("a.b"));
        assert_eq!(event_type_of("events.backend.user_action.x.y", b"{not json").as_deref(), Some("x.y"));
        assert_eq!(event_type_of("jobs.replay", b"[]"), None);
    }
}
