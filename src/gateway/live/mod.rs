//! `GET /api/v1/events/live`: the events arriving in EVENTS as Server-Sent Events, filtered by
//! event-type patterns, user, source and category.
//!
//! Reads the gateway's shared live feed ([`feed`]) and, for a tail resuming with
//! `Last-Event-ID`, EVENTS from that sequence on; writes nothing. Guarantees: each SSE event
//! carries its EVENTS sequence as `id`, so a client that reconnects with `Last-Event-ID` (as
//! `EventSource` does) gets every later matching event once, in order, within the stream's
//! retention; a tail too slow for the feed is ended with a `lagged` event rather than buffered
//! without bound; heartbeats (SSE comments) keep proxies from closing an idle tail; shutdown
//! ends every tail.

pub mod feed;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use super::AppState;
use super::error::ApiError;
use crate::domain::{Event, EventCategory, EventSource, EventTypePattern, FieldError};
use crate::infra::metrics::Metrics;
use feed::{LiveEvent, LiveFeed};

/// Most event-type patterns one tail may ask for.
const MAX_PATTERNS: usize = 20;

#[derive(Debug, Deserialize)]
pub struct LiveParams {
    /// Comma-separated event-type patterns (`order.*,user.signed_up`).
    event_type: Option<String>,
    user_id: Option<String>,
    source: Option<String>,
    category: Option<String>,
    /// Seconds between heartbeats (1 to 300, default 15).
    heartbeat: Option<u64>,
}

/// Which events a tail shows. Every field narrows; none shows all.
#[derive(Debug, Default)]
pub struct LiveFilter {
    patterns: Vec<EventTypePattern>,
    user_id: Option<String>,
    source: Option<EventSource>,
    category: Option<EventCategory>,
}

impl LiveFilter {
    pub fn matches(&self, event: &Event) -> bool {
        (self.patterns.is_empty() || self.patterns.iter().any(|pattern| pattern.matches(&event.event_type)))
            && self.user_id.as_ref().is_none_or(|user| event.user_id.as_ref() == Some(user))
            && self.source.is_none_or(|source| event.event_source == source)
            && self.category.is_none_or(|category| event.event_category == category)
    }
}

/// Checks a tail's parameters and `Last-Event-ID`, every error at once.
pub fn parse(
    params: &LiveParams,
    last_event_id: Option<&str>,
) -> Result<(LiveFilter, Duration, Option<u64>), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut patterns = Vec::new();
    for text in params.event_type.iter().flat_map(|list| list.split(',')).map(str::trim) {
        match EventTypePattern::parse(text) {
            Ok(pattern) => patterns.push(pattern),
            Err(error) => errors.push(FieldError::new("event_type", format!("{text:?}: {error}"))),
        }
    }
    if patterns.len() > MAX_PATTERNS {
        errors.push(FieldError::new("event_type", format!("at most {MAX_PATTERNS} patterns")));
    }
    let source = params.source.as_deref().and_then(|text| {
        let parsed = EventSource::parse(text);
        if parsed.is_none() {
            errors.push(FieldError::new("source", format!("must be one of: {}", EventSource::expected())));
        }
        parsed
    });
    let category = params.category.as_deref().and_then(|text| {
        let parsed = EventCategory::parse(text);
        if parsed.is_none() {
            errors.push(FieldError::new("category", format!("must be one of: {}", EventCategory::expected())));
        }
        parsed
    });
    let heartbeat = match params.heartbeat {
        None => 15,
        Some(seconds @ 1..=300) => seconds,
        Some(_) => {
            errors.push(FieldError::new("heartbeat", "must be 1 to 300 seconds"));
            15
        }
    };
    let resume = last_event_id.map(str::trim).filter(|text| !text.is_empty()).and_then(|text| {
        let parsed = text.parse::<u64>().ok();
        if parsed.is_none() {
            errors.push(FieldError::new("Last-Event-ID", "must be the id of an event this endpoint sent"));
        }
        parsed
    });
    let filter = LiveFilter { patterns, user_id: params.user_id.clone(), source, category };
    if errors.is_empty() { Ok((filter, Duration::from_secs(heartbeat), resume)) } else { Err(errors) }
}

