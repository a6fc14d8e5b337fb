//! NATS-native ingest, hostile input, dead letters, dedupe and atomic batches.

use std::time::Duration;

use async_nats::HeaderMap;
use event_service::infra::bus::Bus;
use event_service::wire::{Outgoing, headers};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_on_nats_are_stored_like_http_ones() {
    let app = spawn_app().await;
    // The subject says source, category and type; the body may leave them out.
    let sequence = app
        .publish(
            "events.iot_device.telemetry.sensor.reading",
            HeaderMap::new(),
            json!({"device_id": "dev-7", "data": {"celsius": 21.5}}).to_string().into_bytes(),
        )
        .await;
    let mut headers = HeaderMap::new();
    let chosen = uuid::Uuid::now_v7();
    headers.insert("Nats-Msg-Id", chosen.to_string().as_str());
    app.publish(
        "events.backend.order.order.placed",
        headers,
        json!({"event_type": "order.placed", "event_source": "backend", "event_category": "order", "user_id": "u-5"})
            .to_string()
            .into_bytes(),
    )
    .await;
    app.wait_for_events(2, Duration::from_secs(10)).await;

    let (event_type, source, category, device, stream_id, seq): (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
    ) = sqlx::query_as(
        "SELECT event_type, event_source, event_category, device_id, stream_id, stream_seq
             FROM event.events WHERE subject = 'events.iot_device.telemetry.sensor.reading'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (event_type.as_str(), source.as_str(), category.as_str()),
        ("sensor.reading", "iot_device", "telemetry")
    );
    assert_eq!(device.as_deref(), Some("dev-7"));
    assert_eq!(stream_id.as_deref(), Some("device:dev-7"));
    assert_eq!(seq as u64, sequence);
    let (status, stored) = app.get(&format!("/api/v1/events/{chosen}")).await;
    assert_eq!(status, StatusCode::OK, "Nats-Msg-Id names the event");
    assert_eq!(stored["user_id"], "u-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_event_types_keep_subjects_and_rows_intact() {
    let app = spawn_app().await;
    let hostile =
        ["a.*.>", "with spaces in it", "ünïcødé.事件.🚀", "..", "tab\tinside", "$SYS.REQ", "x".repeat(255).leak()];
    let mut ids = Vec::new();
    for event_type in hostile {
        let (status, created) = app.post("/api/v1/events/create", &json!({"event_type": event_type})).await;
        if event_type.contains('\t') {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "control characters are refused");
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{event_type:?}: {created}");
        ids.push((event_type, created["event_id"].as_str().unwrap().to_owned()));
    }
    for (event_type, id) in ids {
        let (_, stored) = app.get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(stored["event_type"], event_type, "the row keeps the type as sent");
        let subject = stored["subject"].as_str().unwrap();
        assert!(subject.starts_with("events.backend.user_action."), "{subject}");
        assert!(subject.split('.').all(|token| !token.is_empty() && token != "*" && token != ">"), "{subject}");
        assert!(subject.chars().all(|c| c.is_ascii_graphic()), "{subject}");
    }
    let (status, _) = app.post("/api/v1/events/create", &json!({"event_type": "x".repeat(300)})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_stored_is_dead_lettered_and_the_rest_flows_on() {
    let app = spawn_app().await;
    app.publish("events.backend.system.garbage", HeaderMap::new(), b"{not json".to_vec()).await;
    app.publish(
        "events.backend.system.too.long",
        HeaderMap::new(),
        json!({"event_type": "y".repeat(300)}).to_string().into_bytes(),
    )
    .await;
    app.publish(
        "events.backend.system.nul",
        HeaderMap::new(),
        br#"{"event_type": "nul", "data": {"a": "b\u0000c"}}"#.to_vec(),
    )
    .await;
    app.publish("events.backend.system.fine", HeaderMap::new(), json!({"event_type": "fine"}).to_string().into_bytes())
        .await;
    app.wait_for_events(1, Duration::from_secs(10)).await;
    let letters = app.wait_for_dead_letters(3).await;
    let reasons: Vec<(String, String, String)> = letters
        .iter()
        .map(|letter| {
            let header = |name: &str| letter.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default();
            (header(headers::REASON_CODE), header(headers::ORIGINAL_SUBJECT), header(headers::STAGE))
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("invalid_json".to_owned(), "events.backend.system.garbage".to_owned(), "persister".to_owned()),
            ("validation_failed".to_owned(), "events.backend.system.too.long".to_owned(), "persister".to_owned()),
            ("validation_failed".to_owned(), "events.backend.system.nul".to_owned(), "persister".to_owned()),
        ]
    );
    assert_eq!(letters[0].payload.as_ref(), b"{not json", "the original payload is kept");
    assert!(letters[1].headers.get(headers::REASON).unwrap().as_str().contains("event_type"));
    assert_eq!(letters[0].subject.as_str(), "deadletter.persister");
    assert_eq!(app.count_events().await, 1);
    // Poison does not loop: it was terminated, not redelivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.dead_letters().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_on_nats_twice_is_one_row() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7();
    let body = json!({"event_id": id, "event_type": "dup.check", "user_id": "d"}).to_string().into_bytes();
    // Different message ids defeat JetStream's window; PostgreSQL still keeps one row.
    for msg_id in ["first", "second"] {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        app.publish("events.backend.user_action.dup.check", headers, body.clone()).await;
    }
    app.publish(
        "events.backend.user_action.marker",
        HeaderMap::new(),
        json!({"event_type": "marker"}).to_string().into_bytes(),
    )
    .await;
    app.wait_for_events(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.count_events().await, 2);
    let (version, stats): (i64, Value) = (
        sqlx::query_scalar("SELECT version FROM event.event_streams WHERE stream_id = 'user:d'")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
        app.get("/api/v1/events/statistics").await.1,
    );
    assert_eq!(version, 1, "the duplicate did not bump the stream");
    assert_eq!(stats["total_events"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_batch_is_all_or_nothing() {
    let app = spawn_app().await;
    let bus = Bus::connect(&app.nats_server.url, "atomic-test", Duration::from_secs(2)).await.unwrap();
    let good = |i: u32| {
        Outgoing::event(
            format!("events.backend.task.batch.{i}"),
            uuid::Uuid::now_v7(),
            json!({"event_type": format!("batch.{i}")}).to_string().into(),
        )
    };
    // One message outside the EVENTS stream spoils the whole batch.
    let mut messages: Vec<Outgoing> = (0..5).map(good).collect();
    messages.insert(2, Outgoing::event("deadletter.elsewhere".into(), uuid::Uuid::now_v7(), "{}".into()));
    assert!(bus.publish_atomic(messages).await.is_err());
    // So does going over the server's batch limit.
    let too_many: Vec<Outgoing> = (0..1001).map(good).collect();
    assert!(bus.publish_atomic(too_many).await.is_err());
    let info = app.js.get_stream("EVENTS").await.unwrap().get_info().await.unwrap();
    assert_eq!(info.state.messages, 0, "no message of a refused batch was stored");

    let stored = bus.publish_atomic((0..1000).map(good).collect()).await.unwrap();
    assert_eq!(stored.count, 1000);
    app.wait_for_events(1000, Duration::from_secs(30)).await;
}
