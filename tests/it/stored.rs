//! STORED, the public stream of stored events, read the way the README tells a downstream
//! team to: the README's own nats-py example (`examples/stored_consumer.py`), unmodified, with
//! a durable consumer of its own.

use std::time::Duration;

use serde_json::{Value, json};

use crate::clients::python;
use crate::harness::{Options, TestApp, spawn_app, spawn_app_with, wait_until};

/// Sends events `range` as one batch of `order.*` events, answered once JetStream holds them.
async fn send(app: &TestApp, range: std::ops::Range<usize>) {
    let batch: Vec<Value> = range
        .map(|i| {
            json!({
                "event_type": if i % 2 == 0 { "order.placed" } else { "order.paid" },
                "event_source": "backend",
                "event_category": "order",
                "stream_id": format!("order:{}", i % 7),
                "data": {"n": i},
            })
        })
        .collect();
    let response = app
        .http
        .post(app.url("/api/v1/events/batch"))
        .header("Prefer", "respond-async")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
}

/// The stored `order.*` rows, in EVENTS order.
async fn stored_rows(app: &TestApp) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT event_id::text, stream_seq FROM event.events WHERE event_type LIKE 'order.%' ORDER BY stream_seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn stored_messages(app: &TestApp) -> u64 {
    app.js.get_stream("STORED").await.unwrap().get_info().await.unwrap().state.messages
}

/// Waits until STORED holds `count` messages.
async fn wait_for_stored(app: &TestApp, count: u64, what: &str) {
    let reached =
        wait_until(Duration::from_secs(30), || async { (stored_messages(app).await == count).then_some(()) }).await;
    assert!(reached.is_some(), "{what}: STORED holds {} messages, not {count}", stored_messages(app).await);
}

/// Makes STORED refuse every message (it takes no subject the persister publishes on) and
/// returns its configuration, to put back with [`resume_stored`].
async fn pause_stored(app: &TestApp) -> async_nats::jetstream::stream::Config {
    let mut stored = app.js.get_stream("STORED").await.unwrap();
    let mut config = stored.info().await.unwrap().config.clone();
    let working = config.clone();
    config.subjects = vec!["paused.>".to_owned()];
    app.js.update_stream(config).await.unwrap();
    working
}

