//! The hostile inputs, and the probes that carry them to an endpoint: bodies with a field of
//! every wrong kind, broken bodies, hostile path segments and query values, CloudEvents
//! headers.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::Method;
use serde_json::{Value, json};

/// One hostile request.
pub(super) struct Probe {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) input: String,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: Option<Vec<u8>>,
}

impl Probe {
    pub(super) fn new(method: Method, path: impl Into<String>, input: impl Into<String>) -> Self {
        Self { method, path: path.into(), input: input.into(), headers: Vec::new(), body: None }
    }

    pub(super) fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    pub(super) fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Wrong types, extreme numbers and hostile strings, as raw JSON text (`1e400` and `"\ud800"`
/// cannot be built as a `serde_json::Value`).
pub(super) fn hostile_values() -> Vec<(String, String)> {
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
pub(super) const HOSTILE_TIMES: [&str; 6] = [
    "-200000-01-01T00:00:00",
    "+200000-01-01T00:00:00",
    "-260000-01-01 00:00:00",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "2026-01-01T00:00:00Z",
];

/// A JSON object from `base` (raw values) with `field` set to `value` (raw). A dotted field
/// (`filters.event_type`) goes one object down.
pub(super) fn object(base: &[(&str, &str)], field: &str, value: &str) -> String {
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
pub(super) fn raw(base: &[(&str, &str)]) -> String {
    let parts: Vec<String> =
        base.iter().map(|(name, raw)| format!("{}: {raw}", serde_json::to_string(name).unwrap())).collect();
    format!("{{{}}}", parts.join(", "))
}

pub(super) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Bodies that are broken whatever the endpoint; `valid` is a body the endpoint takes.
pub(super) fn broken_bodies(method: &Method, path: &str, valid: &str) -> Vec<Probe> {
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
pub(super) fn field_probes(method: &Method, path: &str, base: &[(&str, &str)], fields: &[&str]) -> Vec<Probe> {
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
pub(super) fn body_endpoint(method: Method, path: &str, base: &[(&str, &str)], fields: &[&str]) -> Vec<Probe> {
    let mut probes = broken_bodies(&method, path, &raw(base));
    probes.extend(field_probes(&method, path, base, fields));
    probes
}

/// Path parameter values, already percent-encoded where they need to be.
pub(super) fn hostile_segments() -> Vec<(String, String)> {
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
pub(super) fn path_probes(method: Method, template: &str, valid: &[(&str, &str)]) -> Vec<Probe> {
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
pub(super) fn hostile_query_values() -> Vec<(String, String)> {
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
pub(super) fn query_probes(method: Method, path: &str, params: &[&str]) -> Vec<Probe> {
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
pub(super) fn cloudevent_header_probes() -> Vec<Probe> {
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
