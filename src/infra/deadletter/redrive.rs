//! What putting a dead letter back means, decided per stage: each route re-enters only the
//! stage that refused the message, so what other stages already did is not done twice.
//!
//! Reads a [`DeadLetter`]; writes nothing (the gateway carries the route out). Guarantees: a
//! republished message carries `Nats-Msg-Id` `redrive.{seq}` (redriving the same dead letter
//! twice lands once) and keeps the producer's own id in `Event-Service-Original-Msg-Id`, from
//! which an event without an `event_id` takes the same id it would have had.

use async_nats::HeaderMap;
use bytes::Bytes;
use uuid::Uuid;

use super::letters::DeadLetter;
use crate::wire::{Outgoing, headers, subjects};

/// How one dead letter goes back.
#[derive(Debug)]
pub enum Route {
    /// The persister or the replayer refused it: publish it again where it was (EVENTS, JOBS).
    Republish(Outgoing),
    /// The sender gave up: queue the delivery again, with a fresh attempt budget.
    Requeue { subscription_id: String, event_id: Uuid },
    /// A processor failed: run the processors that failed again (a replay job of this event).
    Reprocess { event_id: Uuid },
    /// It cannot go back.
    Refuse { code: &'static str, detail: String },
}

/// The headers of a dead letter that describe the dead-lettering, not the original.
const DEAD_LETTER_HEADERS: [&str; 6] = [
    headers::STAGE,
    headers::REASON_CODE,
    headers::REASON,
    headers::ORIGINAL_SUBJECT,
    headers::ORIGINAL_SEQUENCE,
    // A gateway waiting for this event gave up long ago.
    headers::NOTIFY,
];

/// The route of `letter`; `replacement` is a corrected payload (republished messages only).
pub fn route(letter: &DeadLetter, replacement: Option<Bytes>) -> Route {
    let refuse = |code, detail: &str| Route::Refuse { code, detail: detail.to_owned() };
    let republishes = match letter.stage.as_str() {
        "persister" => letter.original_subject.starts_with("events."),
        "replayer" => letter.original_subject == subjects::REPLAY_JOBS,
        _ => false,
    };
    if republishes {
        let replaced = replacement.is_some();
        let payload = replacement.unwrap_or_else(|| letter.payload.clone());
        return Route::Republish(republished(letter, payload, replaced));
    }
    if replacement.is_some() {
        return refuse(
            "payload_not_applicable",
            "only messages the persister or the replayer refused are republished; this one is redriven from the store",
        );
    }
    match (letter.stage.as_str(), letter.event_id, &letter.subscription_id) {
        ("sender", Some(event_id), Some(subscription_id)) => {
            Route::Requeue { subscription_id: subscription_id.clone(), event_id }
        }
        ("processor", Some(event_id), _) => Route::Reprocess { event_id },
        ("sender" | "processor", _, _) => {
            refuse("not_redrivable", "the dead letter does not say which event it is about")
        }
        _ => refuse("not_redrivable", "this stage's dead letters cannot be redriven; delete them when understood"),
    }
}

/// The original message again, as its producer sent it, with the redrive's dedupe id. A
/// replaced payload loses the gateway's mark, so the persister checks it against its schema.
fn republished(letter: &DeadLetter, payload: Bytes, replaced: bool) -> Outgoing {
    let mut copied = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name_text: &str = name.as_ref();
        let dropped = DEAD_LETTER_HEADERS.iter().any(|header| header.eq_ignore_ascii_case(name_text))
            || name_text.eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref())
            || (replaced && name_text.eq_ignore_ascii_case(headers::INGEST));
        if !dropped {
            for value in values {
                copied.append(name.clone(), value.clone());
            }
        }
    }
    copied.insert(async_nats::header::NATS_MESSAGE_ID, format!("redrive.{}", letter.seq).as_str());
    copied.insert(headers::REDRIVEN_FROM, letter.seq.to_string().as_str());
    Outgoing { subject: letter.original_subject.clone(), headers: copied, payload }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(stage: &str, original_subject: &str) -> DeadLetter {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("Nats-Msg-Id", "persister.EVENTS.7"),
            (headers::ORIGINAL_MSG_ID, "order-7"),
            (headers::STAGE, stage),
            (headers::REASON_CODE, "invalid_json"),
            (headers::NOTIFY, "_EVSVC.stored.g1"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ] {
            headers.insert(name, value);
        }
        DeadLetter {
            seq: 12,
            stage: stage.into(),
            reason_code: "invalid_json".into(),
            reason: String::new(),
            dead_lettered_at: chrono::Utc::now(),
            original_subject: original_subject.into(),
            original_sequence: Some(7),
            event_id: None,
            event_type: None,
            subscription_id: None,
            headers,
            payload: Bytes::from_static(b"{oops"),
        }
    }

    #[test]
    fn a_persister_dead_letter_is_republished_as_its_producer_sent_it() {
        let Route::Republish(message) = route(&letter("persister", "events.backend.user_action.x"), None) else {
            panic!("not republished");
        };
        assert_eq!(message.subject, "events.backend.user_action.x");
        assert_eq!(message.payload.as_ref(), b"{oops");
        let header = |name: &str| message.headers.get(name).map(|value| value.as_str().to_owned());
        assert_eq!(header("Nats-Msg-Id").as_deref(), Some("redrive.12"));
        assert_eq!(header(headers::ORIGINAL_MSG_ID).as_deref(), Some("order-7"));
        assert_eq!(header(headers::REDRIVEN_FROM).as_deref(), Some("12"));
        assert!(header("traceparent").is_some(), "the trace goes on");
        assert_eq!((header(headers::STAGE), header(headers::REASON_CODE), header(headers::NOTIFY)), (None, None, None));

        let fixed = Bytes::from_static(br#"{"event_type": "x"}"#);
        let Route::Republish(message) = route(&letter("persister", "events.a.b.x"), Some(fixed.clone())) else {
            panic!("not republished");
        };
        assert_eq!(message.payload, fixed);
    }

    #[test]
    fn each_stage_goes_back_its_own_way() {
        let event_id = Uuid::now_v7();
        let mut sender = letter("sender", "deliveries.s1");
        assert!(matches!(route(&sender, None), Route::Refuse { code: "not_redrivable", .. }));
        sender.event_id = Some(event_id);
        sender.subscription_id = Some("s1".into());
        assert!(matches!(route(&sender, None), Route::Requeue { ref subscription_id, .. } if subscription_id == "s1"));
        assert!(matches!(route(&sender, Some(Bytes::new())), Route::Refuse { code: "payload_not_applicable", .. }));
        let mut processor = letter("processor", "events.a.b.x");
        processor.event_id = Some(event_id);
        assert!(matches!(route(&processor, None), Route::Reprocess { event_id: id } if id == event_id));
        assert!(matches!(route(&letter("replayer", "jobs.replay"), None), Route::Republish(_)));
        assert!(matches!(route(&letter("persister", "deliveries.x"), None), Route::Refuse { .. }));
        assert!(matches!(route(&letter("projector", "events.a.b.x"), None), Route::Refuse { .. }));
    }
}
