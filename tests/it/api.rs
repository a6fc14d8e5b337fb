//! The HTTP contract of the gateway, endpoint by endpoint, success and error paths.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, spawn_app, spawn_app_with, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_dependencies() {
    let app = spawn_app().await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["service"], "event_service");
    assert_eq!(body["dependencies"]["nats"]["status"], "connected");
    assert_eq!(body["dependencies"]["postgres"]["status"], "connected");
    let (status, body) = app.get("/api/v1/events/frontend/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["status"].as_str(), body["service"].as_str(), body["nats_connected"].as_bool()),
        (Some("healthy"), Some("frontend-event-collection"), Some(true))
    );
    let document = app.http.get(app.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(document.status(), StatusCode::OK);
    assert!(document.text().await.unwrap().starts_with("openapi: 3.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_the_stored_event() {
    let app = spawn_app().await;
    let (status, created) = app
        .post(
            "/api/v1/events/create",
            &json!({
                "event_type": "user.registered", "event_source": "backend", "event_category": "user_lifecycle",
                "user_id": "user_123", "data": {"email": "a@example.com", "plan": "premium"},
                "metadata": {"ip": "1.2.3.4"}, "unknown_field": "ignored", "session_id": null
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["event_type"], "user.registered");
    assert_eq!(created["event_category"], "user_lifecycle");
    assert_eq!(created["status"], "pending");
    assert_eq!(created["data"]["plan"], "premium");
    assert!(created["timestamp"].is_string() && created["created_at"].is_string());
    let id = created["event_id"].as_str().unwrap();

    let (status, stored) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["event_id"], id);
    assert_eq!(stored["user_id"], "user_123");
    assert_eq!(stored["metadata"], json!({"ip": "1.2.3.4"}));
    // No processor takes it, so there is nothing to wait for: stored as processed.
    assert_eq!(stored["status"], "processed");
    assert!(stored["processed_at"].is_string(), "{stored}");
    assert_eq!(stored["processors"], json!([]));
    assert_eq!(stored["retry_count"], 0);
    assert_eq!(stored["stream_id"], "user:user_123");
    assert_eq!(stored["stream_version"], 1);
    assert_eq!(stored["subject"], "events.backend.user_lifecycle.user.registered");
    assert!(stored["stream_seq"].as_i64().unwrap() >= 1);
    // The answer shows the times PostgreSQL keeps (microseconds), not finer ones.
    assert_eq!((&stored["timestamp"], &stored["created_at"]), (&created["timestamp"], &created["created_at"]));

    // The stored event, on STORED for other services.
    let stream = app.js.get_stream("STORED").await.unwrap();
    let announced =
        stream.get_last_raw_message_by_subject("event.stored.backend.user_lifecycle.user.registered").await.unwrap();
    let announced: Value = serde_json::from_slice(&announced.payload).unwrap();
    assert_eq!(announced["event_id"], id);
    assert_eq!(announced["event_type"], "user.registered");
    assert_eq!(announced["stream_version"], 1);
    assert_eq!(announced["stream_seq"], stored["stream_seq"]);
    assert_eq!(announced["stored_at"], stored["stored_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_bad_input_with_field_errors() {
    let app = spawn_app().await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty body", String::new(), "body"),
        ("malformed JSON", "{\"event_type\": ".into(), "body"),
        ("not an object", "[1,2]".into(), ""),
        ("missing type", json!({"user_id": "u"}).to_string(), "event_type"),
        ("blank type", json!({"event_type": "   "}).to_string(), "event_type"),
        ("long type", json!({"event_type": "x".repeat(256)}).to_string(), "event_type"),
        ("bad source", json!({"event_type": "a", "event_source": "mainframe"}).to_string(), "event_source"),
        ("bad category", json!({"event_type": "a", "event_category": "misc"}).to_string(), "event_category"),
        ("data not object", json!({"event_type": "a", "data": "text"}).to_string(), "data"),
        ("bad timestamp", json!({"event_type": "a", "timestamp": "yesterday"}).to_string(), "timestamp"),
        ("bad event id", json!({"event_type": "a", "event_id": "42"}).to_string(), "event_id"),
    ];
    for (case, body, field) in cases {
        let (status, answer) = app.post_raw("/api/v1/events/create", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{case}: {answer}");
        assert_eq!(answer["code"], "validation_error", "{case}");
        assert!(answer["detail"].is_string(), "{case}");
        let fields: Vec<&str> =
            answer["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert_eq!(fields, [field], "{case}: {answer}");
    }
    assert_eq!(app.count_events().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let app = spawn_app().await;
    let big = json!({"event_type": "big", "data": {"blob": "x".repeat(1024 * 1024 + 10)}});
    let (status, answer) = app.post("/api/v1/events/create", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer["code"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_holds_200_times_in_a_row() {
    let app = spawn_app().await;
    for run in 0..200 {
        let (status, created) =
            app.post("/api/v1/events/create", &json!({"event_type": "ryw.check", "user_id": "ryw"})).await;
        assert_eq!(status, StatusCode::OK, "run {run}: {created}");
        let (status, _) = app.get(&format!("/api/v1/events/{}", created["event_id"].as_str().unwrap())).await;
        assert_eq!(status, StatusCode::OK, "run {run}: created event not found right away");
    }
    // Versions of the user's stream are gapless.
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT stream_version FROM event.events WHERE stream_id = 'user:ryw' ORDER BY stream_seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(versions, (1..=200).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_without_a_persister_answers_202_with_the_event_safe_in_jetstream() {
    let mut app = spawn_app_with(Options { start_persister: false, store_timeout_ms: 300, ..Options::default() }).await;
    let (status, created) = app.post("/api/v1/events/create", &json!({"event_type": "late.event"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let id = created["event_id"].as_str().unwrap().to_owned();
    let (status, _) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.start_persister().await;
    app.wait_for_events(1, std::time::Duration::from_secs(10)).await;
    let (status, stored) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["event_type"], "late.event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_async_answers_once_jetstream_has_the_events() {
    // No persister and a long store timeout: without the preference these requests would hang.
    let mut app =
        spawn_app_with(Options { start_persister: false, store_timeout_ms: 60_000, ..Options::default() }).await;
    let started = std::time::Instant::now();
    let response = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("Prefer", "respond-async")
        .json(&json!({"event_type": "async.one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["preference-applied"], "respond-async");
    let created: Value = response.json().await.unwrap();
    let batch: Vec<Value> = (0..50).map(|i| json!({"event_type": "async.batch", "data": {"i": i}})).collect();
    let response = app
        .http
        .post(app.url("/api/v1/events/batch"))
        .header("Prefer", "return=minimal, respond-async")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Vec<Value> = response.json().await.unwrap();
    assert_eq!(accepted.len(), 50);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "answered without waiting for PostgreSQL");

    app.start_persister().await;
    app.wait_for_events(51, std::time::Duration::from_secs(10)).await;
    let (status, stored) = app.get(&format!("/api/v1/events/{}", created["event_id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["event_type"], "async.one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_twice_is_one_row() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let request = json!({"event_id": id, "event_type": "payment.captured", "user_id": "payer"});
    let (first, _) = app.post("/api/v1/events/create", &request).await;
    let (second, again) = app.post("/api/v1/events/create", &request).await;
    assert_eq!((first, second), (StatusCode::OK, StatusCode::OK), "{again}");
    assert_eq!(again["event_id"], id.as_str());
    assert_eq!(app.count_events().await, 1);
    let (_, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!(stats["total_events"], 1, "rollups count the event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_unknown_or_malformed_ids_is_404() {
    let app = spawn_app().await;
    for id in [uuid::Uuid::now_v7().to_string(), "not-a-uuid".to_owned()] {
        let (status, body) = app.get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"code": "not_found", "detail": "Event not found"}));
    }
    // Fixed paths win over the id route.
    let (status, body) = app.get("/api/v1/events/statistics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total_events"], 0);
    let (status, body) = app.get("/api/v1/events/frontend").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["code"], "method_not_allowed");
    let (status, body) = app.get("/api/v1/nothing/here").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_stores_all_in_order() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"event_type": format!("batch.item{i}"), "user_id": "batcher", "data": {"i": i}}))
        .collect();
    let (status, answer) = app.post("/api/v1/events/batch", &Value::Array(batch)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let answer = answer.as_array().unwrap();
    assert_eq!(answer.len(), 5);
    for (i, event) in answer.iter().enumerate() {
        assert_eq!(event["event_type"], format!("batch.item{i}"));
        assert_eq!(event["status"], "pending");
        let (status, stored) = app.get(&format!("/api/v1/events/{}", event["event_id"].as_str().unwrap())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(stored["stream_version"], i + 1);
    }
    let (status, answer) = app.post_raw("/api/v1/events/batch", "[]").await;
    assert_eq!((status, answer), (StatusCode::OK, json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_with_any_invalid_item_stores_nothing() {
    let app = spawn_app_with(Options { max_batch_events: 3, ..Options::default() }).await;
    let batch = json!([
        {"event_type": "fine"},
        {"event_type": ""},
        {"event_type": "fine.too"},
    ]);
    let (status, answer) = app.post("/api/v1/events/batch", &batch).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["errors"], json!([{"field": "[1].event_type", "message": "must not be blank"}]));
    let batch = json!([{"event_source": "nowhere"}, {"event_type": "ok"}, {"event_type": "ok", "data": 5}]);
    let (_, answer) = app.post("/api/v1/events/batch", &batch).await;
    let fields: Vec<&str> = answer["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["[0].event_type", "[0].event_source", "[2].data"]);
    let too_many = Value::Array(vec![json!({"event_type": "x"}); 4]);
    let (status, answer) = app.post("/api/v1/events/batch", &too_many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let (status, _) = app.post("/api/v1/events/batch", &json!({"event_type": "not an array"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.count_events().await, 0);
    let stream = app.js.get_stream("EVENTS").await.unwrap().get_info().await.unwrap();
    assert_eq!(stream.state.messages, 0, "nothing reached JetStream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_stored_once_and_new_events_in_it_are_added() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let item = |i: usize| json!({"event_id": ids[i], "event_type": format!("retry.item{i}"), "user_id": "retrier"});
    let first = json!([item(0), item(1)]);
    let (status, answer) = app.post("/api/v1/events/batch", &first).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The client lost the answer and sends the same batch again: same answer, nothing new.
    let (status, again) = app.post("/api/v1/events/batch", &first).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again.as_array().unwrap().len(), 2);
    assert_eq!(app.count_events().await, 2);
    // A batch mixing accepted events with new ones stores the new ones only.
    let mixed = json!([item(1), item(2), item(0), item(3)]);
    let (status, answer) = app.post("/api/v1/events/batch", &mixed).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let answered: Vec<&str> = answer.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(answered, [&ids[1], &ids[2], &ids[0], &ids[3]]);
    assert_eq!(app.count_events().await, 4);
    let (_, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!(stats["total_events"], 4, "rollups count each event once");
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT stream_version FROM event.events WHERE stream_id = 'user:retrier' ORDER BY stream_version",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(versions, [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_repeating_an_event_id_is_refused() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let batch = json!([
        {"event_id": id, "event_type": "twice"},
        {"event_type": "once"},
        {"event_id": id, "event_type": "twice.again"},
    ]);
    let (status, answer) = app.post("/api/v1/events/batch", &batch).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["errors"], json!([{"field": "[2].event_id", "message": "repeats the event_id of [0]"}]));
    assert_eq!(app.count_events().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_nats_takes_is_413_event_too_large() {
    // nats-server's max_payload is 1 MiB; a batch body may be 16 MiB but no single event can
    // be larger than a NATS message.
    let app = spawn_app().await;
    let batch = json!([{"event_type": "small"}, {"event_type": "big", "data": {"blob": "x".repeat(1024 * 1024)}}]);
    let (status, answer) = app.post("/api/v1/events/batch", &batch).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["code"], "event_too_large");
    assert!(answer["detail"].as_str().unwrap().starts_with("[1]: "), "{answer}");
    let create = json!({"event_type": "big", "data": {"blob": "x".repeat(1024 * 1024 - 2000)}});
    let (status, answer) = app.post("/api/v1/events/create", &create).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("event_too_large")));
    assert_eq!(app.count_events().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_pages_and_orders_newest_first() {
    let app = spawn_app().await;
    let mut batch = Vec::new();
    for i in 0..12 {
        batch.push(json!({
            "event_type": if i % 3 == 0 { "order.placed" } else { "page.viewed" },
            "event_source": if i % 2 == 0 { "backend" } else { "frontend" },
            "event_category": if i % 3 == 0 { "order" } else { "page_view" },
            "user_id": if i < 4 { "alice" } else { "bob" },
            "data": {"n": i, "tier": if i == 7 { "gold" } else { "basic" }},
            "timestamp": format!("2025-12-01T10:00:{i:02}Z"),
        }));
    }
    let (status, _) = app.post("/api/v1/events/batch", &Value::Array(batch)).await;
    assert_eq!(status, StatusCode::OK);

    let (status, page) = app.post("/api/v1/events/query", &json!({"limit": 5})).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!((page["total"].as_i64(), page["limit"].as_i64(), page["offset"].as_i64()), (Some(12), Some(5), Some(0)));
    assert_eq!(page["has_more"], true);
    let ns: Vec<i64> = page["events"].as_array().unwrap().iter().map(|e| e["data"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, [11, 10, 9, 8, 7]);
    let (_, last) = app.post("/api/v1/events/query", &json!({"limit": 5, "offset": 10})).await;
    assert_eq!(last["events"].as_array().unwrap().len(), 2);
    assert_eq!(last["has_more"], false);

    let count = |filter: Value| {
        let app = &app;
        async move {
            let (status, page) = app.post("/api/v1/events/query", &filter).await;
            assert_eq!(status, StatusCode::OK, "{filter}: {page}");
            page["total"].as_i64().unwrap()
        }
    };
    assert_eq!(count(json!({"user_id": "alice"})).await, 4);
    assert_eq!(count(json!({"event_type": "order.placed"})).await, 4);
    assert_eq!(count(json!({"event_source": "frontend"})).await, 6);
    assert_eq!(count(json!({"event_category": "page_view", "user_id": "bob"})).await, 6);
    // No processor is registered: every event is stored processed.
    assert_eq!(count(json!({"status": "processed"})).await, 12);
    assert_eq!(count(json!({"status": "pending"})).await, 0);
    assert_eq!(count(json!({"start_time": "2025-12-01T10:00:05Z", "end_time": "2025-12-01T10:00:08Z"})).await, 4);
    assert_eq!(count(json!({"data": {"tier": "gold"}})).await, 1);
    assert_eq!(count(json!({"user_id": null, "limit": null})).await, 12);
    // A page smaller than the matches: totals come from the rollups, or from a bounded count.
    for (filter, expected) in [
        (json!({"limit": 1}), 12),
        (json!({"user_id": "alice", "limit": 1}), 4),
        (json!({"event_type": "order.placed", "limit": 1}), 4),
        (json!({"event_source": "frontend", "limit": 1}), 6),
        (json!({"event_category": "page_view", "user_id": "bob", "limit": 1}), 6),
        (json!({"status": "processed", "limit": 1}), 12),
        (json!({"status": "processed", "user_id": "alice", "limit": 1}), 4),
        (json!({"status": "processed", "event_type": "order.placed", "limit": 1}), 4),
        (json!({"start_time": "2025-12-01T10:00:05Z", "end_time": "2025-12-01T10:00:08Z", "limit": 1}), 4),
    ] {
        let (_, page) = app.post("/api/v1/events/query", &filter).await;
        assert_eq!(page["total"].as_i64(), Some(expected), "{filter}: {page}");
        assert_eq!(page["total_exact"], true, "{filter}");
        assert_eq!(page["has_more"], true, "{filter}");
    }

    for (bad, field) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 1001}), "limit"),
        (json!({"limit": "ten"}), "limit"),
        (json!({"offset": -1}), "offset"),
        (json!({"event_source": "mars"}), "event_source"),
        (json!({"status": "done"}), "status"),
        (json!({"start_time": "2025-12-02T00:00:00Z", "end_time": "2025-12-01T00:00:00Z"}), "end_time"),
        (json!({"data": [1]}), "data"),
    ] {
        let (status, answer) = app.post("/api/v1/events/query", &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(answer["errors"][0]["field"], field, "{bad}");
    }
}

/// An operator's expression index on a data key changes how a containment query runs, never
/// what it answers: arrays, nested objects, numbers, nulls and quoted keys match as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_key_index_serves_containment_queries_with_the_same_answers() {
    let app = spawn_app().await;
    let plans = [
        json!("premium"),
        json!("basic"),
        json!(["premium", "gold"]),
        json!({"name": "premium", "since": 2024}),
        Value::Null,
    ];
    let batch: Vec<Value> = (0..30)
        .map(|i| {
            json!({
                "event_type": "plan.changed",
                "data": {"plan": plans[i % 5].clone(), "n": i % 4, "it's": i % 2 == 0, "seats": if i % 3 == 0 { json!(1.0) } else { json!(2) }},
                "timestamp": format!("2025-12-01T10:00:{i:02}Z"),
            })
        })
        .collect();
    let (status, _) = app.post("/api/v1/events/batch", &Value::Array(batch)).await;
    assert_eq!(status, StatusCode::OK);
    let filters = [
        (json!({"plan": "premium"}), 6),
        (json!({"plan": ["premium"]}), 6),
        (json!({"plan": {"name": "premium"}}), 6),
        (json!({"plan": null}), 6),
        (json!({"plan": "premium", "n": 0}), 2),
        (json!({"it's": true}), 15),
        (json!({"seats": 1}), 10),
        (json!({"n": 3, "it's": false}), 7),
    ];
    let answers = |limit: i64| {
        let app = &app;
        let filters = filters.clone();
        async move {
            let mut answers = Vec::new();
            for (data, expected) in filters {
                let (status, page) = app.post("/api/v1/events/query", &json!({"data": data, "limit": limit})).await;
                assert_eq!(status, StatusCode::OK, "{data}: {page}");
                assert_eq!(page["total"].as_i64(), Some(expected), "{data}: {page}");
                let ids: Vec<String> = page["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["event_id"].as_str().unwrap().to_owned())
                    .collect();
                answers.push(ids);
            }
            answers
        }
    };
    let (unindexed, unindexed_page) = (answers(100).await, answers(2).await);
    for key in ["plan", "n", "it''s", "seats"] {
        let index = format!(r#"CREATE INDEX ON event.events ((data -> '{key}'), "timestamp" DESC, event_id DESC)"#);
        sqlx::query(sqlx::AssertSqlSafe(index)).execute(&app.pool).await.unwrap();
    }
    assert_eq!(answers(100).await, unindexed);
    assert_eq!(answers(2).await, unindexed_page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_come_from_the_rollups() {
    let app = spawn_app().await;
    let now = chrono::Utc::now().to_rfc3339();
    let batch = json!([
        {"event_type": "order.placed", "event_category": "order", "user_id": "alice", "timestamp": now},
        {"event_type": "order.placed", "event_category": "order", "user_id": "alice", "timestamp": now},
        {"event_type": "page.viewed", "event_source": "frontend", "event_category": "page_view", "user_id": "bob", "timestamp": now},
        {"event_type": "old.thing", "event_source": "system", "event_category": "system", "timestamp": "2020-01-01T00:00:00Z"},
    ]);
    assert_eq!(app.post("/api/v1/events/batch", &batch).await.0, StatusCode::OK);
    let (status, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["total_events"], 4);
    // No processor takes them: stored processed, timed from created_at to stored.
    assert_eq!(stats["pending_events"], 0);
    assert_eq!(stats["processed_events"], 4);
    assert_eq!(stats["failed_events"], 0);
    assert_eq!(stats["events_by_source"], json!({"backend": 2, "frontend": 1, "system": 1}));
    assert_eq!(stats["events_by_category"], json!({"order": 2, "page_view": 1, "system": 1}));
    assert_eq!(stats["events_by_type"], json!({"order.placed": 2, "page.viewed": 1, "old.thing": 1}));
    assert_eq!(stats["events_today"], 3);
    assert_eq!(stats["events_this_week"], 3);
    assert_eq!(stats["events_this_month"], 3);
    assert_eq!(
        stats["top_users"],
        json!([{"user_id": "alice", "event_count": 2}, {"user_id": "bob", "event_count": 1}])
    );
    assert_eq!(stats["top_event_types"][0], json!({"event_type": "order.placed", "event_count": 2}));
    assert_eq!((stats["processing_rate"].as_f64(), stats["error_rate"].as_f64()), (Some(100.0), Some(0.0)));
    assert!(stats["average_processing_time"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["calculated_at"].is_string());

    let (_, alice) = app.get("/api/v1/events/statistics?user_id=alice").await;
    assert_eq!(alice["total_events"], 2);
    assert_eq!(alice["events_by_type"], json!({"order.placed": 2}));
    assert_eq!(alice["top_users"], json!([{"user_id": "alice", "event_count": 2}]));
    let (_, nobody) = app.get("/api/v1/events/statistics?user_id=nobody").await;
    assert_eq!(nobody["total_events"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_events_are_enriched_and_stored() {
    let app = spawn_app().await;
    let response = app
        .http
        .post(app.url("/api/v1/events/frontend"))
        .header("X-Forwarded-For", "203.0.113.7, 10.0.0.1")
        .header("User-Agent", "test-browser/1.0")
        .header("Referer", "https://shop.example/cart")
        .json(&json!({"event_type": "checkout.started", "category": "landing", "page_url": "https://shop.example/pay",
                      "user_id": "anon-9", "session_id": "s-1", "data": {"step": 1}, "metadata": {"ab": "b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "accepted");
    let id = answer["event_id"].as_str().unwrap().to_owned();
    app.wait_for_events(1, std::time::Duration::from_secs(10)).await;
    let (_, stored) = app.get(&format!("/api/v1/events/{id}")).await;
    assert_eq!(stored["event_source"], "frontend");
    assert_eq!(stored["event_category"], "user_action");
    assert_eq!(stored["subject"], "events.frontend.landing.checkout.started");
    assert_eq!(stored["session_id"], "s-1");
    assert_eq!(stored["data"], json!({"step": 1}));
    let metadata = &stored["metadata"];
    assert_eq!(metadata["client_ip"], "203.0.113.7");
    assert_eq!(metadata["user_agent"], "test-browser/1.0");
    assert_eq!(metadata["referer"], "https://shop.example/cart");
    assert_eq!(metadata["page_url"], "https://shop.example/pay");
    assert_eq!(metadata["frontend_category"], "landing");
    assert_eq!(metadata["ab"], "b");

    let (status, answer) =
        app.post("/api/v1/events/frontend", &json!({"event_type": "click", "category": "click"})).await;
    assert_eq!(status, StatusCode::OK);
    app.wait_for_events(2, std::time::Duration::from_secs(10)).await;
    let (_, stored) = app.get(&format!("/api/v1/events/{}", answer["event_id"].as_str().unwrap())).await;
    assert_eq!(stored["event_category"], "click");
    assert!(stored["metadata"].get("frontend_category").is_none());

    for bad in [
        json!({"category": "x"}),
        json!({"event_type": "a", "metadata": {"n": 1}}),
        json!({"event_type": "a", "data": 3}),
    ] {
        let (status, answer) = app.post("/api/v1/events/frontend", &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_batch_accepts_valid_items_and_reports_the_rest() {
    let app = spawn_app().await;
    let body = json!({
        "events": [
            {"event_type": "a", "metadata": {"own": "yes"}},
            {"category": "no type"},
            {"event_type": "b", "category": "page_view"},
            {"event_type": "c", "data": []},
        ],
        "client_info": {"app_version": "2.1", "screen": 1080},
    });
    let (status, answer) = app.post("/api/v1/events/frontend/batch", &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["processed_count"], 2);
    assert_eq!(answer["event_ids"].as_array().unwrap().len(), 2);
    let rejected: Vec<i64> =
        answer["rejected"].as_array().unwrap().iter().map(|r| r["index"].as_i64().unwrap()).collect();
    assert_eq!(rejected, [1, 3]);
    assert_eq!(answer["rejected"][0]["errors"][0]["field"], "event_type");
    app.wait_for_events(2, std::time::Duration::from_secs(10)).await;
    let (_, stored) = app.get(&format!("/api/v1/events/{}", answer["event_ids"][0].as_str().unwrap())).await;
    assert_eq!(stored["metadata"]["app_version"], "2.1");
    assert_eq!(stored["metadata"]["screen"], "1080");
    assert_eq!(stored["metadata"]["own"], "yes");

    let too_many = json!({"events": vec![json!({"event_type": "x"}); 101]});
    let (status, _) = app.post("/api/v1/events/frontend/batch", &too_many).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post("/api/v1/events/frontend/batch", &json!({"no_events": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_events_are_mapped_and_deduplicated() {
    let app = spawn_app().await;
    let events = json!([
        {"type": "track", "event": "Newsletter Form Submitted", "userId": "u-1", "messageId": "msg-1",
         "properties": {"list": "weekly"}, "context": {"ip": "198.51.100.4", "sessionId": "sess-1"},
         "originalTimestamp": "2025-12-30T10:00:00Z", "sentAt": "2025-12-30T10:00:01Z"},
        {"type": "page", "name": "Pricing", "anonymousId": "anon-1", "messageId": "msg-2"},
        {"type": "identify", "userId": "u-2", "traits": {"plan": "pro"}, "messageId": "msg-3"},
    ]);
    let (status, answer) = app.post("/webhooks/rudderstack", &events).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "accepted");
    app.wait_for_events(3, std::time::Duration::from_secs(10)).await;
    let row = |message_id: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, String, Option<String>, Value, Value, Value)>(
                "SELECT event_type, event_source, event_category, user_id, data, metadata, context
                 FROM event.events WHERE metadata->>'messageId' = $1",
            )
            .bind(message_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (event_type, source, category, user, data, metadata, context) = row("msg-1").await;
    assert_eq!(
        (event_type.as_str(), source.as_str(), category.as_str()),
        ("Newsletter Form Submitted", "frontend", "form_submit")
    );
    assert_eq!(user.as_deref(), Some("u-1"));
    assert_eq!(data, json!({"list": "weekly"}));
    assert_eq!(metadata["sentAt"], "2025-12-30T10:00:01Z");
    assert_eq!(context["ip"], "198.51.100.4");
    let (event_type, _, category, user, ..) = row("msg-2").await;
    assert_eq!((event_type.as_str(), category.as_str(), user.as_deref()), ("Pricing", "page_view", Some("anon-1")));
    let (event_type, _, category, _, data, ..) = row("msg-3").await;
    assert_eq!((event_type.as_str(), category.as_str()), ("identify", "user_action"));
    assert_eq!(data["plan"], "pro");

    // RudderStack retries: the same messageId is stored once.
    let (status, _) = app.post("/webhooks/rudderstack", &events[0]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.post("/api/v1/events/frontend", &json!({"event_type": "marker"})).await;
    assert_eq!(status, StatusCode::OK);
    app.wait_for_events(4, std::time::Duration::from_secs(10)).await;
    assert_eq!(app.count_events().await, 4);

    let (status, _) = app.post_raw("/webhooks/rudderstack", "not json").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post_raw("/webhooks/rudderstack", "42").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, answer) = app.post("/webhooks/rudderstack", &json!({"type": "track"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["errors"][0]["field"], "[0].event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_signature_is_checked_when_a_secret_is_set() {
    use hmac::{Hmac, KeyInit, Mac};
    let app = spawn_app_with(Options { rudderstack_secret: Some("rs-secret".into()), ..Options::default() }).await;
    let body = json!({"type": "track", "event": "Signed", "userId": "u", "messageId": "signed-1"}).to_string();
    let send = |signature: Option<String>| {
        let mut request = app.http.post(app.url("/webhooks/rudderstack")).body(body.clone());
        if let Some(signature) = signature {
            request = request.header("X-Signature", signature);
        }
        async move { request.send().await.unwrap().status() }
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"rs-secret").unwrap();
    mac.update(body.as_bytes());
    let hex_signature = hex::encode(mac.finalize().into_bytes());
    assert_eq!(send(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(Some("wrong".into())).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(Some("0".repeat(64))).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(Some(hex_signature.clone())).await, StatusCode::OK);
    assert_eq!(send(Some(format!("sha256={hex_signature}"))).await, StatusCode::OK);
    assert_eq!(send(Some("rs-secret".into())).await, StatusCode::OK);
    let response = app.http.post(app.url("/webhooks/rudderstack")).body(body.clone()).send().await.unwrap();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "invalid_signature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_management_endpoints_only() {
    let app =
        spawn_app_with(Options { api_keys: vec!["key-one".into(), "key-two".into()], ..Options::default() }).await;
    let create = json!({"event_type": "guarded"});
    let (status, answer) = app.post("/api/v1/events/create", &create).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["code"], "unauthorized");
    let with_key = |key: &str| app.http.post(app.url("/api/v1/events/create")).bearer_auth(key).json(&create).send();
    assert_eq!(with_key("wrong").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let response = with_key("key-two").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The scheme is case-insensitive (RFC 9110); the key is not.
    let raw = |value: &'static str| {
        app.http.post(app.url("/api/v1/events/create")).header("Authorization", value).json(&create).send()
    };
    assert_eq!(raw("BEARER key-one").await.unwrap().status(), StatusCode::OK);
    assert_eq!(raw("Bearer KEY-ONE").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(raw("Basic key-one").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    for path in ["/api/v1/events/statistics", &format!("/api/v1/events/{}", uuid::Uuid::now_v7())] {
        let status = app.http.get(app.url(path)).send().await.unwrap().status();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let status = app.http.post(app.url("/api/v1/events/query")).json(&json!({})).send().await.unwrap().status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let status = app.http.post(app.url("/api/v1/events/batch")).json(&json!([])).send().await.unwrap().status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Public routes stay public.
    assert_eq!(app.get("/health").await.0, StatusCode::OK);
    assert_eq!(app.get("/api/v1/events/frontend/health").await.0, StatusCode::OK);
    assert_eq!(app.post("/api/v1/events/frontend", &json!({"event_type": "public"})).await.0, StatusCode::OK);
    assert_eq!(app.post("/webhooks/rudderstack", &json!({"type": "page", "name": "Home"})).await.0, StatusCode::OK);
    let (_, health) = app.get("/health").await;
    assert_eq!(health["auth_required"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_keys_send_events_and_nothing_else() {
    let app = spawn_app_with(Options {
        api_keys: vec!["admin-key".into()],
        ingest_keys: vec!["ingest-key".into()],
        ..Options::default()
    })
    .await;
    let send = |path: &str, key: Option<&str>, body: Value| {
        let request = app.http.post(app.url(path)).json(&body);
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let event = json!({"event_type": "scoped"});
    assert_eq!(send("/api/v1/events/create", Some("ingest-key"), event.clone()).await.0, StatusCode::OK);
    assert_eq!(send("/api/v1/events/batch", Some("ingest-key"), json!([event.clone()])).await.0, StatusCode::OK);
    assert_eq!(send("/api/v1/events/create", Some("admin-key"), event.clone()).await.0, StatusCode::OK);
    assert_eq!(send("/api/v1/events/create", None, event.clone()).await.0, StatusCode::UNAUTHORIZED);
    let cloud = app
        .http
        .post(app.url("/api/v1/events/cloudevents"))
        .bearer_auth("ingest-key")
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "scoped-1", "source": "/s", "type": "scoped.cloud"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(cloud.status(), StatusCode::OK);

    // Everything else needs the admin key: 403 with a stable code for the ingest key.
    let (status, answer) = send("/api/v1/events/query", Some("ingest-key"), json!({})).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));
    let processor = json!({"processor_name": "p", "processor_type": "nats"});
    assert_eq!(send("/api/v1/events/processors", Some("ingest-key"), processor.clone()).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send("/api/v1/events/processors", Some("admin-key"), processor).await.0, StatusCode::OK);
    let statistics = app.http.get(app.url("/api/v1/events/statistics")).bearer_auth("ingest-key").send().await.unwrap();
    assert_eq!(statistics.status(), StatusCode::FORBIDDEN);

    // The tracking API takes the ingest key as its write key once ingest keys exist.
    let track = json!({"type": "track", "event": "Scoped", "userId": "u", "messageId": "scoped-t"});
    let sdk = |key: &'static str| app.http.post(app.url("/v1/track")).basic_auth(key, Some("")).json(&track).send();
    assert_eq!(sdk("ingest-key").await.unwrap().status(), StatusCode::OK);
    assert_eq!(sdk("someone").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    app.wait_for_events(5, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_means_503_and_nothing_accepted() {
    let mut app = spawn_app().await;
    app.nats_server.stop();
    wait_until(Duration::from_secs(10), || async { (!app.get("/health/ready").await.0.is_success()).then_some(()) })
        .await
        .expect("the gateway notices");
    let (status, answer) = app.post("/api/v1/events/frontend", &json!({"event_type": "lost"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "nats_unavailable");
    let (status, answer) = app.post("/api/v1/events/create", &json!({"event_type": "lost"})).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("nats_unavailable")));
    let batch = json!([{"event_type": "lost"}, {"event_type": "lost"}]);
    let (status, answer) = app.post("/api/v1/events/batch", &batch).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("nats_unavailable")));
    let (_, health) = app.get("/api/v1/events/frontend/health").await;
    assert_eq!(health["nats_connected"], false);

    // "Nothing was accepted" is true: nothing the client was refused shows up once NATS is back.
    app.restart_nats();
    // The gateway publishes nothing until its client has reconnected; ready says when.
    wait_until(Duration::from_secs(20), || async { app.get("/health/ready").await.0.is_success().then_some(()) })
        .await
        .expect("the gateway reconnects");
    let marker = app.create(json!({"event_type": "after.restart"})).await;
    app.wait_for_status(&marker, &["processed"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.count_events().await, 1, "only the event sent after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gateway_answers_overloaded_at_once_and_takes_events_again_when_there_is_room() {
    let app = spawn_app_with(Options { max_inflight_events: 2, ..Options::default() }).await;
    // A frozen nats-server keeps the first publish in flight (until the 2 s PubAck timeout).
    app.pause_nats();
    let two = json!([{"event_type": "stuck"}, {"event_type": "stuck"}]);
    let stuck = app.post("/api/v1/events/batch", &two);
    let refused = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let response = app.http.post(app.url("/api/v1/events/create")).json(&json!({"event_type": "extra"})).send();
        let response = response.await.unwrap();
        (
            response.status(),
            response.headers().get("retry-after").cloned(),
            response.json::<Value>().await.unwrap(),
            started.elapsed(),
        )
    };
    let ((stuck_status, _), (status, retry_after, answer, waited)) = tokio::join!(stuck, refused);
    app.resume_nats();
    assert_eq!(stuck_status, StatusCode::SERVICE_UNAVAILABLE, "the frozen publish is outcome_unknown");
    assert_eq!((status, answer["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")), "{answer}");
    assert_eq!(retry_after.as_ref().and_then(|value| value.to_str().ok()), Some("1"));
    assert!(waited < Duration::from_secs(1), "refused quickly, not queued: {waited:?}");

    // Room again: events go through, and the refusal was counted.
    let marker = app.create(json!({"event_type": "after.overload"})).await;
    app.wait_for_status(&marker, &["processed"]).await;
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("event_requests_overloaded_total{path=\"create\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_publish_is_outcome_unknown_and_a_retry_with_its_ids_is_idempotent() {
    let app = spawn_app().await;
    app.pause_nats();
    let (status, single) = app.post("/api/v1/events/create", &json!({"event_type": "maybe"})).await;
    let batch = json!([{"event_type": "maybe.batch"}, {"event_type": "maybe.batch"}]);
    let (batch_status, batched) = app.post("/api/v1/events/batch", &batch).await;
    app.resume_nats();
    assert_eq!(
        (status, single["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("outcome_unknown")),
        "{single}"
    );
    assert_eq!(batch_status, StatusCode::SERVICE_UNAVAILABLE, "{batched}");
    assert_eq!(batched["code"], "outcome_unknown");
    let ids: Vec<String> = single["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .chain(batched["event_ids"].as_array().unwrap())
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);

    // The client retries with the ids it was given: each event is stored once, whatever
    // happened to the first attempt.
    let (status, _) = app.post("/api/v1/events/create", &json!({"event_id": ids[0], "event_type": "maybe"})).await;
    assert_eq!(status, StatusCode::OK);
    let retry =
        json!([{"event_id": ids[1], "event_type": "maybe.batch"}, {"event_id": ids[2], "event_type": "maybe.batch"}]);
    let (status, answer) = app.post("/api/v1/events/batch", &retry).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    app.wait_for_events(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.count_events().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_is_a_500_with_a_request_id_and_nothing_internal() {
    let app = spawn_app().await;
    let id = app.create(json!({"event_type": "odd.row", "user_id": "u"})).await;
    // A stored value the service does not know (written behind its back) is a fault, not a
    // default and not "retry later".
    sqlx::query("UPDATE event.events SET event_source = 'mars' WHERE event_id = $1::uuid")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap();
    let response = app
        .http
        .get(app.url(&format!("/api/v1/events/{id}")))
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.headers().get("x-request-id").unwrap(), "trace-me-1");
    assert!(response.headers().get("retry-after").is_none(), "retrying will not help");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "internal_error");
    assert!(!body["detail"].as_str().unwrap().contains("mars"), "{body}");

    // Every answer has a request id, a new one when the client sent none.
    let healthy = app.http.get(app.url("/health")).send().await.unwrap();
    let generated = healthy.headers().get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(generated).map(|_| ()), Ok(()), "{generated}");
}
