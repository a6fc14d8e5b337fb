//! Hostile input at every endpoint: a deterministic corpus of wrong JSON types for every known
//! field, numbers no integer holds, deep nesting, broken UTF-8, NUL characters and lone
//! surrogates, huge strings and keys, broken `Content-Encoding`, and hostile path and query
//! parameters. NATS and PostgreSQL are up, so no answer may be a 5xx (not even a 503); every
//! 4xx is in the service's error shape (`{"code", "detail"}`); every event that was accepted
//! is stored; and afterwards the service is still ready and still stores a normal event.
//!
//! All failures are gathered and reported together (method, path, input, status, body).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, spawn_app, wait_until};
use corpus::{corpus, seed};
use probes::Probe;

mod corpus;
mod probes;

/// Requests in flight at once.
const CONCURRENCY: usize = 12;

/// What one probe did wrong, or the events it got accepted.
enum Outcome {
    Fine { accepted: Vec<String> },
    Failed(String),
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
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(format!("{}: no answer ({error:?})", label())),
    };
    let status = response.status();
    let streams =
        response.headers().get("content-type").is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    if status.is_success() && streams {
        // A live tail never ends: its opening is the answer.
        return match response.chunk().await {
            Ok(Some(_)) => Outcome::Fine { accepted: Vec::new() },
            other => Outcome::Failed(format!("{}: a live tail that did not open ({other:?})", label())),
        };
    }
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

/// The path templates of the OpenAPI document (`  /api/v1/...:` lines under `paths`).
fn documented_paths() -> Vec<&'static str> {
    include_str!("../../../docs/openapi.yaml")
        .lines()
        .filter_map(|line| line.strip_prefix("  /").and_then(|rest| rest.strip_suffix(':')))
        .collect()
}

/// Whether a concrete path (query left out) fits a template (`{name}` is one segment).
fn fits(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("").trim_start_matches('/');
    let (template, path): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    template.len() == path.len()
        && template.iter().zip(&path).all(|(want, got)| (want.starts_with('{') && !got.is_empty()) || want == got)
}

#[test]
fn the_corpus_probes_every_documented_path() {
    let seeds = corpus::Seeds::placeholder();
    let probes = corpus(&seeds);
    let missing: Vec<&str> = documented_paths()
        .into_iter()
        .filter(|template| !probes.iter().any(|probe| fits(template, &probe.path)))
        .collect();
    assert!(documented_paths().len() > 30, "the OpenAPI paths are read");
    assert!(missing.is_empty(), "paths of docs/openapi.yaml the fuzz corpus does not probe: {missing:?}");
}