pub async fn live(
    State(state): State<AppState>,
    Query(params): Query<LiveParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event_id = headers.get("last-event-id").map(|value| value.to_str().unwrap_or("?"));
    let (filter, heartbeat, resume) = parse(&params, last_event_id).map_err(ApiError::Validation)?;
    if state.live.listeners() >= state.max_live_tails {
        return Err(ApiError::TooManyTails(state.max_live_tails));
    }
    let receiver = state.live.subscribe();
    let (sender, frames) = mpsc::channel(256);
    let tail = Tail { feed: state.live.clone(), filter, sender, heartbeat, metrics: state.bus.shared_metrics() };
    let token = state.token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tail.run(receiver, resume) => {}
            _ = token.cancelled() => {}
        }
    });
    let opening = Bytes::from_static(b": live\nretry: 1000\n\n");
    let stream = futures::stream::once(async move { Ok::<_, Infallible>(opening) })
        .chain(futures::stream::unfold(frames, |mut frames| async move {
            frames.recv().await.map(|frame| (Ok(frame), frames))
        }));
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
        // Proxies that buffer (nginx) pass the stream through as it comes.
        (HeaderName::from_static("x-accel-buffering"), "no"),
    ];
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// How long a tail waits for a client that does not read before it ends the tail.
const STALLED: Duration = Duration::from_secs(10);

/// A heartbeat: an SSE comment.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// One client's tail: catches up from JetStream when resuming, then follows the feed. It
/// writes SSE frames: each event's is rendered once by the feed and shared by every tail.
struct Tail {
    feed: Arc<LiveFeed>,
    filter: LiveFilter,
    sender: mpsc::Sender<Bytes>,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
}

impl Tail {
    async fn run(self, receiver: broadcast::Receiver<Arc<LiveEvent>>, resume: Option<u64>) {
        self.metrics.live_tails.inc();
        let last = match resume {
            Some(after) => self.catch_up(after).await,
            None => Ok(0),
        };
        match last {
            Ok(last) => self.follow(receiver, last, resume.is_some()).await,
            Err(error) => self.unavailable(error).await,
        }
        self.metrics.live_tails.dec();
    }

