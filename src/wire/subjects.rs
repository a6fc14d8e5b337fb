//! Every NATS stream name and subject the service uses is named or built here, and only here.
//!
//! Reads nothing, writes nothing. Guarantees: [`event_subject`] always yields a valid,
//! wildcard-free subject of the form `events.{source}.{category}.{type tokens}`, whatever the
//! event type holds (spaces, `*`, `>`, empty tokens, control characters, non-ASCII text).

/// The JetStream streams (their files are `jetstream/streams/{NAME}.json`).
pub mod streams {
    /// What producers sent, the log every stage reads.
    pub const EVENTS: &str = "EVENTS";
    /// The service's own domain events (`event.processed.>`, `event.replay.>`, ...).
    pub const EVENT_SERVICE: &str = "EVENT_SERVICE";
    /// Every stored event, as stored, in the persister's order (`event.stored.>`): the public
    /// stream for downstream JetStream consumers.
    pub const STORED: &str = "STORED";
    /// What a stage could not handle (`deadletter.{stage}`).
    pub const DEADLETTER: &str = "DEADLETTER";
    /// Replay jobs.
    pub const JOBS: &str = "JOBS";
    /// One message per (event, subscription) to deliver.
    pub const DELIVERIES: &str = "DELIVERIES";
}

/// Subjects of the DEADLETTER stream.
pub const DEADLETTER_WILDCARD: &str = "deadletter.>";
/// Subjects of the EVENTS stream.
pub const EVENTS_WILDCARD: &str = "events.>";
/// A subject of EVENTS that no event is published on (the gateway's have at least three
/// tokens after `events.`): the filter of a consumer that is to take no events.
pub const EVENTS_NONE: &str = "events._none";
/// Subjects of the STORED stream.
pub const STORED_WILDCARD: &str = "event.stored.>";
/// Domain events of the processor stage and of replays.
pub const EVENT_PROCESSED_SUCCESS: &str = "event.processed.success";
pub const EVENT_PROCESSED_FAILED: &str = "event.processed.failed";
pub const EVENT_REPLAY_STARTED: &str = "event.replay.started";
pub const EVENT_REPLAY_COMPLETED: &str = "event.replay.completed";
pub const EVENT_SUBSCRIPTION_CREATED: &str = "event.subscription.created";
pub const EVENT_SUBSCRIPTION_DISABLED: &str = "event.subscription.disabled";
pub const EVENT_PROJECTION_CREATED: &str = "event.projection.created";
/// Replay jobs (stream JOBS).
pub const REPLAY_JOBS: &str = "jobs.replay";

/// Core NATS: the persister's position in EVENTS after each commit (see
/// [`crate::stages::watermark`]).
pub const PERSISTED: &str = "_EVSVC.persisted";
/// Core NATS: the processor registry changed, workers reload it.
pub const PROCESSORS_CHANGED: &str = "_EVSVC.processors.changed";
/// Core NATS: the subscriptions changed, dispatchers and senders reload them.
pub const SUBSCRIPTIONS_CHANGED: &str = "_EVSVC.subscriptions.changed";
/// Core NATS: the projection definitions changed, projectors reload them.
pub const DEFINITIONS_CHANGED: &str = "_EVSVC.definitions.changed";
/// Core NATS: the schema registry changed, gateways and persisters reload it.
pub const SCHEMAS_CHANGED: &str = "_EVSVC.schemas.changed";
/// Prefix of the core-NATS subjects on which the persister tells a gateway that the events it
/// waits for are stored (read-your-writes). Deliberately outside every stream.
const STORED_NOTIFY_PREFIX: &str = "_EVSVC.stored";

/// Subject prefixes a processor may not send to: they would feed the pipeline its own output.
pub const RESERVED_PREFIXES: &[&str] =
    &["events.", "event.", "deadletter.", "jobs.", "deliveries.", "$JS.", "$SYS.", "_INBOX.", "_EVSVC."];

/// Where the deliveries of one subscription queue (stream DELIVERIES).
pub fn delivery_subject(subscription_id: &str) -> String {
    format!("deliveries.{}", sanitize_token(subscription_id))
}

