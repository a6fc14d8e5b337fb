//! What operators see: `/metrics` read with the Prometheus project's own Python parser, the
//! probes, and trace context followed from the producer to the subscriber and the processor.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::clients::python;
use crate::harness::{TestApp, callback_args, dispatcher_args, spawn_app, wait_until};
use crate::receiver::{Received, Receiver};

/// Reads a scrape with `prometheus_client.parser` and prints every sample as JSON.
const PARSE: &str = r#"
import json, os
from prometheus_client.parser import text_string_to_metric_families
text = open(os.environ["SCRAPE"]).read()
families, samples = {}, []
for family in text_string_to_metric_families(text):
    families[family.name] = family.type
    samples += [[s.name, s.labels, s.value] for s in family.samples]
print(json.dumps({"families": families, "samples": samples}))
"#;

/// One scrape as the parser understood it.
#[derive(Deserialize)]
struct Scrape {
    families: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The sum of the samples called `name` whose labels include `labels`; 0 when none is.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(sample, have, _)| {
                sample == name && labels.iter().all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|(sample, have, _)| {
            sample == name && labels.iter().all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
        })
    }
}

async fn scrape(url: &str) -> Scrape {
    let answer = reqwest::get(url).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let content_type = answer.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scrape.txt");
    std::fs::write(&path, answer.text().await.unwrap()).unwrap();
    let parsed = python(PARSE, &[("SCRAPE", path.to_str().unwrap())]).await;
    serde_json::from_str(&parsed).unwrap()
}

/// By how much a counter moved between two scrapes.
fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

