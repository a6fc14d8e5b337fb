//! Batches that are not all or nothing (frontend batches, the RudderStack webhook, the
//! tracking API): the valid items are published, the invalid ones reported by index.
//!
//! Reads nothing; writes `events.>` ([`Sorted::publish`]). Guarantees: the answer lists every
//! rejected item with all its field errors; the accepted ones are in JetStream (PubAck) before
//! it goes out.

use serde::Serialize;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use crate::domain::{Event, FieldError};
use crate::wire::{Outgoing, TraceContext};

/// An item that was not accepted, and why.
#[derive(Debug, Serialize)]
pub struct Rejected {
    pub index: usize,
    pub errors: Vec<FieldError>,
}

/// A batch's items, sorted into messages to publish and rejections.
#[derive(Default)]
pub struct Sorted {
    pub messages: Vec<Outgoing>,
    pub event_ids: Vec<Uuid>,
    pub rejected: Vec<Rejected>,
}

impl Sorted {
    /// Takes item `index`: its message, or why it has none.
    pub fn push(&mut self, index: usize, item: Result<(Outgoing, Uuid), Vec<FieldError>>) {
        match item {
            Ok((message, event_id)) => {
                self.messages.push(message);
                self.event_ids.push(event_id);
            }
            Err(errors) => self.rejected.push(Rejected { index, errors }),
        }
    }

    /// Nothing could be accepted, though something was sent: the rejections as one error,
    /// fields named by index (`[2].event`).
    pub fn nothing_accepted(&self) -> Option<Vec<FieldError>> {
        (self.messages.is_empty() && !self.rejected.is_empty()).then(|| {
            self.rejected
                .iter()
                .flat_map(|rejected| {
                    let prefix = format!("[{}]", rejected.index);
                    rejected.errors.iter().cloned().map(move |error| error.nested(&prefix))
                })
                .collect()
        })
    }

    /// Publishes the accepted items within `trace` and counts them accepted through `path`;
    /// returns their ids and the rejections.
    pub async fn publish(
        self,
        state: &AppState,
        path: &'static str,
        trace: &TraceContext,
    ) -> Result<(Vec<Uuid>, Vec<Rejected>), ApiError> {
        let _admitted = state.admit(path, self.messages.len()).await?;
        let mut new = 0;
        let mut failed = None;
        let messages = self.messages.into_iter().map(|message| message.with_trace(trace)).collect();
        for result in state.bus.publish_all(messages).await {
            match result {
                Ok(stored) => new += usize::from(!stored.duplicate),
                Err(error) => failed = failed.or(Some(error)),
            }
        }
        state.bus.metrics().accepted(path, new);
        match failed {
            Some(error) => Err(ApiError::publish_failed(error, || self.event_ids.clone())),
            None => Ok((self.event_ids, self.rejected)),
        }
    }
}

impl AppState {
    /// An item's message, or its errors when it does not match its schema or is too large to
    /// be an event.
    pub(super) fn item_message(&self, mut event: Event) -> Result<(Outgoing, Uuid), Vec<FieldError>> {
        self.conform(&mut event)?;
        match self.event_message(&event) {
            Ok(message) => Ok((message, event.event_id)),
            Err(ApiError::EventTooLarge(detail)) => Err(vec![FieldError::new("", detail)]),
            Err(other) => Err(vec![FieldError::new("", other.to_string())]),
        }
    }
}
