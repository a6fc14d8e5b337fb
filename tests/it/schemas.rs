//! The schema registry: versions and the compatibility rule over HTTP, then the check on every
//! ingest path (create, batch, frontend batch, CloudEvents, NATS-native) in `reject` and `flag`
//! mode, with redaction before the event is stored and the version recorded on it.

use std::time::Duration;

use async_nats::HeaderMap;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{TestApp, spawn_app, wait_until};

async fn put(app: &TestApp, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = app.http.put(app.url(path)).json(body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn orders_v1() -> Value {
    json!({
        "schema": {
            "type": "object",
            "required": ["order_id"],
            "properties": {"order_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0},
                           "customer": {"type": "object"}, "card": {"type": "object"}},
            "additionalProperties": false
        },
        "redact": [{"path": "customer.email", "action": "hash"}, {"path": "card", "action": "drop"}]
    })
}

async fn stored(app: &TestApp, id: &str) -> Value {
    wait_until(Duration::from_secs(20), || async {
        let (status, event) = app.get(&format!("/api/v1/events/{id}")).await;
        (status == StatusCode::OK).then_some(event)
    })
    .await
    .unwrap_or_else(|| panic!("event {id} was not stored"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_versions_stay_backward_compatible_unless_told_otherwise() {
    let app = spawn_app().await;
    let path = "/api/v1/events/schemas/order.placed";
    assert_eq!(app.get(path).await.0, StatusCode::NOT_FOUND);
    let (status, v1) = put(&app, path, &orders_v1()).await;
    assert_eq!((status, v1["version"].as_i64()), (StatusCode::OK, Some(1)), "{v1}");
    assert_eq!(v1["mode"], "reject");

    // Requiring a new field would refuse events v1 took.
    let mut stricter = orders_v1();
    stricter["schema"]["required"] = json!(["order_id", "amount"]);
    let (status, refused) = put(&app, path, &stricter).await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::CONFLICT, Some("incompatible_schema")), "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("`amount` is required now"), "{refused}");

    // A new optional field is fine: v1 is closed, so no event had it.
    let mut wider = orders_v1();
    wider["schema"]["properties"]["note"] = json!({"type": "string"});
    let (status, v2) = put(&app, path, &wider).await;
    assert_eq!((status, v2["version"].as_i64()), (StatusCode::OK, Some(2)), "{v2}");

    // Asked for, the stricter one goes in as version 3.
    let (status, v3) = put(&app, &format!("{path}?compatibility=none"), &stricter).await;
    assert_eq!((status, v3["version"].as_i64(), v3["compatibility"].as_str()), (StatusCode::OK, Some(3), Some("none")));

    let (status, listed) = app.get(path).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<i64> =
        listed["versions"].as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(versions, [3, 2, 1]);
    let (_, all) = app.get("/api/v1/events/schemas").await;
    assert_eq!(all["schemas"][0]["version"], 3);

    // Not a schema, not a mode, not a path: 422 naming each.
    let (status, invalid) = put(
        &app,
        path,
        &json!({"schema": {"type": 5}, "mode": "maybe", "redact": [{"path": "a..b", "action": "drop"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> =
        invalid["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["mode", "schema", "redact[0].path"], "{invalid}");
    // A pattern that needs backtracking could make a check slow: refused up front.
    let slow =
        json!({"schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a|a)*\\1b$"}}}});
    let (status, refused) = put(&app, "/api/v1/events/schemas/other.type", &slow).await;
    assert_eq!(
        (status, refused["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("schema")),
        "{refused}"
    );
    let (status, _) = put(&app, "/api/v1/events/schemas/order.*", &orders_v1()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a pattern is not an event type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ingest_path_checks_redacts_and_records_the_version() {
    let app = spawn_app().await;
    assert_eq!(put(&app, "/api/v1/events/schemas/order.placed", &orders_v1()).await.0, StatusCode::OK);
    // This gateway checks with it at once; the persister loads it on a notification: let it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Create: refused with the failing paths; accepted redacted, with the version.
    let (status, refused) =
        app.post("/api/v1/events/create", &json!({"event_type": "order.placed", "data": {"amount": -3}})).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("schema_violation")),
        "{refused}"
    );
    let mut fields: Vec<&str> =
        refused["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    fields.sort();
    assert_eq!(fields, ["data", "data.amount"], "{refused}");
    let good = json!({"event_type": "order.placed",
                      "data": {"order_id": "o-1", "customer": {"email": "ann@example.com"}, "card": {"number": "4111"}}});
    let (status, created) = app.post("/api/v1/events/create", &good).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let event = stored(&app, created["event_id"].as_str().unwrap()).await;
    let hashed = hex::encode(Sha256::digest(b"\"ann@example.com\""));
    assert_eq!(event["data"], json!({"order_id": "o-1", "customer": {"email": hashed}}), "redacted before storing");
    assert_eq!(event["metadata"]["schema_version"], 1);

    // Batch (all or nothing): one bad item refuses the batch, by index.
    let batch = json!([{"event_type": "order.placed", "data": {"order_id": "o-2"}}, {"event_type": "order.placed", "data": {}}]);
    let (status, refused) = app.post("/api/v1/events/batch", &batch).await;
    assert_eq!((status, refused["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("[1].data")));

    // Frontend batch: the bad item alone is refused.
    let front = json!({"events": [{"event_type": "order.placed", "data": {"order_id": "o-3"}},
                                  {"event_type": "order.placed", "data": {"order_id": 7}}]});
    let (status, answer) = app.post("/api/v1/events/frontend/batch", &front).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 1, "{answer}");

    // CloudEvents.
    let cloud =
        json!({"specversion": "1.0", "id": "c-1", "source": "/shop", "type": "order.placed", "data": {"amount": 1}});
    let response = app
        .http
        .post(app.url("/api/v1/events/cloudevents"))
        .header("content-type", "application/cloudevents+json")
        .body(cloud.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "schema_violation");

    // NATS-native: checked by the persister. Refused is dead-lettered; accepted is redacted.
    app.publish("events.backend.order.order.placed", HeaderMap::new(), br#"{"data": {"amount": 2}}"#.to_vec()).await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "native-order-4");
    let body = json!({"data": {"order_id": "o-4", "card": {"number": "5500"}}}).to_string().into_bytes();
    app.publish("events.backend.order.order.placed", headers, body).await;
    let letters = wait_until(Duration::from_secs(20), || async {
        let (_, page) = app.get("/api/v1/events/deadletters?reason=schema_violation").await;
        let letters = page["dead_letters"].as_array().cloned().unwrap_or_default();
        (!letters.is_empty()).then_some(letters)
    })
    .await
    .expect("the NATS-native violation is dead-lettered");
    assert_eq!(letters[0]["reason"], "data fails `required`", "the reason names no value: {letters:?}");
    let native_id = event_service::domain::event_id_from_key("nats-msg-id", "native-order-4");
    let native = stored(&app, &native_id.to_string()).await;
    assert_eq!(native["data"], json!({"order_id": "o-4"}));
    assert_eq!(native["metadata"]["schema_version"], 1);

    // The tracking API and the RudderStack webhook: the bad message alone is refused.
    let schema = json!({"schema": {"type": "object", "required": ["plan"]}});
    assert_eq!(put(&app, "/api/v1/events/schemas/Plan Chosen", &schema).await.0, StatusCode::OK);
    let track = |id: &str, properties: Value| json!({"type": "track", "event": "Plan Chosen", "userId": "u1", "messageId": id, "properties": properties});
    let batch = json!({"batch": [track("t-bad", json!({})), track("t-good", json!({"plan": "pro"}))]});
    let (status, answer) = app.post("/v1/batch", &batch).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = app.post("/v1/track", &track("t-bad-alone", json!({"plan_name": "pro"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a lone bad message is refused as the SDKs expect: {answer}");
    let rudder = json!([track("r-bad", json!({})), track("r-good", json!({"plan": "team"}))]);
    let (status, answer) = app.post("/webhooks/rudderstack", &rudder).await;
    assert_eq!((status, answer["rejected"][0]["index"].as_u64()), (StatusCode::OK, Some(0)), "{answer}");

    // Stored: create, frontend o-3, native o-4, and the two good tracked ones; nothing refused was.
    app.wait_for_events(5, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.count_events().await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_mode_stores_the_event_with_its_errors() {
    let app = spawn_app().await;
    let schema = json!({"mode": "flag", "schema": {"type": "object", "required": ["plan"]}});
    assert_eq!(put(&app, "/api/v1/events/schemas/signup.done", &schema).await.0, StatusCode::OK);
    let (status, created) = app.post("/api/v1/events/create", &json!({"event_type": "signup.done", "data": {}})).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let event = stored(&app, created["event_id"].as_str().unwrap()).await;
    assert_eq!(event["metadata"]["schema_version"], 1);
    assert_eq!(event["metadata"]["schema_errors"][0]["field"], "data", "{event}");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("event_schema_checks_total{outcome=\"flagged\"} 1"), "{metrics}");
}
