//! W3C trace context (`traceparent`, `tracestate`): parsed from what producers send (HTTP
//! headers, NATS headers), carried on every message the pipeline writes about an event, and
//! sent on every call the pipeline makes for it (webhook deliveries, processor calls).
//!
//! Reads and writes nothing itself. Guarantees: a trace id a producer sent is kept through
//! every stage; a malformed `traceparent` is ignored (a new trace starts), never an error; an
//! event that came without one gets a trace id derived from its event id, so every stage (and
//! every redelivery) names the same trace for it.

use async_nats::HeaderMap;
use uuid::Uuid;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (the W3C limit is 32 members of at most 256 characters; 512
/// characters is what implementations must propagate at least).
const MAX_TRACESTATE_CHARS: usize = 512;

/// Where in a trace something happens: the trace, the span that caused it, whether it is
/// sampled, and the vendors' `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    pub state: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` (and its `tracestate`); `None` when it is malformed.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent.trim();
        let mut parts = traceparent.splitn(5, '-');
        let version = hex::<1>(parts.next()?)?[0];
        let trace_id = hex::<16>(parts.next()?)?;
        let span_id = hex::<8>(parts.next()?)?;
        let flags = hex::<1>(parts.next()?)?[0];
        // Version 00 has exactly four fields; later versions may add some after a dash.
        let valid_rest = match parts.next() {
            None => true,
            Some(_) => version != 0,
        };
        if version == 0xff || !valid_rest || trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate.map(str::trim).filter(|state| !state.is_empty() && state.len() <= MAX_TRACESTATE_CHARS);
        Some(Self { trace_id, span_id, flags, state: state.map(str::to_owned) })
    }

    /// A new trace (sampled).
    pub fn root() -> Self {
        let trace_id = *Uuid::new_v4().as_bytes();
        Self { trace_id, span_id: random_span_id(), flags: 1, state: None }
    }

    /// The trace of an event that came without one: the same for every stage that reads it.
    pub fn for_event(event_id: Uuid) -> Self {
        let bytes = *event_id.as_bytes();
        let mut span_id = [0; 8];
        span_id.copy_from_slice(&bytes[8..]);
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        Self { trace_id: bytes, span_id, flags: 1, state: None }
    }

    /// The context to send on a call made within this one: same trace, a new span.
    pub fn child(&self) -> Self {
        Self { span_id: random_span_id(), ..self.clone() }
    }

    /// The `traceparent` header value (version 00). On every message: no formatting machinery.
    pub fn traceparent(&self) -> String {
        let mut value = String::with_capacity(55);
        value.push_str("00-");
        push_hex(&mut value, &self.trace_id);
        value.push('-');
        push_hex(&mut value, &self.span_id);
        value.push('-');
        push_hex(&mut value, &[self.flags]);
        value
    }

    /// The trace id as 32 lowercase hex digits, as logs and tracing back ends show it.
    pub fn trace_id_hex(&self) -> String {
        let mut hex = String::with_capacity(32);
        push_hex(&mut hex, &self.trace_id);
        hex
    }

    /// The context of a NATS message's headers, if it carries a valid one.
    pub fn from_nats(headers: Option<&HeaderMap>) -> Option<Self> {
        let headers = headers?;
        let traceparent = headers.get(TRACEPARENT)?.as_str();
        Self::parse(traceparent, headers.get(TRACESTATE).map(|value| value.as_str()))
    }

    /// The headers that name this context as the parent of whoever receives them.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![(TRACEPARENT, self.traceparent())];
        if let Some(state) = &self.state {
            headers.push((TRACESTATE, state.clone()));
        }
        headers
    }
}

fn random_span_id() -> [u8; 8] {
    let bytes = Uuid::new_v4().into_bytes();
    let mut span_id = [0; 8];
    // The last eight bytes of a v4 UUID are random but for two variant bits.
    span_id.copy_from_slice(&bytes[8..]);
    span_id
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut bytes = [0; N];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).ok()?;
    }
    Some(bytes)
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let context = TraceContext::parse(SAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.traceparent(), SAMPLE);
        assert_eq!(context.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        // A later version may add fields; what we know of it is read.
        let future = TraceContext::parse(&format!("01{}-what-comes-next", &SAMPLE[2..]), None).unwrap();
        assert_eq!(future.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn children_keep_the_trace_and_get_a_new_span() {
        let parent = TraceContext::parse(SAMPLE, Some("a=b")).unwrap();
        let headers = parent.child().headers();
        let child = TraceContext::parse(&headers[0].1, None).unwrap();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(headers[1], (TRACESTATE, "a=b".to_owned()));
    }

    #[test]
    fn an_event_without_a_trace_always_gets_the_same_one() {
        let id = Uuid::now_v7();
        assert_eq!(TraceContext::for_event(id), TraceContext::for_event(id));
        assert_eq!(TraceContext::for_event(id).trace_id_hex(), id.simple().to_string());
        assert_ne!(TraceContext::root().trace_id, TraceContext::root().trace_id);
    }
}
