//! The corpus: every endpoint of docs/openapi.yaml with the probes that fit it, and the seeded
//! resources their path parameters point at.

use reqwest::{Method, StatusCode};
use serde_json::json;

use super::probes::*;
use crate::harness::TestApp;

/// Ids of the things the path parameters point at, so hostile input reaches past the lookup.
pub(super) struct Seeds {
    pub(super) event_id: String,
    pub(super) processor_id: String,
    pub(super) subscription_id: String,
    pub(super) replay_id: String,
}

impl Seeds {
    /// Ids of nothing, for looking at the corpus without a service.
    pub(super) fn placeholder() -> Self {
        let id = "00000000-0000-7000-8000-000000000000".to_owned();
        Self { event_id: id.clone(), processor_id: id.clone(), subscription_id: "s".to_owned(), replay_id: id }
    }
}

pub(super) async fn seed(app: &TestApp) -> Seeds {
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
pub(super) fn corpus(seeds: &Seeds) -> Vec<Probe> {
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

    // Schemas, on a type no other probe sends (a hostile schema must not refuse their events).
    let schema_path = "/api/v1/events/schemas/fuzz.schema.only";
    let schema = [("schema", r#"{"type": "object"}"#), ("mode", r#""flag""#)];
    let schema_fields = ["schema", "schema.type", "schema.properties", "mode", "redact"];
    probes.extend(body_endpoint(put.clone(), schema_path, &schema, &schema_fields));
    probes.extend(query_probes(put.clone(), &format!("{schema_path}?x=1"), &["compatibility"]));
    probes.extend(path_probes(
        get.clone(),
        "/api/v1/events/schemas/{event_type}",
        &[("event_type", "fuzz.schema.only")],
    ));
    probes.push(Probe::new(get.clone(), "/api/v1/events/schemas", "the list"));

    // The live tail.
    let live = "/api/v1/events/live";
    probes.extend(query_probes(get.clone(), live, &["event_type", "user_id", "source", "category", "heartbeat"]));
    for (name, value) in hostile_query_values() {
        probes.push(Probe::new(get.clone(), live, format!("Last-Event-ID: {name}")).header("last-event-id", value));
    }

    // Dead letters. A purge probe always names a reason no stage gives, so no probe can delete
    // the dead letters this run checks for at its end.
    let letters = "/api/v1/events/deadletters";
    let filters = ["stage", "reason", "event_type", "since", "until", "after", "limit"];
    probes.extend(query_probes(get.clone(), letters, &filters));
    let never = format!("{letters}?reason=fuzz_never");
    probes.extend(query_probes(delete.clone(), &never, &["stage", "event_type", "since", "until", "all"]));
    let redrive = [("seqs", "[999999]")];
    let redrive_fields = ["seqs", "filter", "filter.stage", "filter.reason", "filter.since", "payload"];
    probes.extend(body_endpoint(post.clone(), &format!("{letters}/redrive"), &redrive, &redrive_fields));
    for method in [get.clone(), delete.clone()] {
        probes.extend(path_probes(method, "/api/v1/events/deadletters/{seq}", &[("seq", "999999")]));
    }

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
