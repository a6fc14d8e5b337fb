//! [`Secret`]: API keys, webhook secrets, the RudderStack secret and URLs that may carry a
//! password, held so that `Debug` (and therefore every log line and panic message that
//! formats a settings struct or a registry row) prints `[redacted]`.
//!
//! Reads nothing, writes nothing. There is deliberately no `Display` and no `Serialize`: the
//! text leaves only through [`Secret::expose`], at the places that need it.

use std::convert::Infallible;
use std::str::FromStr;

/// A value that must not appear in logs.
#[derive(Clone, Default, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

/// A URL as it may be shown: any password replaced by `***` (`postgres://app:***@db/events`).
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "[unparsable URL]".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn passwords_leave_urls_shown() {
        assert_eq!(shown_url("postgres://app:pw@db:5432/events"), "postgres://app:***@db:5432/events");
        assert_eq!(shown_url("postgres://app@db/events"), "postgres://app@db/events");
        assert_eq!(shown_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