async fn resume_stored(app: &TestApp, config: async_nats::jetstream::stream::Config) {
    app.js.update_stream(config).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_consumer_gets_every_stored_event_once_in_order_across_a_persister_crash() {
    let mut app = spawn_app().await;
    send(&app, 0..50).await;
    // A NATS-native producer's message the persister refuses, and one it takes.
    app.publish("events.backend.order.order.broken", async_nats::HeaderMap::new(), b"{not json".to_vec()).await;
    let native = json!({"event_type": "order.native", "data": {"n": -1}}).to_string().into_bytes();
    app.publish("events.backend.order.order.native", async_nats::HeaderMap::new(), native).await;
    app.wait_for_events(51, Duration::from_secs(30)).await;
    app.wait_for_dead_letters(1).await;
    wait_for_stored(&app, 51, "the first 51").await;

    // STORED stops taking messages: the rows are stored, their STORED messages fail and the
    // persister holds them.
    let mut config = pause_stored(&app).await;
    send(&app, 50..120).await;
    app.wait_for_events(121, Duration::from_secs(30)).await;
    assert_eq!(stored_messages(&app).await, 51, "nothing more reached STORED while it refused");

    // A crash with rows committed and not on STORED. STORED comes back with a duplicate window
    // too short to help: only the persister's own resume point keeps it from repeating.
    app.kill_persister().await;
    config.duplicate_window = Duration::from_secs(1);
    resume_stored(&app, config).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.start_persister().await;
    send(&app, 120..150).await;
    app.wait_for_events(151, Duration::from_secs(30)).await;
    let rows = stored_rows(&app).await;
    assert_eq!(rows.len(), 151);
    let all_there = wait_until(Duration::from_secs(30), || async {
        (stored_messages(&app).await >= rows.len() as u64).then_some(())
    })
    .await;
    assert!(all_there.is_some(), "STORED caught up with the rows");

    // The README's consumer, as a downstream team runs it.
    let url = app.nats_server.url.clone();
    let output = python(
        include_str!("../../examples/stored_consumer.py"),
        &[("NATS_URL", &url), ("DURABLE", "billing"), ("FILTER", "event.stored.*.*.order.>"), ("EXIT_WHEN_IDLE", "1")],
    )
    .await;
    let received: Vec<Value> = output.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let got: Vec<(String, i64)> = received
        .iter()
        .map(|event| (event["event_id"].as_str().unwrap().to_owned(), event["stream_seq"].as_i64().unwrap()))
        .collect();
    let first_difference = got.iter().zip(&rows).position(|(got, row)| got != row);
    assert!(
        got == rows,
        "every stored row once, in EVENTS order, and nothing else: {} messages for {} rows, first difference at {first_difference:?}",
        got.len(),
        rows.len()
    );
    for event in &received {
        assert_eq!(event["ce_type"], event["event_type"]);
        assert_eq!(event["schema_version"], "1");
        assert_ne!(event["event_type"], "order.broken", "a refused message never reaches STORED");
    }

    // Its backlog shows in /metrics, under its own name.
    let lag = "event_consumer_pending_messages{stream=\"STORED\",consumer=\"billing\"} 0";
    let metrics = wait_until(Duration::from_secs(10), || async {
        let text = app.http.get(app.url("/metrics")).send().await.ok()?.text().await.ok()?;
        text.contains(lag).then_some(text)
    })
    .await;
    let metrics = metrics.expect("the consumer's lag in /metrics");
    assert!(metrics.contains("event_stored_messages_published_total "), "{metrics}");
}

/// The README shows the examples that this test and the build check, word for word.
#[test]
fn the_readme_shows_the_checked_examples() {
    let readme = include_str!("../../README.md");
    for example in
        [include_str!("../../examples/stored_consumer.py"), include_str!("../../examples/stored_consumer.rs")]
    {
        assert!(readme.contains(example.trim_end()), "README lacks:\n{example}");
    }
}

/// The event ids STORED holds, in its order.
async fn stored_ids(app: &TestApp) -> Vec<String> {
    let stream = app.js.get_stream("STORED").await.unwrap();
    let mut ids = Vec::new();
    for sequence in 1..=stream.get_info().await.unwrap().state.last_sequence {
        let message = stream.direct_get(sequence).await.unwrap();
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        ids.push(event["event_id"].as_str().unwrap().to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stored_off_nothing_is_published_and_once_on_it_goes_on_from_the_new_rows() {
    let mut app = spawn_app_with(Options { start_persister: false, ..Options::default() }).await;
    app.stored_stream = false;
    app.start_persister().await;
    send(&app, 0..40).await;
    app.wait_for_events(40, Duration::from_secs(30)).await;
    // Whatever an announcing persister would have published after the commit has had time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored_messages(&app).await, 0, "nothing on STORED while it is off");

    app.stop_persister().await;
    app.stored_stream = true;
    app.start_persister().await;
    send(&app, 40..70).await;
    app.wait_for_events(70, Duration::from_secs(30)).await;
    let published =
        wait_until(Duration::from_secs(30), || async { (stored_messages(&app).await >= 30).then_some(()) }).await;
    assert!(published.is_some(), "the new rows reach STORED");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let new_rows: Vec<String> = stored_rows(&app).await.into_iter().skip(40).map(|(id, _)| id).collect();
    assert_eq!(stored_ids(&app).await, new_rows, "the rows stored since, in order, and none from before");
}

/// Turning STORED off passes over only the rows stored while it is off: the rows an earlier
/// persister stored with it on but could not publish still reach it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_it_still_publishes_what_an_earlier_run_stored_with_it_on() {
    let mut app = spawn_app().await;
    send(&app, 0..20).await;
    app.wait_for_events(20, Duration::from_secs(30)).await;
    wait_for_stored(&app, 20, "the first 20").await;

    // STORED refuses: the next rows are committed and not published when the persister dies.
    let config = pause_stored(&app).await;
    send(&app, 20..50).await;
    app.wait_for_events(50, Duration::from_secs(30)).await;
    app.kill_persister().await;
    assert_eq!(stored_messages(&app).await, 20, "nothing more reached STORED while it refused");

    resume_stored(&app, config).await;
    app.stored_stream = false;
    app.start_persister().await;
    wait_for_stored(&app, 50, "the rows stored while STORED was on reach it, with it off now").await;
    send(&app, 50..60).await;
    app.wait_for_events(60, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows: Vec<String> = stored_rows(&app).await.into_iter().take(50).map(|(id, _)| id).collect();
    assert_eq!(stored_ids(&app).await, rows, "the first 50 rows once, in order, and none stored while off");
}