async fn send_every_way(app: &TestApp) -> String {
    let (status, created) = app.post("/api/v1/events/create", &json!({"event_type": "m.create"})).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let batch = json!([{"event_type": "m.batch"}, {"event_type": "m.batch"}, {"event_type": "m.batch"}]);
    assert_eq!(app.post("/api/v1/events/batch", &batch).await.0, StatusCode::OK);
    assert_eq!(app.post("/api/v1/events/frontend", &json!({"event_type": "m.front"})).await.0, StatusCode::OK);
    let front = json!({"events": [{"event_type": "m.front"}, {"event_type": "m.front"}]});
    assert_eq!(app.post("/api/v1/events/frontend/batch", &front).await.0, StatusCode::OK);
    let tracking = json!({"batch": [{"type": "track", "event": "M Tracked", "userId": "u", "messageId": "m-t1"},
                                    {"type": "track", "event": "M Tracked", "userId": "u", "messageId": "m-t2"}]});
    assert_eq!(app.post("/v1/batch", &tracking).await.0, StatusCode::OK);
    let rudder = json!([{"type": "track", "event": "M Rudder", "userId": "u", "messageId": "m-r1"}]);
    assert_eq!(app.post("/webhooks/rudderstack", &rudder).await.0, StatusCode::OK);
    let cloud = app
        .http
        .post(app.url("/api/v1/events/cloudevents"))
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "m-ce", "source": "/m", "type": "m.cloud"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(cloud.status(), StatusCode::OK);
    for n in 0..2 {
        let body = json!({"event_type": "m.native", "data": {"n": n}}).to_string().into_bytes();
        app.publish("events.backend.system.m.native", HeaderMap::new(), body).await;
    }
    created["event_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_sent() {
    let app = spawn_app().await;
    let metrics = app.url("/metrics");
    let before = scrape(&metrics).await;

    let event_id = send_every_way(&app).await;
    app.publish("events.backend.system.m.poison", HeaderMap::new(), b"{not json".to_vec()).await;
    let (status, _) = app.post("/api/v1/events/create", &json!({"event_type": ""})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    for _ in 0..2 {
        assert_eq!(app.get(&format!("/api/v1/events/{event_id}")).await.0, StatusCode::OK);
    }
    assert_eq!(app.get("/no/such/route").await.0, StatusCode::NOT_FOUND);
    app.wait_for_events(13, Duration::from_secs(20)).await;
    app.wait_for_dead_letters(1).await;
    // The persister acks after it has stored; give the last acks a moment to be counted.
    let after = wait_until(Duration::from_secs(10), || async {
        let after = scrape(&metrics).await;
        let settled = moved(&before, &after, "event_stage_messages_total", &[("stage", "persister")]);
        (settled >= 14.0 && after.value("event_persister_lag_messages", &[]) == 0.0).then_some(after)
    })
    .await
    .expect("the persister settles every message and catches up");

    let accepted = |path| moved(&before, &after, "event_events_accepted_total", &[("path", path)]);
    let by_path: Vec<(&str, f64)> = ["create", "batch", "frontend", "tracking", "rudderstack", "cloudevents", "nats"]
        .into_iter()
        .map(|path| (path, accepted(path)))
        .collect();
    assert_eq!(
        by_path,
        [
            ("create", 1.0),
            ("batch", 3.0),
            ("frontend", 3.0),
            ("tracking", 2.0),
            ("rudderstack", 1.0),
            ("cloudevents", 1.0),
            ("nats", 2.0)
        ]
    );
    let persister =
        |outcome| moved(&before, &after, "event_stage_messages_total", &[("stage", "persister"), ("outcome", outcome)]);
    assert_eq!((persister("ack"), persister("dead_letter"), persister("retry")), (13.0, 1.0, 0.0));
    assert_eq!(
        moved(&before, &after, "event_dead_letters_total", &[("stage", "persister"), ("reason", "invalid_json")]),
        1.0
    );

    let http = |route, method, status| {
        moved(&before, &after, "event_http_requests_total", &[("route", route), ("method", method), ("status", status)])
    };
    assert_eq!(http("/api/v1/events/{event_id}", "GET", "200"), 2.0);
    assert_eq!(http("/api/v1/events/create", "POST", "200"), 1.0);
    assert_eq!(http("/api/v1/events/create", "POST", "422"), 1.0);
    assert_eq!(http("unmatched", "GET", "404"), 1.0);
    assert!(!after.samples.iter().any(|(_, labels, _)| labels.get("route").is_some_and(|r| r.contains(&event_id))));
    let latency = ("route", "/api/v1/events/{event_id}");
    assert_eq!(moved(&before, &after, "event_http_request_duration_seconds_count", &[latency]), 2.0);
    assert_eq!(after.families["event_http_request_duration_seconds"], "histogram");
    assert_eq!(after.families["event_events_accepted"], "counter");

    let consumer = [("stream", "EVENTS"), ("consumer", "persister")];
    assert!(after.has("event_consumer_pending_messages", &consumer), "backlog of the persister's consumer");
    assert_eq!(after.value("event_consumer_ack_pending_messages", &consumer), 0.0);
    assert!(after.value("event_db_pool_connections", &[]) >= 1.0);
    assert!(moved(&before, &after, "event_stage_batches_total", &[("stage", "persister")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_runs_and_deliveries_are_counted_by_outcome() {
    let mut app = spawn_app().await;
    app.start_processor().await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    let hooks = Receiver::start().await;
    let processor = json!({"processor_name": "m_hook", "processor_type": "webhook", "max_retries": 0,
                           "config": {"url": hooks.url("ok")}, "filters": {"event_type": "m.*"}});
    assert_eq!(app.post("/api/v1/events/processors", &processor).await.0, StatusCode::OK);
    let failing = json!({"processor_name": "m_fail", "processor_type": "webhook", "max_retries": 0,
                         "config": {"url": hooks.url("fail")}, "filters": {"event_type": "m.*"}});
    assert_eq!(app.post("/api/v1/events/processors", &failing).await.0, StatusCode::OK);
    let subscription = json!({"event_types": ["m.*"], "callback_url": hooks.url("sub")});
    assert_eq!(app.post("/api/v1/events/subscriptions", &subscription).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = scrape(&app.url("/metrics")).await;

    app.create(json!({"event_type": "m.counted"})).await;
    wait_until(Duration::from_secs(20), || async { (hooks.count() >= 3).then_some(()) })
        .await
        .expect("both processors and the subscriber were called");
    let after = wait_until(Duration::from_secs(10), || async {
        let after = scrape(&app.url("/metrics")).await;
        (moved(&before, &after, "event_deliveries_total", &[]) >= 1.0
            && moved(&before, &after, "event_processor_runs_total", &[]) >= 2.0)
            .then_some(after)
    })
    .await
    .expect("the runs and the delivery are counted");

    let runs = |processor, outcome| {
        moved(&before, &after, "event_processor_runs_total", &[("processor", processor), ("outcome", outcome)])
    };
    assert_eq!((runs("m_hook", "success"), runs("m_fail", "failed"), runs("m_fail", "success")), (1.0, 1.0, 0.0));
    assert_eq!(moved(&before, &after, "event_deliveries_total", &[("outcome", "delivered")]), 1.0);
    assert_eq!(moved(&before, &after, "event_subscriptions_disabled_total", &[]), 0.0);
    for consumer in ["processor", "dispatcher"] {
        assert!(after.has("event_consumer_pending_messages", &[("consumer", consumer)]), "{consumer}");
    }
}

/// The trace id of a request's `traceparent` (and the span id), checked to be well formed.
fn trace_of(received: &Received) -> (String, String) {
    let header = received.headers.get("traceparent").expect("a traceparent").to_str().unwrap();
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[1].len(), parts[2].len()), (4, "00", 32, 16), "{header}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_and_processors_get_the_producers_trace() {
    let mut app = spawn_app().await;
    app.start_processor().await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    let hooks = Receiver::start().await;
    let processor = json!({"processor_name": "t_hook", "processor_type": "webhook",
                           "config": {"url": hooks.url("processor")}, "filters": {"event_type": "t.*"}});
    assert_eq!(app.post("/api/v1/events/processors", &processor).await.0, StatusCode::OK);
    let subscription = json!({"event_types": ["t.*"], "callback_url": hooks.url("subscriber")});
    assert_eq!(app.post("/api/v1/events/subscriptions", &subscription).await.0, StatusCode::OK);
    let service = json!({"processor_name": "t_service", "processor_type": "nats", "config": {"subject": "svc.t"},
                         "filters": {"event_type": "t.http"}});
    assert_eq!(app.post("/api/v1/events/processors", &service).await.0, StatusCode::OK);
    let mut requests = app.bus_client().subscribe("svc.t").await.unwrap();
    let client = app.bus_client().clone();
    let (asked, mut asked_with) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let header = request.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.to_string());
            let _ = asked.send(header);
            if let Some(reply) = request.reply {
                client.publish(reply, "ok".into()).await.unwrap();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Over HTTP, with the producer's trace.
    let producer_trace = "0af7651916cd43dd8448eb211c80319c";
    let answer = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("traceparent", format!("00-{producer_trace}-b7ad6b7169203331-01"))
        .header("tracestate", "vendor=opaque")
        .json(&json!({"event_type": "t.http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let http_event = answer.json::<serde_json::Value>().await.unwrap()["event_id"].as_str().unwrap().to_owned();
    // Over NATS, with a traceparent header.
    let native_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", format!("00-{native_trace}-00f067aa0ba902b7-01").as_str());
    app.publish("events.backend.system.t.native", headers, json!({"event_type": "t.native"}).to_string().into_bytes())
        .await;
    // Without any: a trace is started and both calls still share it.
    assert_eq!(app.post("/api/v1/events/create", &json!({"event_type": "t.untraced"})).await.0, StatusCode::OK);

    let received = wait_until(Duration::from_secs(20), || async {
        let received = hooks.received();
        (received.len() >= 6).then_some(received)
    })
    .await
    .expect("both calls for all three events");
    let calls = |event_type: &str| -> Vec<(String, (String, String))> {
        received.iter().filter(|r| r.body["event_type"] == event_type).map(|r| (r.path.clone(), trace_of(r))).collect()
    };
    let traced = calls("t.http");
    assert_eq!(traced.len(), 2);
    for (path, (trace, span)) in &traced {
        assert_eq!(trace, producer_trace, "{path}");
        assert_ne!(span, "b7ad6b7169203331", "{path} gets a span of its own");
    }
    let nats_call = tokio::time::timeout(Duration::from_secs(10), asked_with.recv()).await.unwrap().unwrap();
    assert_eq!(nats_call.expect("a traceparent NATS header").split('-').nth(1), Some(producer_trace));
    let delivered = received.iter().find(|r| r.path == "subscriber" && r.body["event_id"] == http_event.as_str());
    assert_eq!(delivered.unwrap().headers["tracestate"], "vendor=opaque");
    assert!(calls("t.native").iter().all(|(_, (trace, _))| trace == native_trace));
    let untraced = calls("t.untraced");
    assert_eq!(untraced.len(), 2);
    assert_eq!(untraced[0].1.0, untraced[1].1.0, "one trace for the event, new or not");
    assert!(![producer_trace, native_trace].contains(&untraced[0].1.0.as_str()));
}
