//! Entity streams and projections: ordering, reducers, definitions with catch-up, time
//! travel from snapshots, crashes and fail-over of the projector.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestApp, spawn_app, wait_until};

async fn app_with_projector() -> TestApp {
    let mut app = spawn_app().await;
    app.start_projector().await;
    app
}

/// The stored projection row (what the projector wrote, not a read-time fold).
async fn stored_version(app: &TestApp, name: &str, entity_type: &str, entity_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(version), 0) FROM event.event_projections \
         WHERE projection_name = $1 AND entity_type = $2 AND entity_id = $3",
    )
    .bind(name)
    .bind(entity_type)
    .bind(entity_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn wait_for_stored_version(app: &TestApp, name: &str, entity_type: &str, entity_id: &str, version: i64) {
    wait_until(Duration::from_secs(30), || async {
        (stored_version(app, name, entity_type, entity_id).await >= version).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("projection {name} of {entity_type}:{entity_id} did not reach version {version}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_gapless_in_jetstream_order_under_concurrent_http_and_nats() {
    let app = spawn_app().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (http, url) = (app.http.clone(), app.url("/api/v1/events/create"));
        tasks.push(tokio::spawn(async move {
            let body = json!({"event_type": "order.updated", "stream_id": "order:42", "data": {"http": i}});
            assert!(http.post(url).json(&body).send().await.unwrap().status().is_success());
        }));
    }
    for i in 0..40 {
        let body =
            json!({"event_type": "order.updated", "entity_type": "order", "entity_id": "42", "data": {"nats": i}});
        app.publish("events.backend.order.order.updated", async_nats::HeaderMap::new(), body.to_string().into_bytes())
            .await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    app.wait_for_events(80, Duration::from_secs(10)).await;
    let (status, stream) = app.get("/api/v1/events/stream/order:42").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (stream["version"].as_i64(), stream["entity_type"].as_str(), stream["entity_id"].as_str()),
        (Some(80), Some("order"), Some("42"))
    );
    let events = stream["events"].as_array().unwrap();
    let versions: Vec<i64> = events.iter().map(|e| e["stream_version"].as_i64().unwrap()).collect();
    assert_eq!(versions, (1..=80).collect::<Vec<_>>());
    let seqs: Vec<i64> = events.iter().map(|e| e["stream_seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "versions follow the JetStream order");

    let (_, page) = app.get("/api/v1/events/stream/order:42?from_version=50&limit=5").await;
    let versions: Vec<i64> =
        page["events"].as_array().unwrap().iter().map(|e| e["stream_version"].as_i64().unwrap()).collect();
    assert_eq!(versions, [50, 51, 52, 53, 54]);
    let (status, unknown) = app.get("/api/v1/events/stream/order:nobody").await;
    assert_eq!(
        (status, unknown["version"].as_i64(), unknown["events"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0), Some(0))
    );
    let (status, bad) = app.get("/api/v1/events/stream/no-colon").await;
    assert_eq!((status, bad["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_error")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_projection_merges_data_as_a_json_merge_patch() {
    let app = app_with_projector().await;
    let mut created = app.bus_client().subscribe("event.projection.created").await.unwrap();
    app.create(json!({"event_type": "profile.set", "user_id": "alice", "data": {"profile": {"name": "A", "city": "X"}, "plan": "free"}})).await;
    app.create(json!({"event_type": "profile.set", "user_id": "alice", "data": {"profile": {"city": null, "age": 3}}}))
        .await;
    let last = app
        .create(json!({"event_type": "plan.changed", "user_id": "alice", "data": {"plan": "pro", "tags": ["a"]}}))
        .await;
    wait_for_stored_version(&app, "default", "user", "alice", 3).await;
    let (status, projection) = app.get("/api/v1/events/projections/user/alice").await;
    assert_eq!(status, StatusCode::OK, "{projection}");
    assert_eq!(projection["state"], json!({"profile": {"name": "A", "age": 3}, "plan": "pro", "tags": ["a"]}));
    assert_eq!((projection["version"].as_i64(), projection["last_event_id"].as_str()), (Some(3), Some(last.as_str())));
    assert_eq!(projection["projection_name"], "default");
    let time = |field: &str| chrono::DateTime::parse_from_rfc3339(projection[field].as_str().unwrap()).unwrap();
    assert!(time("created_at") <= time("updated_at"), "{projection}");
    assert_eq!(app.get("/api/v1/events/projections/user/nobody").await.0, StatusCode::NOT_FOUND);

    let announced =
        tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut created)).await.unwrap().unwrap();
    let announced: Value = serde_json::from_slice(&announced.payload).unwrap();
    assert_eq!(
        (announced["entity_id"].as_str(), announced["projection_name"].as_str()),
        (Some("alice"), Some("default"))
    );

    // The same event id sent again, even with other data, changes nothing: the stored event
    // is the one that counts.
    let again = json!({"event_id": last, "event_type": "plan.changed", "user_id": "alice", "data": {"plan": "other"}});
    app.publish(
        "events.backend.user_action.plan.changed",
        async_nats::HeaderMap::new(),
        again.to_string().into_bytes(),
    )
    .await;
    app.create(json!({"event_type": "noop", "user_id": "alice", "data": {}})).await;
    wait_for_stored_version(&app, "default", "user", "alice", 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_version(&app, "default", "user", "alice").await, 4);
    let (_, projection) = app.get("/api/v1/events/projections/user/alice").await;
    assert_eq!(projection["state"], json!({"profile": {"name": "A", "age": 3}, "plan": "pro", "tags": ["a"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_definitions_catch_up_on_history_and_stay_live() {
    let app = app_with_projector().await;
    for (entity, kind) in
        [("1", "order.placed"), ("1", "order.paid"), ("1", "order.paid"), ("2", "order.placed"), ("1", "note.added")]
    {
        app.create(json!({"event_type": kind, "stream_id": format!("order:{entity}"), "data": {"kind": kind}})).await;
    }
    // Entity types that a LIKE pattern would confuse (`_` matches any character).
    for stream_id in ["line_item:1", "line-item:1"] {
        app.create(json!({"event_type": "line.added", "stream_id": stream_id, "data": {}})).await;
    }
    for body in [
        json!({"name": "order_types", "entity_type": "order", "reducer": "by_type"}),
        json!({"name": "order_counts", "entity_type": "order", "reducer": "counter", "event_types": ["order.*"]}),
        json!({"name": "line_counts", "entity_type": "line_item", "reducer": "counter"}),
    ] {
        let (status, definition) = app.post("/api/v1/events/projections/definitions", &body).await;
        assert_eq!(status, StatusCode::OK, "{definition}");
        assert_eq!(definition["status"], "catching_up");
    }
    let (status, again) = app
        .post("/api/v1/events/projections/definitions", &json!({"name": "order_types", "entity_type": "order"}))
        .await;
    assert_eq!((status, again["code"].as_str()), (StatusCode::CONFLICT, Some("duplicate_projection_name")));
    let (status, bad) = app
        .post("/api/v1/events/projections/definitions", &json!({"name": "x", "entity_type": "order", "reducer": "sum"}))
        .await;
    assert_eq!((status, bad["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("reducer")));

    wait_for_stored_version(&app, "order_counts", "order", "1", 3).await;
    let (_, counts) = app.get("/api/v1/events/projections/order/1?name=order_counts").await;
    assert_eq!(counts["state"], json!({"order.placed": 1, "order.paid": 2}));
    assert_eq!(counts["version"], 3, "note.added is filtered out");
    let (_, types) = app.get("/api/v1/events/projections/order/1?name=order_types").await;
    assert_eq!(
        types["state"],
        json!({"order.placed": {"kind": "order.placed"}, "order.paid": {"kind": "order.paid"}, "note.added": {"kind": "note.added"}})
    );
    let (_, listed) = app.get("/api/v1/events/projections/definitions").await;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "order_types", "order_counts", "line_counts"]);
    wait_until(Duration::from_secs(10), || async {
        let (_, listed) = app.get("/api/v1/events/projections/definitions").await;
        listed.as_array().unwrap().iter().all(|d| d["status"] == "live").then_some(())
    })
    .await
    .expect("definitions go live");
    assert_eq!(stored_version(&app, "line_counts", "line_item", "1").await, 1);
    assert_eq!(stored_version(&app, "line_counts", "line-item", "1").await, 0, "another entity type");

    // Live from now on.
    app.create(json!({"event_type": "order.paid", "stream_id": "order:2", "data": {}})).await;
    wait_for_stored_version(&app, "order_counts", "order", "2", 2).await;
    let (_, counts) = app.get("/api/v1/events/projections/order/2?name=order_counts").await;
    assert_eq!(counts["state"], json!({"order.placed": 1, "order.paid": 1}));
    assert_eq!(app.get("/api/v1/events/projections/user/1?name=order_counts").await.0, StatusCode::NOT_FOUND);

    // Rebuilds: one entity now, a whole definition in the background.
    let rebuilt: Value = app
        .http
        .post(app.url("/api/v1/events/projections/order/1/rebuild"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rebuilt["projections"].as_array().unwrap().len(), 3);
    let answer: Value = app
        .http
        .post(app.url("/api/v1/events/projections/definitions/order_counts/rebuild"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "rebuilding");
    wait_for_stored_version(&app, "order_counts", "order", "1", 3).await;
}

/// The default projection of a meter after its first `n` readings, folded here the simple
/// way: reading `k` sets `n`, `last` and `slot{k % 5}`.
fn meter_state(n: i64) -> Value {
    let mut state = json!({"n": n, "last": format!("r{n}")});
    for k in (1..=n).rev().take(5) {
        state[format!("slot{}", k % 5)] = json!(k);
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_folds_from_the_nearest_snapshot() {
    let app = app_with_projector().await;
    let total = 10_000;
    for chunk in 0..total / 1000 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i + 1;
                let at = chrono::DateTime::from_timestamp(1_735_689_600 + n, 0).unwrap();
                json!({"event_type": "meter.read", "stream_id": "meter:m1", "timestamp": at,
                       "data": {"n": n, "last": format!("r{n}"), format!("slot{}", n % 5): n}})
            })
            .collect();
        assert!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0.is_success());
    }
    wait_for_stored_version(&app, "default", "meter", "m1", total).await;
    let (_, now) = app.get("/api/v1/events/projections/meter/m1").await;
    assert_eq!((now["state"].clone(), now["version"].as_i64()), (meter_state(total), Some(total)));

    // Snapshots every 10 events (the harness's setting): at most 10 events are read.
    let (status, at) = app.get("/api/v1/events/projections/meter/m1?as_of_version=9995").await;
    assert_eq!(status, StatusCode::OK, "{at}");
    assert_eq!(at["state"], meter_state(9995));
    assert_eq!((at["version"].as_i64(), at["snapshot_version"].as_i64()), (Some(9995), Some(9990)));
    assert!(at["events_read"].as_i64().unwrap() <= 10, "{at}");

    let (_, at) = app.get(&format!("/api/v1/events/projections/meter/m1?as_of_version={total}")).await;
    assert_eq!((at["events_read"].as_i64(), at["version"].as_i64()), (Some(0), Some(total)));
    assert_eq!(at["state"], meter_state(total));
    let (_, early) = app.get("/api/v1/events/projections/meter/m1?as_of_version=7").await;
    assert_eq!((early["state"].clone(), early["snapshot_version"].as_i64()), (meter_state(7), Some(0)));

    // By time: the state once the events up to that instant were folded.
    let at_time = chrono::DateTime::from_timestamp(1_735_689_600 + 1234, 0).unwrap().to_rfc3339();
    let (_, then) =
        app.get(&format!("/api/v1/events/projections/meter/m1?as_of={}", at_time.replace('+', "%2B"))).await;
    assert_eq!(then["state"], meter_state(1234), "{then}");
    assert_eq!(then["version"], 1234);
    assert!(then["events_read"].as_i64().unwrap() <= 10);
    let (status, _) = app.get("/api/v1/events/projections/meter/m1?as_of_version=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_projector_takes_over_when_the_active_one_dies_mid_stream() {
    let mut app = spawn_app().await;
    app.start_projector().await;
    app.start_projector().await;
    let mut sent = 0;
    for _ in 0..4 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"event_type": "tick", "stream_id": "clock:c", "data": {"n": sent + i + 1}}))
            .collect();
        sent += 100;
        assert!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0.is_success());
    }
    app.kill_projector().await;
    for _ in 0..2 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"event_type": "tick", "stream_id": "clock:c", "data": {"n": sent + i + 1}}))
            .collect();
        sent += 100;
        assert!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0.is_success());
    }
    wait_for_stored_version(&app, "default", "clock", "c", sent).await;
    let (_, projection) = app.get("/api/v1/events/projections/clock/c").await;
    assert_eq!((projection["state"].clone(), projection["version"].as_i64()), (json!({"n": sent}), Some(sent)));
}
