//! Nothing acknowledged is lost: the persister stopping mid-stream, PostgreSQL going away.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use event_service::infra::local::LocalPostgres;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Options, callback_args, dispatcher_args, spawn_app, spawn_app_with, wait_until};

/// Publishes `count` events for `stream`, PubAcks pipelined; returns once all are acked.
async fn publish_many(app: &crate::harness::TestApp, from: usize, count: usize, stream: &str) {
    let mut acks = Vec::with_capacity(count);
    for i in from..from + count {
        let mut headers = HeaderMap::new();
        let id = uuid::Uuid::now_v7();
        headers.insert("Nats-Msg-Id", id.to_string().as_str());
        let body = json!({"event_id": id, "event_type": "load.tick", "stream_id": stream, "data": {"i": i}});
        acks.push(
            app.js
                .publish_with_headers("events.backend.task.load.tick", headers, body.to_string().into())
                .await
                .expect("publish"),
        );
    }
    for ack in acks {
        ack.await.expect("puback");
    }
}

async fn assert_stream_exact(app: &crate::harness::TestApp, stream: &str, expected: usize) {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (data->>'i')::bigint, stream_version FROM event.events WHERE stream_id = $1 ORDER BY stream_seq",
    )
    .bind(stream)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), expected, "every acked event exactly once");
    for (position, (i, version)) in rows.iter().enumerate() {
        assert_eq!(*i as usize, position, "stored in publish order");
        assert_eq!(*version as usize, position + 1, "versions gapless and in stream order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persister_stopped_mid_stream_loses_and_duplicates_nothing() {
    let mut app = spawn_app().await;
    let publisher = {
        let js = app.js.clone();
        tokio::spawn(async move {
            for chunk in 0..10 {
                let mut acks = Vec::new();
                for i in chunk * 300..(chunk + 1) * 300 {
                    let body = json!({"event_type": "load.tick", "stream_id": "load:one", "data": {"i": i}});
                    acks.push(js.publish("events.backend.task.load.tick", body.to_string().into()).await.unwrap());
                }
                for ack in acks {
                    ack.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    // Stop while events are flowing, let more pile up, then start a new persister.
    app.wait_for_events(300, Duration::from_secs(20)).await;
    app.stop_persister().await;
    let stopped_at = app.count_events().await;
    publisher.await.unwrap();
    assert_eq!(app.count_events().await, stopped_at, "a stopped persister writes nothing");
    app.start_persister().await;
    app.wait_for_events(3000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_stream_exact(&app, "load:one", 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persister_killed_mid_batch_is_replaced_without_waiting_for_redelivery() {
    let mut app = spawn_app().await;
    let publisher = {
        let js = app.js.clone();
        tokio::spawn(async move {
            for i in 0..4000 {
                let body = json!({"event_type": "load.tick", "stream_id": "crash:one", "data": {"i": i}});
                let ack = js.publish("events.backend.task.load.tick", body.to_string().into()).await.unwrap();
                if i % 200 == 199 {
                    ack.await.unwrap();
                }
            }
        })
    };
    app.wait_for_events(500, Duration::from_secs(20)).await;
    // Whatever it had pulled and not acked is only redelivered after the 30 s ack wait; the
    // new persister must not wait for that, nor store later events before those.
    app.kill_persister().await;
    app.start_persister().await;
    publisher.await.unwrap();
    app.wait_for_events(4000, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_stream_exact(&app, "crash:one", 4000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_accepted_while_postgres_is_down_are_stored_when_it_returns() {
    let dir = tempfile::Builder::new().prefix("evsvc-pg-own-").tempdir().unwrap();
    let mut postgres = LocalPostgres::start(dir.path(), 0, false).unwrap();
    event_service::infra::db::ensure_database(&postgres.url("postgres"), "events").await.unwrap();
    let app = spawn_app_with(Options {
        database_url: Some(postgres.url("events")),
        store_timeout_ms: 500,
        ..Options::default()
    })
    .await;
    publish_many(&app, 0, 100, "outage:one").await;
    app.wait_for_events(100, Duration::from_secs(20)).await;

    postgres.stop();
    publish_many(&app, 100, 400, "outage:one").await;
    let (status, answer) = app.post("/api/v1/events/frontend", &json!({"event_type": "during.outage"})).await;
    assert_eq!(status, StatusCode::OK, "frontend ingest does not need PostgreSQL: {answer}");
    let (status, answer) = app.post("/api/v1/events/create", &json!({"event_type": "during.outage"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "create answers 202 when the store is away: {answer}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    postgres.launch().unwrap();
    app.wait_for_events(502, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.count_events().await, 502);
    assert_stream_exact(&app, "outage:one", 500).await;
    let (_, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!(stats["total_events"], 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_picks_up_where_it_left_off() {
    let mut app = spawn_app().await;
    app.stop_persister().await;
    publish_many(&app, 0, 50, "restart:one").await;
    assert_eq!(app.count_events().await, 0);
    app.start_persister().await;
    app.wait_for_events(50, Duration::from_secs(20)).await;
    assert_stream_exact(&app, "restart:one", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_sent_as_postgres_goes_away_is_recorded_later_not_sent_again() {
    let dir = tempfile::Builder::new().prefix("evsvc-pg-own-").tempdir().unwrap();
    let mut postgres = LocalPostgres::start(dir.path(), 0, false).unwrap();
    event_service::infra::db::ensure_database(&postgres.url("postgres"), "events").await.unwrap();
    let mut app = spawn_app_with(Options { database_url: Some(postgres.url("events")), ..Options::default() }).await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    // A subscriber that answers only when the test lets it.
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
    let (counted, held) = (calls.clone(), gate.clone());
    let hook = axum::routing::post(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        let held = held.clone();
        async move {
            held.notified().await;
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().route("/hook", hook)).await });
    let (status, subscription) =
        app.post("/api/v1/events/subscriptions", &json!({"event_types": ["outage.*"], "callback_url": url})).await;
    assert_eq!(status, StatusCode::OK, "{subscription}");
    tokio::time::sleep(Duration::from_millis(400)).await;

    // The call is made; PostgreSQL goes away before the subscriber answers.
    app.create(json!({"event_type": "outage.call", "user_id": "u"})).await;
    wait_until(Duration::from_secs(10), || async { (calls.load(Ordering::SeqCst) >= 1).then_some(()) })
        .await
        .expect("the subscriber was called");
    postgres.stop();
    gate.notify_one();
    // Longer than the pool waits for a connection (5 s): the record fails and the batch is held.
    tokio::time::sleep(Duration::from_secs(7)).await;
    postgres.launch().unwrap();

    // The attempt is recorded once PostgreSQL is back, and the subscriber was called once.
    let path = format!("/api/v1/events/subscriptions/{}/deliveries", subscription["subscription_id"].as_str().unwrap());
    let log = wait_until(Duration::from_secs(30), || async {
        let (status, page) = app.get(&path).await;
        (status == StatusCode::OK && page["total"] == 1).then_some(page)
    })
    .await
    .expect("the attempt is recorded");
    assert_eq!(log["deliveries"][0]["status"], "delivered", "{log}");
    assert_eq!(log["deliveries"][0]["attempt"], 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "recorded, not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_postgres_and_liveness_does_not() {
    let dir = tempfile::Builder::new().prefix("evsvc-pg-own-").tempdir().unwrap();
    let mut postgres = LocalPostgres::start(dir.path(), 0, false).unwrap();
    event_service::infra::db::ensure_database(&postgres.url("postgres"), "events").await.unwrap();
    let app = spawn_app_with(Options { database_url: Some(postgres.url("events")), ..Options::default() }).await;
    let (status, ready) = app.get("/health/ready").await;
    assert_eq!((status, ready["status"].as_str()), (StatusCode::OK, Some("ready")), "{ready}");

    postgres.stop();
    let (status, ready) = app.get("/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!((ready["status"].as_str(), ready["code"].as_str()), (Some("not_ready"), Some("not_ready")));
    assert!(ready["detail"].as_str().unwrap().contains("postgres"), "{ready}");
    assert_eq!(ready["dependencies"]["nats"]["status"], "connected");
    let (status, live) = app.get("/health/live").await;
    assert_eq!((status, live["status"].as_str()), (StatusCode::OK, Some("live")));
    let (status, health) = app.get("/health").await;
    assert_eq!((status, health["dependencies"]["postgres"]["status"].as_str()), (StatusCode::OK, Some("unavailable")));

    postgres.launch().unwrap();
    let ready = wait_until(Duration::from_secs(20), || async {
        let (status, _) = app.get("/health/ready").await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(ready.is_some(), "ready again once PostgreSQL is back");
}
