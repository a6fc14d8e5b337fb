//! Every NATS subject the service uses is built here, and only here.
//!
//! Reads nothing, writes nothing. Guarantees: [`event_subject`] always yields a valid,
//! wildcard-free subject of the form `events.{source}.{category}.{type tokens}`, whatever the
//! event type holds (spaces, `*`, `>`, empty tokens, control characters, non-ASCII text).

/// Subjects of the EVENTS stream.
pub const EVENTS_WILDCARD: &str = "events.>";
/// The service's own domain event announcing a stored event.
pub const EVENT_STORED: &str = "event.stored";
/// Domain events of the processor stage and of replays.
pub const EVENT_PROCESSED_SUCCESS: &str = "event.processed.success";
pub const EVENT_PROCESSED_FAILED: &str = "event.processed.failed";
pub const EVENT_REPLAY_STARTED: &str = "event.replay.started";
pub const EVENT_REPLAY_COMPLETED: &str = "event.replay.completed";
/// Replay jobs (stream JOBS).
pub const REPLAY_JOBS: &str = "jobs.replay";
pub const EVENT_SUBSCRIPTION_CREATED: &str = "event.subscription.created";
pub const EVENT_SUBSCRIPTION_DISABLED: &str = "event.subscription.disabled";
/// Core NATS: the subscriptions changed, dispatchers and senders reload them.
pub const SUBSCRIPTIONS_CHANGED: &str = "_EVSVC.subscriptions.changed";

/// Where the deliveries of one subscription queue (stream DELIVERIES).
pub fn delivery_subject(subscription_id: &str) -> String {
    format!("deliveries.{}", sanitize_token(subscription_id))
}

/// Core NATS: the persister's position in EVENTS after each commit (see [`crate::watermark`]).
pub const PERSISTED: &str = "_EVSVC.persisted";

/// Core NATS: the processor registry changed, workers reload it.
pub const PROCESSORS_CHANGED: &str = "_EVSVC.processors.changed";

/// Where a replay republishes an event for `target_service`.
pub fn replay_subject(target_service: &str, source: &str, category: &str, event_type: &str) -> String {
    let tail = event_subject(source, category, event_type);
    let tail = tail.strip_prefix("events.").unwrap_or(&tail);
    format!("replay.{}.{tail}", sanitize_token(target_service))
}

/// Prefix of the core-NATS subjects on which the persister tells a gateway that the events it
/// waits for are stored (read-your-writes). Deliberately outside every stream.
const STORED_NOTIFY_PREFIX: &str = "_EVSVC.stored";

/// Replaces characters NATS does not allow in a subject token, and the ones we keep out of
/// subjects so that they stay easy to filter on (wildcards, whitespace, non-ASCII).
pub fn sanitize_token(token: &str) -> String {
    let cleaned: String = token
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | ':' | '@' | '+' | '=' | '~' | '#' => c,
            _ => '_',
        })
        .collect();
    if cleaned.is_empty() { "_".to_owned() } else { cleaned }
}

/// `events.{source}.{category}.{type}`, with the event type's dots kept as token separators.
pub fn event_subject(source: &str, category: &str, event_type: &str) -> String {
    let mut subject = String::with_capacity(16 + source.len() + category.len() + event_type.len());
    subject.push_str("events.");
    subject.push_str(&sanitize_token(source));
    subject.push('.');
    subject.push_str(&sanitize_token(category));
    for token in event_type.split('.') {
        subject.push('.');
        subject.push_str(&sanitize_token(token));
    }
    subject
}

/// The parts of an `events.>` subject: source, category and the event type (tokens re-joined
/// with dots). `None` when the subject is not an event subject.
pub fn parse_event_subject(subject: &str) -> Option<(&str, &str, String)> {
    let mut tokens = subject.split('.');
    if tokens.next()? != "events" {
        return None;
    }
    let source = tokens.next()?;
    let category = tokens.next()?;
    let event_type = tokens.collect::<Vec<_>>().join(".");
    Some((source, category, event_type))
}

/// Where a stage puts what it could not handle.
pub fn deadletter_subject(stage: &str) -> String {
    format!("deadletter.{}", sanitize_token(stage))
}

/// The notification subject of one gateway instance.
pub fn stored_notify_subject(gateway_id: &str) -> String {
    format!("{STORED_NOTIFY_PREFIX}.{}", sanitize_token(gateway_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_valid_literal_subject(subject: &str) -> bool {
        !subject.is_empty()
            && subject.split('.').all(|token| {
                !token.is_empty()
                    && token != "*"
                    && token != ">"
                    && !token.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
            })
    }

    #[test]
    fn dots_become_tokens() {
        assert_eq!(
            event_subject("backend", "user_lifecycle", "user.registered"),
            "events.backend.user_lifecycle.user.registered"
        );
    }

    #[test]
    fn hostile_event_types_stay_literal() {
        let long = "x".repeat(300);
        for hostile in [
            "a.*.>",
            "*",
            ">",
            "with space",
            "tab\there",
            "..",
            "a..b",
            ".lead",
            "trail.",
            "",
            "ünïcødé.事件",
            "new\nline",
            long.as_str(),
            "$SYS.x",
            "a\u{0}b",
        ] {
            let subject = event_subject("frontend", "page view", hostile);
            assert!(is_valid_literal_subject(&subject), "{hostile:?} gave {subject:?}");
            assert!(subject.starts_with("events.frontend.page_view."));
        }
    }

    #[test]
    fn event_subjects_parse_back() {
        let (source, category, event_type) = parse_event_subject("events.backend.order.order.placed").unwrap();
        assert_eq!((source, category, event_type.as_str()), ("backend", "order", "order.placed"));
        assert!(parse_event_subject("event.stored").is_none());
        assert!(parse_event_subject("events.backend").is_none());
    }
}
