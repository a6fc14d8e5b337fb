//! The live tail as clients see it: a real SSE client (httpx-sse) follows filtered events,
//! disconnects, and resumes with `Last-Event-ID` without a gap or a repeat; heartbeats arrive
//! on an idle tail; the tail limit answers 503; a tail that goes away frees its place.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::clients::python;
use crate::harness::{Options, spawn_app, spawn_app_with, wait_until};

const FOLLOW_AND_RESUME: &str = r#"
import json, os, httpx
from httpx_sse import connect_sse

base = os.environ["BASE"]

def send(client, types):
    events = [{"event_type": t, "user_id": "tail-user", "data": {"n": i}} for i, t in enumerate(types)]
    answer = client.post(base + "/api/v1/events/batch", json=events)
    assert answer.status_code == 200, answer.text

def read(source, count):
    got = []
    for sse in source.iter_sse():
        if sse.event == "event":
            event = json.loads(sse.data)
            got.append([int(sse.id), event["event_type"], event["user_id"]])
            if len(got) == count:
                return got
    raise SystemExit("the tail ended early")

out = {}
with httpx.Client(timeout=30) as client:
    url = base + "/api/v1/events/live?event_type=order.*&user_id=tail-user"
    with connect_sse(client, "GET", url) as source:
        assert source.response.status_code == 200, source.response.status_code
        assert source.response.headers["content-type"].startswith("text/event-stream")
        send(client, ["order.placed", "user.signed_up", "order.paid", "order.shipped"])
        out["first"] = read(source, 2)
    # Away for a while: more events arrive, then the tail resumes where it stopped.
    send(client, ["order.delivered", "user.left", "order.refunded"])
    last = str(out["first"][-1][0])
    with connect_sse(client, "GET", url, headers={"Last-Event-ID": last}) as source:
        out["resumed"] = read(source, 3)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_follows_filtered_events_and_resumes_with_last_event_id() {
    let app = spawn_app().await;
    // Events before the tail opens are not shown to a new tail.
    app.post("/api/v1/events/create", &serde_json::json!({"event_type": "order.early", "user_id": "tail-user"})).await;
    let out: Value = serde_json::from_str(python(FOLLOW_AND_RESUME, &[("BASE", &app.base)]).await.trim()).unwrap();
    let types = |key: &str| -> Vec<String> {
        out[key].as_array().unwrap().iter().map(|event| event[1].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(types("first"), ["order.placed", "order.paid"]);
    assert_eq!(types("resumed"), ["order.shipped", "order.delivered", "order.refunded"], "no gap, no repeat");
    let ids: Vec<u64> = ["first", "resumed"]
        .iter()
        .flat_map(|key| out[*key].as_array().unwrap().iter().map(|event| event[0].as_u64().unwrap()))
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids are stream sequences, in order: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tails_get_heartbeats_and_the_tail_limit_holds() {
    let app = spawn_app_with(Options { live_max_tails: 1, ..Options::default() }).await;
    let url = app.url("/api/v1/events/live?heartbeat=1");
    let mut tail = app.http.get(&url).send().await.unwrap();
    assert_eq!(tail.status(), StatusCode::OK);
    let mut text = String::new();
    let started = std::time::Instant::now();
    while text.matches(": heartbeat").count() < 2 && started.elapsed() < Duration::from_secs(10) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), tail.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.matches(": heartbeat").count() >= 2, "heartbeats on an idle tail: {text:?}");

    // One tail is the limit here: a second is refused with a code.
    let (status, refused) = app.get("/api/v1/events/live").await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("too_many_tails")));
    let (status, refused) = app.get("/api/v1/events/live?source=moon").await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_error")));

    // The first goes away: its place is free again.
    drop(tail);
    let reopened = wait_until(Duration::from_secs(10), || async {
        let response = app.http.get(&url).send().await.unwrap();
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    assert!(reopened.is_some(), "a closed tail frees its place");
}
