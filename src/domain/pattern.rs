//! Event-type patterns, the one rule every filter uses (processor filters, subscriptions,
//! projection definitions, the subscription list's `event_type` query).
//!
//! Reads nothing, writes nothing. The rule: a pattern is dot-separated, non-empty tokens; a
//! token is literal text, `*` (exactly one token) or, as the last token only, `>` (one or more
//! tokens), as NATS subjects have them. A pattern without wildcards matches that one event type.
//! At most 255 characters, no control characters, not blank.

use serde::{Deserialize, Serialize};

/// A checked event-type pattern. Built with [`EventTypePattern::parse`] at the edge; stored
/// patterns are read back as they are (they were checked when written).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct EventTypePattern(String);

/// Why a text is not a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must not be blank")]
    Blank,
    #[error("must be at most 255 characters")]
    TooLong,
    #[error("must not contain control characters")]
    Control,
    #[error("must not have empty tokens (a leading, trailing or double dot)")]
    EmptyToken,
    #[error("may use * and > only as whole tokens, and > only last (like user.* or order.>)")]
    Wildcard,
}

impl EventTypePattern {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.trim().is_empty() {
            return Err(PatternError::Blank);
        }
        if text.chars().count() > Self::MAX_CHARS {
            return Err(PatternError::TooLong);
        }
        if text.chars().any(char::is_control) {
            return Err(PatternError::Control);
        }
        let tokens: Vec<&str> = text.split('.').collect();
        for (index, token) in tokens.iter().enumerate() {
            match *token {
                "" => return Err(PatternError::EmptyToken),
                ">" if index + 1 == tokens.len() => {}
                "*" => {}
                token if token.contains('*') || token.contains('>') => return Err(PatternError::Wildcard),
                _ => {}
            }
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// NATS wildcard semantics over the dot-separated type.
    pub fn matches(&self, event_type: &str) -> bool {
        matches(&self.0, event_type)
    }
}

impl std::fmt::Display for EventTypePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` is one token, a final `>` one or more; anything else compares literally.
fn matches(pattern: &str, event_type: &str) -> bool {
    if !pattern.contains('*') && !pattern.contains('>') {
        return pattern == event_type;
    }
    let mut tokens = event_type.split('.');
    for wanted in pattern.split('.') {
        if wanted == ">" {
            return tokens.next().is_some();
        }
        match tokens.next() {
            Some(token) if wanted == "*" || wanted == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> EventTypePattern {
        EventTypePattern::parse(text).unwrap()
    }

    #[test]
    fn wildcards_follow_nats() {
        assert!(pattern("user.created").matches("user.created"));
        assert!(!pattern("user.created").matches("user.created.v2"));
        assert!(pattern("user.*").matches("user.created"));
        assert!(!pattern("user.*").matches("user.created.v2"));
        assert!(!pattern("user.*").matches("user"));
        assert!(pattern("order.>").matches("order.placed"));
        assert!(pattern("order.>").matches("order.placed.eu"));
        assert!(!pattern("order.>").matches("order"));
        assert!(pattern("*.created").matches("user.created"));
        assert!(pattern(">").matches("anything.at.all"));
        assert!(pattern("Signup Form Submitted").matches("Signup Form Submitted"));
    }

    #[test]
    fn one_rule_for_every_filter() {
        for (text, problem) in [
            ("", PatternError::Blank),
            ("  ", PatternError::Blank),
            ("user..created", PatternError::EmptyToken),
            (".user", PatternError::EmptyToken),
            ("user.", PatternError::EmptyToken),
            ("a.>.b", PatternError::Wildcard),
            ("us*er", PatternError::Wildcard),
            ("a>", PatternError::Wildcard),
            ("a\nb", PatternError::Control),
        ] {
            assert_eq!(EventTypePattern::parse(text), Err(problem), "{text:?}");
        }
        assert_eq!(EventTypePattern::parse(&"x".repeat(256)), Err(PatternError::TooLong));
        assert!(EventTypePattern::parse(&"x".repeat(255)).is_ok());
    }
}
