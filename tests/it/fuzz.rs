//! Hostile input at every endpoint: a deterministic corpus of wrong JSON types for every known
//! field, numbers no integer holds, deep nesting, broken UTF-8, NUL characters and lone
//! surrogates, huge strings and keys, broken `Content-Encoding`, and hostile path and query
//! parameters. NATS and PostgreSQL are up, so no answer may be a 5xx (not even a 503); every
//! 4xx is in the service's error shape (`{"code", "detail"}`); every event that was accepted
//! is stored; and afterwards the service is still ready and still stores a normal event.
//!
//! All failures are gathered and reported together (method, path, input, status, body).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, spawn_app, wait_until};

/// Requests in flight at once.
const CONCURRENCY: usize = 12;

/// One hostile request.
struct Probe {
    method: Method,
    path: String,
    input: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

impl Probe {
    fn new(method: Method, path: impl Into<String>, input: impl Into<String>) -> Self {
        Self { method, path: path.into(), input: input.into(), headers: Vec::new(), body: None }
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// What one probe did wrong, or the events it got accepted.
enum Outcome {
    Fine { accepted: Vec<String> },
    Failed(String),
}

/// Wrong types, extreme numbers and hostile strings, as raw JSON text (`1e400` and `"\ud800"`
/// cannot be built as a `serde_json::Value`).
fn hostile_values() -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = [
        ("a string", r#""fuzz""#),
        ("an empty string", r#""""#),
        ("a blank string", r#""   ""#),
        ("an integer", "42"),
        ("a negative integer", "-1"),
        ("zero", "0"),
        ("a float", "1.5"),
        ("an object", r#"{"nested": {"a": 1}}"#),
        ("an empty object", "{}"),
        ("an array", r#"[1, "two", null]"#),
        ("an empty array", "[]"),
        ("null", "null"),
        ("true", "true"),
        ("1e400", "1e400"),
        ("-1e400", "-1e400"),
        ("2^64", "18446744073709551616"),
        ("2^63", "9223372036854775808"),
        ("-2^63-1", "-9223372036854775809"),
        ("NUL in a string", r#""a\u0000b""#),
        ("a lone high surrogate", r#""\ud800""#),
        ("unicode and bidi", r#""💥\u202e\ufeffé""#),
        ("control characters", r#""a\n\t\u001fb""#),
        ("a timestamp long ago", r#""-200000-01-01T00:00:00""#),
        ("a timestamp far ahead", r#""+200000-01-01T00:00:00""#),
        ("a timestamp in year 0", r#""0000-01-01T00:00:00Z""#),
        ("a timestamp in 9999", r#""9999-12-31T23:59:59.999999999Z""#),
        ("February 30", r#""2026-02-30T00:00:00Z""#),
        ("the nil UUID", r#""00000000-0000-0000-0000-000000000000""#),
        ("wildcards", r#""a.*.>""#),
        ("a metadata URL", r#""http://169.254.169.254/latest/meta-data""#),
    ]
    .into_iter()
    .map(|(name, raw)| (name.to_owned(), raw.to_owned()))
    .collect();
    values.push(("a 100 KB string".into(), format!("\"{}\"", "x".repeat(100 * 1024))));
    values.push(("arrays nested 100 deep".into(), format!("{}{}", "[".repeat(100), "]".repeat(100))));
    values
}

/// Timestamps for the fields that take one, including pairs that stretch a clock correction.
const HOSTILE_TIMES: [&str; 6] = [
    "-200000-01-01T00:00:00",
    "+200000-01-01T00:00:00",
    "-260000-01-01 00:00:00",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "2026-01-01T00:00:00Z",
];

/// A JSON object from `base` (raw values) with `field` set to `value` (raw). A dotted field
/// (`filters.event_type`) goes one object down.
fn object(base: &[(&str, &str)], field: &str, value: &str) -> String {
    let key = |name: &str| serde_json::to_string(name).unwrap();
    let (outer, inner) = match field.split_once('.') {
        Some((outer, inner)) => (outer, Some(inner)),
        None => (field, None),
    };
    let mut parts: Vec<String> =
        base.iter().filter(|(name, _)| *name != outer).map(|(name, raw)| format!("{}: {raw}", key(name))).collect();
    let value = match inner {
        Some(inner) => {
            let nested = base.iter().find(|(name, _)| *name == outer).map(|(_, raw)| *raw).unwrap_or("{}");
            let nested: Value = serde_json::from_str(nested).unwrap_or_else(|_| json!({}));
            let nested: Vec<(String, String)> = nested
                .as_object()
                .map(|map| map.iter().map(|(name, value)| (name.clone(), value.to_string())).collect())
                .unwrap_or_default();
            let nested: Vec<(&str, &str)> = nested.iter().map(|(name, raw)| (name.as_str(), raw.as_str())).collect();
            object(&nested, inner, value)
        }
        None => value.to_owned(),
    };
    parts.push(format!("{}: {value}", key(outer)));
    format!("{{{}}}", parts.join(", "))
}

/// Raw JSON of a base body.
fn raw(base: &[(&str, &str)]) -> String {
    let parts: Vec<String> =
        base.iter().map(|(name, raw)| format!("{}: {raw}", serde_json::to_string(name).unwrap())).collect();
    format!("{{{}}}", parts.join(", "))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Bodies that are broken whatever the endpoint; `valid` is a body the endpoint takes.
fn broken_bodies(method: &Method, path: &str, valid: &str) -> Vec<Probe> {
    let probe = |input: &str, body: Vec<u8>| Probe::new(method.clone(), path, input).body(body);
    let mut invalid_utf8 = br#"{"event_type": "bad "#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc0, 0x80, 0xed, 0xa0, 0x80]);
    invalid_utf8.extend_from_slice(br#"", "name": "x"}"#);
    let valid_gzip = gzip(valid.as_bytes());
    let mut probes = vec![
        probe("an empty body", Vec::new()),
        probe("a blank body", b" \r\n\t ".to_vec()),
        probe("a body that is not JSON", b"hello, world".to_vec()),
        probe("truncated JSON", valid.as_bytes()[..valid.len() / 2].to_vec()),
        probe("invalid UTF-8 in a string", invalid_utf8),
        probe("invalid UTF-8 outside strings", vec![0xff, 0xfe, 0x00, 0x7b]),
        probe("a UTF-16 body", valid.encode_utf16().flat_map(u16::to_le_bytes).collect()),
        probe("arrays nested 10000 deep", format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes()),
        probe("objects nested 10000 deep", format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes()),
        probe("nesting 10000 deep inside a valid body", {
            let mut body = valid.trim_end().trim_end_matches('}').to_owned();
            let comma = if body.trim_end().ends_with('{') { "" } else { "," };
            body.push_str(&format!("{comma} \"deep\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000)));
            body.into_bytes()
        }),
        probe("a NUL byte in the raw body", valid.replacen('"', "\"\0", 1).into_bytes()),
        probe("a NUL escape in a key", object(&[], "a\u{0}b", "1").into_bytes()),
        probe("a 100 KB key", format!("{{\"{}\": 1}}", "k".repeat(100 * 1024)).into_bytes()),
        probe("a 1 MB string", format!("{{\"blob\": \"{}\"}}", "x".repeat(1_000_000)).into_bytes()),
        probe("duplicate keys", format!("{}, {}", valid.trim_end().trim_end_matches('}'), &valid[1..]).into_bytes()),
        probe("a trailing second document", format!("{valid} {valid}").into_bytes()),
    ];
    for (name, raw) in [
        ("null", "null"),
        ("true", "true"),
        ("a number", "42"),
        ("1e400", "1e400"),
        ("2^64", "18446744073709551616"),
        ("a string", "\"event\""),
        ("an empty array", "[]"),
        ("an array of scalars", "[1, \"a\", null]"),
        ("an empty object", "{}"),
    ] {
        probes.push(probe(&format!("a body that is {name}"), raw.as_bytes().to_vec()));
    }
    let encoded = |input: &str, encoding: &str, body: Vec<u8>| {
        Probe::new(method.clone(), path, input).header("content-encoding", encoding).body(body)
    };
    probes.push(encoded("gzip header, garbage body", "gzip", b"\x1f\x8b\x08\x00garbage, not deflate".to_vec()));
    probes.push(encoded("gzip header, plain JSON body", "gzip", valid.as_bytes().to_vec()));
    probes.push(encoded("truncated gzip", "gzip", valid_gzip[..valid_gzip.len() / 2].to_vec()));
    probes.push(encoded("deflate header, garbage body", "deflate", b"garbage".to_vec()));
    probes.push(encoded("an unknown content-encoding", "br", valid.as_bytes().to_vec()));
    probes.push(encoded("gzip twice, once applied", "gzip, gzip", valid_gzip.clone()));
    probes.push(encoded("gzip of invalid JSON", "gzip", gzip(b"{\"a\": ")));
    probes
}

/// Every field of a body, each set to every hostile value.
fn field_probes(method: &Method, path: &str, base: &[(&str, &str)], fields: &[&str]) -> Vec<Probe> {
    let mut probes = Vec::new();
    for field in fields {
        for (name, value) in hostile_values() {
            let body = object(base, field, &value);
            probes.push(Probe::new(method.clone(), path, format!("{field} = {name}")).body(body));
        }
    }
    probes
}

/// A body endpoint: broken bodies plus every field with every hostile value.
fn body_endpoint(method: Method, path: &str, base: &[(&str, &str)], fields: &[&str]) -> Vec<Probe> {
    let mut probes = broken_bodies(&method, path, &raw(base));
    probes.extend(field_probes(&method, path, base, fields));
    probes
}

/// Path parameter values, already percent-encoded where they need to be.
fn hostile_segments() -> Vec<(String, String)> {
    let mut segments: Vec<(String, String)> = [
        ("NUL", "%00"),
        ("NUL inside", "a%00b"),
        ("an encoded slash and dot-dot", "..%2F..%2Fhealth"),
        ("encoded dot-dot", "%2e%2e"),
        ("not a UUID", "not-a-uuid"),
        ("the nil UUID", "00000000-0000-0000-0000-000000000000"),
        ("a UUID with braces", "%7B00000000-0000-0000-0000-000000000000%7D"),
        ("unicode", "%F0%9F%92%A5%E2%80%AE"),
        ("invalid UTF-8", "%FF%FE"),
        ("overlong UTF-8 NUL", "%C0%80"),
        ("a lone surrogate in UTF-8", "%ED%A0%80"),
        ("a negative number", "-1"),
        ("a huge number", "99999999999999999999"),
        ("a space", "%20"),
        ("a colon", ":"),
        ("a colon inside", "a:b"),
        ("wildcards", "*.%3E"),
        ("a control character", "a%0Ab"),
        ("an encoded percent", "%25"),
    ]
    .into_iter()
    .map(|(name, segment)| (name.to_owned(), segment.to_owned()))
    .collect();
    segments.push(("an 8 KB id".into(), "i".repeat(8 * 1024)));
    segments.push(("a 60 KB id".into(), "i".repeat(60 * 1024)));
    segments
}

/// A path template (`{name}` parameters) with each parameter in turn set to each hostile value,
/// the others to `valid`.
fn path_probes(method: Method, template: &str, valid: &[(&str, &str)]) -> Vec<Probe> {
    let fill = |hostile: Option<(&str, &str)>| {
        let mut path = template.to_owned();
        for (name, value) in valid {
            let value = match hostile {
                Some((target, segment)) if target == *name => segment,
                _ => value,
            };
            path = path.replace(&format!("{{{name}}}"), value);
        }
        path
    };
    let mut probes = Vec::new();
    for (name, _) in valid {
        for (input, segment) in hostile_segments() {
            probes.push(Probe::new(method.clone(), fill(Some((name, &segment))), format!("{{{name}}} = {input}")));
        }
    }
    probes
}

/// Query string values, already percent-encoded where they need to be.
fn hostile_query_values() -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = [
        ("-1", "-1"),
        ("0", "0"),
        ("2^64+", "99999999999999999999"),
        ("2^63", "9223372036854775808"),
        ("-2^63-1", "-9223372036854775809"),
        ("1e400", "1e400"),
        ("NaN", "NaN"),
        ("a word", "abc"),
        ("empty", ""),
        ("true", "true"),
        ("null", "null"),
        ("NUL", "%00"),
        ("NUL inside", "a%00b"),
        ("invalid UTF-8", "%FF%FE"),
        ("overlong UTF-8 NUL", "%C0%80"),
        ("an encoded slash and dot-dot", "..%2F..%2F"),
        ("unicode", "%F0%9F%92%A5"),
        ("a timestamp long ago", "-200000-01-01T00:00:00"),
        ("a timestamp far ahead", "%2B200000-01-01T00:00:00"),
        ("a timestamp in year 0", "0000-01-01T00:00:00Z"),
        ("February 30", "2026-02-30T00:00:00Z"),
        ("wildcards", "a.*.%3E"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    values.push(("8 KB".into(), "x".repeat(8 * 1024)));
    values
}

/// Every query parameter of a path set to every hostile value, and a few malformed query
/// strings.
fn query_probes(method: Method, path: &str, params: &[&str]) -> Vec<Probe> {
    let mut probes = Vec::new();
    let separator = if path.contains('?') { '&' } else { '?' };
    for param in params {
        for (name, value) in hostile_query_values() {
            probes.push(Probe::new(
                method.clone(),
                format!("{path}{separator}{param}={value}"),
                format!("?{param} = {name}"),
            ));
        }
        probes.push(Probe::new(
            method.clone(),
            format!("{path}{separator}{param}=1&{param}=2"),
            format!("?{param} twice"),
        ));
        probes.push(Probe::new(method.clone(), format!("{path}{separator}{param}[]=1"), format!("?{param}[]")));
        probes.push(Probe::new(
            method.clone(),
            format!("{path}{separator}{param}"),
            format!("?{param} without a value"),
        ));
    }
    for (input, query) in [
        ("limit -1 and a huge offset", "limit=-1&offset=99999999999999999999"),
        ("a NUL parameter name", "%00=1"),
        ("a bare ampersand soup", "&&&=&=="),
        ("a broken escape", "a=%zz&b=%"),
        ("an unknown parameter", "unknown=1"),
    ] {
        probes.push(Probe::new(method.clone(), format!("{path}{separator}{query}"), input));
    }
    probes
}

/// Hostile `ce-*` header values for binary-mode CloudEvents (percent-decoded by the service).
fn cloudevent_header_probes() -> Vec<Probe> {
    let path = "/api/v1/events/cloudevents";
    let valid = [("ce-id", "fz-bin-1"), ("ce-source", "/fuzz"), ("ce-specversion", "1.0"), ("ce-type", "fuzz.binary")];
    let values = [
        ("NUL", "a%00b".to_owned()),
        ("invalid UTF-8", "%FF%FE".to_owned()),
        ("empty", String::new()),
        ("a timestamp long ago", "-200000-01-01T00:00:00".to_owned()),
        ("a timestamp far ahead", "+200000-01-01T00:00:00".to_owned()),
        ("4 KB", "h".repeat(4 * 1024)),
        ("a broken escape", "%zz%".to_owned()),
    ];
    let mut probes = Vec::new();
    for header in ["ce-id", "ce-source", "ce-specversion", "ce-type", "ce-time", "ce-subject", "ce-tenant"] {
        for (name, value) in &values {
            let mut probe = Probe::new(Method::POST, path, format!("binary mode, {header} = {name}"))
                .header("content-type", "application/json")
                .body(r#"{"a": 1}"#);
            for (valid_name, valid_value) in valid {
                if valid_name != header {
                    probe = probe.header(valid_name, valid_value);
                }
            }
            probes.push(probe.header(header, value.clone()));
        }
    }
    for (input, content_type, body) in [
        ("binary mode, invalid UTF-8 text body", "text/plain", vec![0xff, 0x00, 0xfe]),
        ("binary mode, NUL JSON body", "application/json", br#"{"a": "b\u0000c"}"#.to_vec()),
        (
            "binary mode, deep JSON body",
            "application/json",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        ("binary mode, 1 MB body", "application/octet-stream", vec![0u8; 1_000_000]),
    ] {
        let mut probe = Probe::new(Method::POST, path, input).header("content-type", content_type).body(body);
        for (name, value) in valid {
            probe = probe.header(name, value);
        }
        probes.push(probe);
    }
    probes
}

/// Ids of the things the path parameters point at, so hostile input reaches past the lookup.
struct Seeds {
    event_id: String,
    processor_id: String,
    subscription_id: String,
    replay_id: String,
}

async fn seed(app: &TestApp) -> Seeds {
    let event_id = app.create(json!({"event_type": "fuzz.seed", "user_id": "fuzz-user"})).await;
    let (status, processor) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "fuzz_seed", "processor_type": "internal", "enabled": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{processor}");
    let (status, subscription) = app
        .post("/api/v1/events/subscriptions", &json!({"subscription_id": "fuzz-sub", "event_types": ["fuzz.none"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{subscription}");
    let (status, replay) = app.post("/api/v1/events/replay", &json!({"stream_id": "user:fuzz-user"})).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    let (status, definition) =
        app.post("/api/v1/events/projections/definitions", &json!({"name": "fuzz_def", "entity_type": "order"})).await;
    assert_eq!(status, StatusCode::OK, "{definition}");
    Seeds {
        event_id,
        processor_id: processor["processor_id"].as_str().expect("processor_id").to_owned(),
        subscription_id: subscription["subscription_id"].as_str().expect("subscription_id").to_owned(),
        replay_id: replay["replay_id"].as_str().expect("replay_id").to_owned(),
    }
}

/// The whole corpus, endpoint by endpoint (the paths of docs/openapi.yaml).
fn corpus(seeds: &Seeds) -> Vec<Probe> {
    let (post, get, put, patch, delete) = (Method::POST, Method::GET, Method::PUT, Method::PATCH, Method::DELETE);
    let mut probes = Vec::new();
    let event_fields = [
        "event_type",
        "event_id",
        "event_source",
        "event_category",
        "user_id",
        "session_id",
        "organization_id",
        "device_id",
        "correlation_id",
        "data",
        "data.k",
        "metadata",
        "context",
        "properties",
        "stream_id",
        "entity_type",
        "entity_id",
        "timestamp",
        "created_at",
    ];
    let event = [("event_type", r#""fuzz.create""#), ("user_id", r#""fuzz-user""#)];

    // Sending events.
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/create", &event, &event_fields));
    probes.push(
        Probe::new(post.clone(), "/api/v1/events/create", "event_type = a 1 MB string")
            .body(format!("{{\"event_type\": \"{}\"}}", "x".repeat(1_000_000))),
    );
    let batch_fields = ["event_type", "event_id", "data", "user_id", "timestamp", "stream_id"];
    probes.extend(broken_bodies(&post, "/api/v1/events/batch", &format!("[{}]", raw(&event))));
    for probe in field_probes(&post, "/api/v1/events/batch", &event, &batch_fields) {
        let body = format!("[{}]", String::from_utf8(probe.body.unwrap_or_default()).unwrap_or_default());
        probes.push(Probe::new(post.clone(), "/api/v1/events/batch", format!("[0].{}", probe.input)).body(body));
    }
    for (name, value) in hostile_values() {
        probes
            .push(Probe::new(post.clone(), "/api/v1/events/batch", format!("[0] = {name}")).body(format!("[{value}]")));
    }
    let cloudevent =
        [("specversion", r#""1.0""#), ("id", r#""fz-1""#), ("source", r#""/fuzz""#), ("type", r#""fuzz.ce""#)];
    let cloudevent_fields =
        ["specversion", "id", "source", "type", "time", "data", "data_base64", "subject", "datacontenttype", "tenant"];
    // Batched mode shares structured mode's mapping: fewer fields there.
    for (content_type, fields) in [
        ("application/cloudevents+json", &cloudevent_fields[..]),
        ("application/cloudevents-batch+json", &["id", "type", "time", "data"][..]),
    ] {
        let batched = content_type.ends_with("batch+json");
        let wrap = |body: String| if batched { format!("[{body}]") } else { body };
        for probe in body_endpoint(post.clone(), "/api/v1/events/cloudevents", &cloudevent, fields) {
            let body = probe.body.map(|body| {
                let is_field_probe = probe.input.contains(" = ");
                if is_field_probe { wrap(String::from_utf8(body).unwrap_or_default()).into_bytes() } else { body }
            });
            let mut wrapped = Probe::new(post.clone(), probe.path, format!("{content_type}: {}", probe.input))
                .header("content-type", content_type);
            wrapped.headers.extend(probe.headers);
            wrapped.body = body;
            probes.push(wrapped);
        }
    }
    probes.extend(cloudevent_header_probes());

    // Public ingest.
    let frontend = [("event_type", r#""fuzz.frontend""#), ("user_id", r#""fuzz-user""#)];
    let frontend_fields =
        ["event_type", "category", "page_url", "metadata", "metadata.k", "user_id", "session_id", "data", "timestamp"];
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/frontend", &frontend, &frontend_fields));
    probes.extend(broken_bodies(
        &post,
        "/api/v1/events/frontend/batch",
        &format!("{{\"events\": [{}]}}", raw(&frontend)),
    ));
    for (name, value) in hostile_values() {
        for (input, body) in [
            (format!("events = {name}"), format!("{{\"events\": {value}}}")),
            (format!("events[0] = {name}"), format!("{{\"events\": [{value}]}}")),
            (
                format!("client_info = {name}"),
                format!("{{\"events\": [{}], \"client_info\": {value}}}", raw(&frontend)),
            ),
            (
                format!("client_info.k = {name}"),
                format!("{{\"events\": [{}], \"client_info\": {{\"k\": {value}}}}}", raw(&frontend)),
            ),
        ] {
            probes.push(Probe::new(post.clone(), "/api/v1/events/frontend/batch", input).body(body));
        }
    }
    // The items of a batch are the single endpoint's events: a few fields suffice.
    for field in ["event_type", "metadata.k", "timestamp"] {
        for (name, value) in hostile_values() {
            let body = format!("{{\"events\": [{}]}}", object(&frontend, field, &value));
            probes.push(
                Probe::new(post.clone(), "/api/v1/events/frontend/batch", format!("events[0].{field} = {name}"))
                    .body(body),
            );
        }
    }
    let message = [("type", r#""track""#), ("event", r#""Fuzz Clicked""#), ("userId", r#""fuzz-user""#)];
    let message_fields = [
        "type",
        "event",
        "userId",
        "anonymousId",
        "messageId",
        "properties",
        "traits",
        "context",
        "context.sessionId",
        "context.library",
        "timestamp",
        "originalTimestamp",
        "sentAt",
        "integrations",
        "writeKey",
    ];
    for kind in ["track", "identify", "page", "screen", "group", "alias"] {
        let path = format!("/v1/{kind}");
        let fields: &[&str] = if kind == "track" { &message_fields } else { &["event", "name", "userId"] };
        probes.extend(body_endpoint(post.clone(), &path, &message, fields));
    }
    // Clock corrections: the client's time against its sentAt, both hostile.
    for client in HOSTILE_TIMES {
        for sent in HOSTILE_TIMES {
            let mut body = message.iter().map(|(name, raw)| (*name, raw.to_string())).collect::<Vec<_>>();
            body.push(("originalTimestamp", format!("\"{client}\"")));
            body.push(("sentAt", format!("\"{sent}\"")));
            let body: Vec<(&str, &str)> = body.iter().map(|(name, raw)| (*name, raw.as_str())).collect();
            let input = format!("originalTimestamp {client}, sentAt {sent}");
            probes.push(Probe::new(post.clone(), "/v1/track", &input).body(raw(&body)));
            probes.push(Probe::new(post.clone(), "/v1/batch", &input).body(format!("{{\"batch\": [{}]}}", raw(&body))));
            probes.push(Probe::new(post.clone(), "/webhooks/rudderstack", &input).body(raw(&body)));
        }
    }
    for kind in ["unknown", "TRACK", "%00", "..%2Fbatch", &"k".repeat(8 * 1024)] {
        probes.push(Probe::new(post.clone(), format!("/v1/{kind}"), format!("type {kind:.20}")).body(raw(&message)));
    }
    // The beacon is the batch endpoint's handler: its envelope and query only.
    for path in ["/v1/batch", "/beacon/v1/batch"] {
        let beacon = path.starts_with("/beacon");
        let envelope = format!("{{\"batch\": [{}]}}", raw(&message));
        probes.extend(broken_bodies(&post, path, &envelope));
        probes.extend(
            query_probes(post.clone(), path, &["writeKey"]).into_iter().map(|probe| probe.body(envelope.clone())),
        );
        if beacon {
            continue;
        }
        for (name, value) in hostile_values() {
            for (input, body) in [
                (format!("batch = {name}"), format!("{{\"batch\": {value}}}")),
                (format!("batch[0] = {name}"), format!("{{\"batch\": [{value}]}}")),
                (format!("context = {name}"), format!("{{\"batch\": [{}], \"context\": {value}}}", raw(&message))),
                (
                    format!("integrations = {name}"),
                    format!("{{\"batch\": [{}], \"integrations\": {value}}}", raw(&message)),
                ),
                (format!("sentAt = {name}"), format!("{{\"batch\": [{}], \"sentAt\": {value}}}", raw(&message))),
                (format!("writeKey = {name}"), format!("{{\"batch\": [{}], \"writeKey\": {value}}}", raw(&message))),
            ] {
                probes.push(Probe::new(post.clone(), path, input).body(body));
            }
        }
        for field in ["event", "userId", "timestamp", "properties"] {
            for (name, value) in hostile_values() {
                let body = format!("{{\"batch\": [{}]}}", object(&message, field, &value));
                probes.push(Probe::new(post.clone(), path, format!("batch[0].{field} = {name}")).body(body));
            }
        }
    }
    probes.extend(
        query_probes(post.clone(), "/v1/track", &["writeKey"]).into_iter().map(|probe| probe.body(raw(&message))),
    );
    let rudder_fields = ["type", "event", "userId", "anonymousId", "messageId", "properties", "context", "timestamp"];
    probes.extend(body_endpoint(post.clone(), "/webhooks/rudderstack", &message, &rudder_fields));
    for (name, value) in hostile_values() {
        for (input, body) in [
            (format!("batch = {name}"), format!("{{\"batch\": {value}}}")),
            (format!("[0] = {name}"), format!("[{value}]")),
        ] {
            probes.push(Probe::new(post.clone(), "/webhooks/rudderstack", input).body(body));
        }
    }

    // Reading events.
    let query_fields = [
        "user_id",
        "event_type",
        "event_source",
        "event_category",
        "status",
        "start_time",
        "end_time",
        "data",
        "data.k",
        "limit",
        "offset",
    ];
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/query", &[("limit", "10")], &query_fields));
    probes.extend(query_probes(get.clone(), "/api/v1/events/statistics", &["user_id"]));
    probes.extend(path_probes(get.clone(), "/api/v1/events/{event_id}", &[("event_id", &seeds.event_id)]));

    // Processors.
    let processor = [("processor_name", r#""fuzz_p""#), ("processor_type", r#""internal""#), ("enabled", "false")];
    let processor_fields = [
        "processor_id",
        "processor_name",
        "processor_type",
        "enabled",
        "priority",
        "max_retries",
        "filters",
        "filters.event_type",
        "filters.event_source",
        "filters.event_category",
        "config",
        "config.kind",
        "config.url",
        "config.subject",
        "config.timeout_ms",
        "config.k",
    ];
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/processors", &processor, &processor_fields));
    probes.extend(query_probes(get.clone(), "/api/v1/events/processors", &["unknown"]));
    let processor_id = [("processor_id", seeds.processor_id.as_str())];
    probes.extend(path_probes(get.clone(), "/api/v1/events/processors/{processor_id}", &processor_id));
    probes.extend(path_probes(delete.clone(), "/api/v1/events/processors/{processor_id}", &processor_id));
    probes.extend(path_probes(
        put.clone(),
        "/api/v1/events/processors/{processor_id}/toggle?enabled=false",
        &processor_id,
    ));
    let toggle = format!("/api/v1/events/processors/{}/toggle", seeds.processor_id);
    probes.extend(query_probes(put.clone(), &toggle, &["enabled"]));

    // Replay.
    let replay = [("stream_id", r#""user:fuzz-user""#), ("dry_run", "true")];
    let replay_fields = [
        "event_ids",
        "stream_id",
        "start_time",
        "end_time",
        "target_service",
        "dry_run",
        "processors",
        "limit",
        "offset",
    ];
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/replay", &replay, &replay_fields));
    for (name, value) in hostile_values() {
        for field in ["event_ids", "processors"] {
            let body = object(&[("dry_run", "true")], field, &format!("[{value}]"));
            probes.push(Probe::new(post.clone(), "/api/v1/events/replay", format!("{field}[0] = {name}")).body(body));
        }
    }
    probes.extend(path_probes(get.clone(), "/api/v1/events/replay/{replay_id}", &[("replay_id", &seeds.replay_id)]));

    // Subscriptions.
    let subscription = [("event_types", r#"["fuzz.none"]"#), ("enabled", "false")];
    let subscription_fields = [
        "subscription_id",
        "subscriber_name",
        "subscriber_type",
        "event_types",
        "event_sources",
        "event_categories",
        "callback_url",
        "webhook_secret",
        "enabled",
        "retry_policy",
        "retry_policy.max_retries",
        "retry_policy.backoff_seconds",
        "rate_limit_per_second",
    ];
    probes.extend(body_endpoint(post.clone(), "/api/v1/events/subscriptions", &subscription, &subscription_fields));
    for (name, value) in hostile_values() {
        for field in ["event_types", "event_sources", "event_categories", "retry_policy.backoff_seconds"] {
            let body = object(&subscription, field, &format!("[{value}]"));
            probes.push(
                Probe::new(post.clone(), "/api/v1/events/subscriptions", format!("{field}[0] = {name}")).body(body),
            );
        }
    }
    probes.extend(query_probes(
        get.clone(),
        "/api/v1/events/subscriptions",
        &["enabled", "subscriber_name", "event_type"],
    ));
    let subscription_path = format!("/api/v1/events/subscriptions/{}", seeds.subscription_id);
    let patch_fields =
        ["subscriber_name", "event_types", "callback_url", "enabled", "retry_policy", "rate_limit_per_second"];
    probes.extend(body_endpoint(patch.clone(), &subscription_path, &[("enabled", "false")], &patch_fields));
    let subscription_id = [("subscription_id", seeds.subscription_id.as_str())];
    for method in [get.clone(), patch.clone(), delete.clone()] {
        let mut probes_here =
            path_probes(method.clone(), "/api/v1/events/subscriptions/{subscription_id}", &subscription_id);
        if method == Method::PATCH {
            probes_here = probes_here.into_iter().map(|probe| probe.body(r#"{"enabled": false}"#)).collect();
        }
        probes.extend(probes_here);
    }
    probes.extend(path_probes(get.clone(), "/api/v1/events/subscriptions/{subscription_id}/secret", &subscription_id));
    let rotate = "/api/v1/events/subscriptions/{subscription_id}/secret/rotate";
    probes.extend(path_probes(post.clone(), rotate, &subscription_id));
    let rotate_path = format!("{subscription_path}/secret/rotate");
    let rotate_fields = ["overlap_seconds", "webhook_secret"];
    probes.extend(body_endpoint(post.clone(), &rotate_path, &[("overlap_seconds", "0")], &rotate_fields));
    probes.extend(path_probes(
        get.clone(),
        "/api/v1/events/subscriptions/{subscription_id}/deliveries",
        &subscription_id,
    ));
    probes.extend(query_probes(get.clone(), &format!("{subscription_path}/deliveries"), &["limit", "offset"]));
    probes.extend(path_probes(
        post.clone(),
        "/api/v1/events/subscriptions/{subscription_id}/deliveries/{event_id}/resend",
        &[("subscription_id", &seeds.subscription_id), ("event_id", &seeds.event_id)],
    ));
    probes.extend(body_endpoint(
        post.clone(),
        &format!("{subscription_path}/recover"),
        &[("since", r#""2026-01-01T00:00:00Z""#)],
        &["since", "until"],
    ));
    probes.extend(
        path_probes(post.clone(), "/api/v1/events/subscriptions/{subscription_id}/recover", &subscription_id)
            .into_iter()
            .map(|probe| probe.body(r#"{"since": "2026-01-01T00:00:00Z"}"#)),
    );

    // Streams and projections.
    probes.extend(path_probes(get.clone(), "/api/v1/events/stream/{stream_id}", &[("stream_id", "user:fuzz-user")]));
    probes.extend(query_probes(get.clone(), "/api/v1/events/stream/user:fuzz-user", &["from_version", "limit"]));
    let definition = [("name", r#""fuzz_d""#), ("entity_type", r#""order""#)];
    probes.extend(body_endpoint(
        post.clone(),
        "/api/v1/events/projections/definitions",
        &definition,
        &["name", "entity_type", "event_types", "reducer"],
    ));
    probes.extend(query_probes(get.clone(), "/api/v1/events/projections/definitions", &["unknown"]));
    probes.extend(path_probes(
        post.clone(),
        "/api/v1/events/projections/definitions/{name}/rebuild",
        &[("name", "fuzz_def")],
    ));
    let entity = [("entity_type", "user"), ("entity_id", "fuzz-user")];
    probes.extend(path_probes(get.clone(), "/api/v1/events/projections/{entity_type}/{entity_id}", &entity));
    probes.extend(path_probes(post.clone(), "/api/v1/events/projections/{entity_type}/{entity_id}/rebuild", &entity));
    probes.extend(query_probes(
        get.clone(),
        "/api/v1/events/projections/user/fuzz-user",
        &["name", "as_of_version", "as_of"],
    ));
    probes.extend(query_probes(post.clone(), "/api/v1/events/projections/user/fuzz-user/rebuild", &["name"]));

    // Open endpoints.
    for path in
        ["/health", "/health/live", "/health/ready", "/metrics", "/openapi.yaml", "/api/v1/events/frontend/health"]
    {
        probes.extend(query_probes(get.clone(), path, &["unknown"]));
    }
    probes
}

/// Sends one probe and judges the answer; collects the event ids it got accepted.
async fn send(app: &TestApp, probe: Probe) -> Outcome {
    let mut request = app.http.request(probe.method.clone(), app.url(&probe.path)).timeout(Duration::from_secs(30));
    for (name, value) in &probe.headers {
        request = request.header(*name, value.as_str());
    }
    if let Some(body) = probe.body {
        request = request.body(body);
    }
    let label = || {
        let path: String = probe.path.chars().take(100).collect();
        let cut = if probe.path.chars().count() > 100 { "…" } else { "" };
        format!("{} {path}{cut} [{}]", probe.method, probe.input)
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(format!("{}: no answer ({error:?})", label())),
    };
    let status = response.status();
    let text = match response.bytes().await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => return Outcome::Failed(format!("{}: {status}, body unreadable ({error})", label())),
    };
    let excerpt: String = text.chars().take(300).collect();
    if status.is_server_error() {
        return Outcome::Failed(format!("{}: {status} {excerpt}", label()));
    }
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status.is_client_error() && !answer["code"].is_string() {
        return Outcome::Failed(format!("{}: {status} not in the error shape: {excerpt:?}", label()));
    }
    Outcome::Fine { accepted: if status.is_success() { accepted_ids(&answer) } else { Vec::new() } }
}

/// The event ids an ingest answer says were accepted (every ingest endpoint's shape).
fn accepted_ids(answer: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    let items = match answer {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    for item in items {
        if let (Some(id), Some(_)) = (item["event_id"].as_str(), item["event_type"].as_str()) {
            ids.push(id.to_owned());
        }
        if item["status"] == "accepted"
            && let Some(id) = item["event_id"].as_str()
        {
            ids.push(id.to_owned());
        }
        if let Some(many) = item["event_ids"].as_array()
            && item.get("dry_run").is_none()
        {
            ids.extend(many.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_and_the_service_keeps_working() {
    let app = spawn_app().await;
    let seeds = seed(&app).await;
    let probes = corpus(&seeds);
    let total = probes.len();
    let started = Instant::now();
    let outcomes: Vec<Outcome> =
        futures::stream::iter(probes).map(|probe| send(&app, probe)).buffer_unordered(CONCURRENCY).collect().await;
    let mut failures = Vec::new();
    let mut accepted = BTreeSet::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Fine { accepted: ids } => accepted.extend(ids),
            Outcome::Failed(failure) => failures.push(failure),
        }
    }
    eprintln!("fuzz: {total} requests in {:.1?}, {} events accepted", started.elapsed(), accepted.len());

    // NUL and surrogates: refused at the door (4xx), or accepted and then stored as sent.
    let mut at_the_door = Vec::new();
    for (input, body, data) in [
        ("NUL in data", r#"{"event_type": "fuzz.nul", "data": {"a": "b\u0000c"}}"#, json!({"a": "b\u{0}c"})),
        ("NUL in a data key", r#"{"event_type": "fuzz.nul", "data": {"a\u0000": 1}}"#, json!({"a\u{0}": 1})),
        ("NUL in user_id", r#"{"event_type": "fuzz.nul", "user_id": "u\u0000"}"#, json!({})),
        ("NUL in the event type", r#"{"event_type": "fuzz.\u0000"}"#, json!({})),
        ("a lone surrogate in data", r#"{"event_type": "fuzz.surrogate", "data": {"a": "\ud800"}}"#, Value::Null),
        (
            "an escaped surrogate pair",
            r#"{"event_type": "fuzz.surrogate", "data": {"a": "\ud83d\udca5"}}"#,
            json!({"a": "💥"}),
        ),
    ] {
        let (status, answer) = app.post_raw("/api/v1/events/create", body.to_owned()).await;
        match answer["event_id"].as_str() {
            Some(id) if status.is_success() => {
                accepted.insert(id.to_owned());
                at_the_door.push((input, id.to_owned(), data));
            }
            _ if status.is_client_error() => {}
            _ => failures.push(format!("create [{input}]: {status} {answer}")),
        }
    }
    if !at_the_door.iter().any(|(input, _, _)| *input == "an escaped surrogate pair") {
        failures.push("create [an escaped surrogate pair]: a valid character was refused".to_owned());
    }

    // Every accepted event is stored; none was dead-lettered.
    let ids: Vec<Uuid> = accepted.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
    let stored = wait_until(Duration::from_secs(20), || async {
        let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM event.events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default();
        (stored.len() == ids.len()).then_some(())
    })
    .await;
    if stored.is_none() {
        let found: BTreeSet<Uuid> = sqlx::query_scalar("SELECT event_id FROM event.events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&app.pool)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        for id in ids.iter().filter(|id| !found.contains(id)) {
            failures.push(format!("event {id} was accepted and is not stored"));
        }
    }
    for (input, id, data) in at_the_door {
        let (status, stored) = app.get(&format!("/api/v1/events/{id}")).await;
        if status != StatusCode::OK || stored["data"] != data {
            failures.push(format!("create [{input}] was accepted as {id}; stored: {status} {stored}"));
        }
    }
    for letter in app.dead_letters().await {
        let reason =
            letter.headers.get("Event-Service-Reason").map(|value| value.as_str().to_owned()).unwrap_or_default();
        let event: Value = serde_json::from_slice(&letter.payload).unwrap_or(Value::Null);
        let fields = ["event_type", "user_id", "device_id", "stream_id", "timestamp", "created_at"].map(|name| {
            let text: String = event[name].to_string().chars().take(60).collect();
            format!("{name}={text}")
        });
        failures.push(format!("dead letter on {} ({reason}): {}", letter.subject, fields.join(" ")));
    }

    // Still alive and still working.
    let (status, ready) = app.get("/health/ready").await;
    if status != StatusCode::OK {
        failures.push(format!("GET /health/ready afterwards: {status} {ready}"));
    }
    let before = app.count_events().await;
    let (status, created) =
        app.post("/api/v1/events/create", &json!({"event_type": "fuzz.after", "user_id": "u"})).await;
    if status == StatusCode::OK {
        let id = created["event_id"].as_str().unwrap_or_default();
        let (status, stored) = app.get(&format!("/api/v1/events/{id}")).await;
        if status != StatusCode::OK || stored["event_type"] != "fuzz.after" {
            failures.push(format!("a normal event after the fuzz is not readable: {status} {stored}"));
        }
        if app.count_events().await != before + 1 {
            failures.push("a normal event after the fuzz was not stored once".to_owned());
        }
    } else {
        failures.push(format!("a normal create after the fuzz: {status} {created}"));
    }

    assert!(
        failures.is_empty(),
        "{} of {total} hostile requests (and the checks after them) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