/// Where a replay republishes an event for `target_service`.
pub fn replay_subject(target_service: &str, source: &str, category: &str, event_type: &str) -> String {
    subject_of(&format!("replay.{}.", sanitize_token(target_service)), source, category, event_type)
}

/// Where the persister publishes a stored event (stream STORED):
/// `event.stored.{source}.{category}.{type}`.
pub fn stored_subject(source: &str, category: &str, event_type: &str) -> String {
    subject_of("event.stored.", source, category, event_type)
}

/// Where a stage puts what it could not handle.
pub fn deadletter_subject(stage: &str) -> String {
    format!("deadletter.{}", sanitize_token(stage))
}

/// The stages that dead-letter, by name (`deadletter.{stage}`).
pub const DEADLETTER_STAGES: [&str; 6] = ["persister", "processor", "replayer", "dispatcher", "sender", "projector"];

/// One of [`DEADLETTER_STAGES`], as a metric label takes it (anything else is `other`).
pub fn deadletter_stage(stage: &str) -> &'static str {
    DEADLETTER_STAGES.into_iter().find(|known| *known == stage).unwrap_or("other")
}

/// The notification subject of one gateway instance.
pub fn stored_notify_subject(gateway_id: &str) -> String {
    format!("{STORED_NOTIFY_PREFIX}.{}", sanitize_token(gateway_id))
}

/// Where a processor of kind `nats` is asked when its config names no subject.
pub fn processor_subject(processor_name: &str) -> String {
    format!("processors.{processor_name}")
}

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

/// The dot-separated tokens of an event type, each sanitized.
pub fn type_tokens(event_type: &str) -> String {
    event_type.split('.').map(sanitize_token).collect::<Vec<_>>().join(".")
}

/// `events.{source}.{category}.{type}`, with the event type's dots kept as token separators.
pub fn event_subject(source: &str, category: &str, event_type: &str) -> String {
    subject_of("events.", source, category, event_type)
}

/// `{prefix}{source}.{category}.{type}`; `prefix` ends with a dot.
fn subject_of(prefix: &str, source: &str, category: &str, event_type: &str) -> String {
    let mut subject = String::with_capacity(prefix.len() + 8 + source.len() + category.len() + event_type.len());
    subject.push_str(prefix);
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

/// Whether `subject` is a literal subject (dot-separated non-empty tokens, no wildcards, no
/// white space) that the service lets a processor send to.
pub fn check_outgoing_subject(subject: &str) -> Result<(), String> {
    let valid = !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    if !valid {
        return Err("must be a NATS subject without wildcards (dot-separated, non-empty tokens)".to_owned());
    }
    if let Some(prefix) = RESERVED_PREFIXES.iter().find(|prefix| subject.starts_with(**prefix)) {
        return Err(format!("may not start with {prefix} (reserved for the service)"));
    }
    Ok(())
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
        assert_eq!(type_tokens("a b.c*"), "a_b.c_");
        assert_eq!(stored_subject("backend", "order", "order.placed"), "event.stored.backend.order.order.placed");
        assert_eq!(replay_subject("crm app", "backend", "order", "o.p"), "replay.crm_app.backend.order.o.p");
    }

    #[test]
    fn dead_letter_stages_are_known_or_other() {
        assert_eq!(deadletter_subject("sender"), "deadletter.sender");
        assert_eq!(deadletter_stage("sender"), "sender");
        assert_eq!(deadletter_stage("a stage from a newer version"), "other");
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
        assert!(parse_event_subject("event.stored.backend.user_action.a").is_none());
        assert!(parse_event_subject("events.backend").is_none());
    }

    #[test]
    fn processors_may_not_feed_the_pipeline() {
        assert!(check_outgoing_subject("crm.sync").is_ok());
        assert!(check_outgoing_subject("events.x").is_err());
        assert!(check_outgoing_subject("deliveries.x").is_err());
        assert!(check_outgoing_subject("a.*").is_err());
        assert!(check_outgoing_subject("a..b").is_err());
    }
}