    /// Sends what was missed after `after`; returns the last sequence covered.
    async fn catch_up(&self, after: u64) -> Result<u64, feed::FeedError> {
        let mut missed = self.feed.catch_up(after).await?;
        let mut quiet_since = Instant::now();
        while let Some(event) = missed.next().await? {
            if self.filter.matches(&event.event) {
                if !self.send(event.shared_frame).await {
                    break;
                }
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= self.heartbeat {
                // Nothing matched for a while: keep the connection alive.
                if !self.write(Bytes::from_static(HEARTBEAT)).await {
                    break;
                }
                quiet_since = Instant::now();
            }
        }
        Ok(missed.newest)
    }

    /// Sends the feed's events after `last` until the client goes or falls behind, with a
    /// heartbeat whenever nothing was sent for `heartbeat`.
    async fn follow(&self, mut receiver: broadcast::Receiver<Arc<LiveEvent>>, mut last: u64, resumed: bool) {
        let mut quiet_since = Instant::now();
        // A resumed tail's catch-up may end before the first event the feed hands it (the
        // feed may have started after the catch-up read the stream's end): fill that gap once.
        let mut check_gap = resumed;
        loop {
            let received = tokio::select! {
                received = receiver.recv() => received,
                _ = tokio::time::sleep_until((quiet_since + self.heartbeat).into()) => {
                    if !self.write(Bytes::from_static(HEARTBEAT)).await {
                        break;
                    }
                    quiet_since = Instant::now();
                    continue;
                }
                // The client went away while nothing arrived.
                _ = self.sender.closed() => break,
            };
            match received {
                Ok(event) => {
                    // The feed repeats what the catch-up read: skip it.
                    if event.seq <= last {
                        continue;
                    }
                    if std::mem::take(&mut check_gap) && event.seq > last + 1 {
                        match self.catch_up(last).await {
                            Ok(covered) => last = last.max(covered),
                            Err(error) => return self.unavailable(error).await,
                        }
                        if event.seq <= last {
                            continue;
                        }
                    }
                    last = event.seq;
                    if self.filter.matches(&event.event) {
                        if !self.send(event.shared_frame.clone()).await {
                            break;
                        }
                        quiet_since = Instant::now();
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.metrics.live_tails_lagged.inc();
                    let detail = format!("this tail fell {missed} events behind; reconnect with Last-Event-ID");
                    let _ = self.sender.send(notice("lagged", &detail)).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }

    /// Tells the client that EVENTS cannot be read now (it reconnects and resumes).
    async fn unavailable(&self, error: feed::FeedError) {
        tracing::warn!(%error, "a live tail cannot read EVENTS");
        let _ = self.sender.send(notice("unavailable", "cannot read EVENTS now; reconnect")).await;
    }

    /// Sends an event's frame and counts it; false once the client is gone.
    async fn send(&self, frame: Bytes) -> bool {
        let sent = self.write(frame).await;
        if sent {
            self.metrics.live_events_sent.inc();
        }
        sent
    }

    /// Writes a frame; false once the client is gone, or stalled (it has not read for
    /// [`STALLED`] with a full buffer: it reconnects with `Last-Event-ID`).
    async fn write(&self, frame: Bytes) -> bool {
        let frame = match self.sender.try_send(frame) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
        };
        match tokio::time::timeout(STALLED, self.sender.send(frame)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                self.metrics.live_tails_lagged.inc();
                false
            }
        }
    }
}

/// A control event: `{"code", "detail"}` under the SSE event name `code`.
fn notice(code: &str, detail: &str) -> Bytes {
    let data = serde_json::json!({"code": code, "detail": detail});
    Bytes::from(format!("event: {code}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse::{Defaults, parse_event};

    fn params(query: &str) -> LiveParams {
        let mut params = LiveParams { event_type: None, user_id: None, source: None, category: None, heartbeat: None };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap();
            let value = Some(value.to_owned());
            match name {
                "event_type" => params.event_type = value,
                "user_id" => params.user_id = value,
                "source" => params.source = value,
                "category" => params.category = value,
                "heartbeat" => params.heartbeat = value.and_then(|v| v.parse().ok()),
                _ => panic!("{name}"),
            }
        }
        params
    }

    fn event(body: serde_json::Value) -> Event {
        parse_event(body, &Defaults::http(chrono::Utc::now())).unwrap()
    }

    #[test]
    fn filters_narrow_by_type_user_source_and_category() {
        let order = event(serde_json::json!({"event_type": "order.placed", "user_id": "u1", "event_source": "backend",
                                              "event_category": "order"}));
        let matches = |query: &str| parse(&params(query), None).unwrap().0.matches(&order);
        assert!(matches(""));
        assert!(matches("event_type=user.*,order.*") && !matches("event_type=user.*"));
        assert!(matches("user_id=u1") && !matches("user_id=u2"));
        assert!(matches("source=backend") && !matches("source=frontend"));
        assert!(matches("category=order") && !matches("category=system"));
    }

    #[test]
    fn bad_parameters_are_named() {
        let fields = |query: &str, last: Option<&str>| -> Vec<String> {
            parse(&params(query), last).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields("source=moon&category=x&heartbeat=0", None), ["source", "category", "heartbeat"]);
        assert_eq!(fields("event_type=a..b", Some("x")), ["event_type", "Last-Event-ID"]);
        let (_, heartbeat, resume) = parse(&params("heartbeat=2"), Some("41")).unwrap();
        assert_eq!((heartbeat, resume), (Duration::from_secs(2), Some(41)));
    }
}
