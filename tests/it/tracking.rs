//! The tracking API that Segment and RudderStack SDKs send to, and the RudderStack webhook's
//! envelopes, spoken to the way those clients do.

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, TestApp, spawn_app, spawn_app_with};

fn basic(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")))
}

async fn send(app: &TestApp, path: &str, auth: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut request = app.http.post(app.url(path)).json(body);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The stored row of a message: type, source, category, user, data, metadata, timestamp.
async fn row(app: &TestApp, message_id: &str) -> (String, String, String, Option<String>, Value, Value, String) {
    sqlx::query_as(
        "SELECT event_type, event_source, event_category, user_id, data, metadata, \
                to_char(\"timestamp\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') \
         FROM event.events WHERE metadata->>'messageId' = $1",
    )
    .bind(message_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_messages_are_stored_once_with_their_user_type_and_properties() {
    let app = spawn_app_with(Options { write_keys: vec!["wk-live".into()], ..Options::default() }).await;
    let track = json!({"userId": "u-1", "event": "Order Completed", "properties": {"total": 42},
                       "messageId": "m-track", "context": {"library": {"name": "analytics-python"}}});
    let (status, answer) = send(&app, "/v1/track", Some(&basic("wk-live")), &track).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["success"], true);
    // An SDK retry lands once.
    assert_eq!(send(&app, "/v1/track", Some(&basic("wk-live")), &track).await.0, StatusCode::OK);
    // writeKey in the body works too (older Segment SDKs send no Authorization).
    let identify = json!({"anonymousId": "anon-7", "traits": {"plan": "pro"}, "messageId": "m-identify",
                          "writeKey": "wk-live"});
    assert_eq!(send(&app, "/v1/identify", None, &identify).await.0, StatusCode::OK);
    let page = json!({"userId": "u-1", "name": "Pricing", "messageId": "m-page"});
    assert_eq!(send(&app, "/v1/page", Some(&basic("wk-live")), &page).await.0, StatusCode::OK);
    app.wait_for_events(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.count_events().await, 3);

    let (event_type, source, category, user, data, metadata, _) = row(&app, "m-track").await;
    assert_eq!(
        (event_type.as_str(), source.as_str(), category.as_str()),
        ("Order Completed", "backend", "user_action")
    );
    assert_eq!((user.as_deref(), data["total"].as_i64()), (Some("u-1"), Some(42)));
    assert_eq!(metadata["message_type"], "track");
    let (event_type, _, _, user, data, ..) = row(&app, "m-identify").await;
    assert_eq!(
        (event_type.as_str(), user.as_deref(), data["plan"].as_str()),
        ("identify", Some("anon-7"), Some("pro"))
    );
    let (event_type, _, category, ..) = row(&app, "m-page").await;
    assert_eq!((event_type.as_str(), category.as_str()), ("Pricing", "page_view"));

    // A wrong or missing key is refused; an unknown message type is not an endpoint.
    let (status, answer) = send(&app, "/v1/track", Some(&basic("nope")), &track).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_write_key")));
    assert_eq!(send(&app, "/v1/track", None, &track).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&app, "/v1/launch", Some(&basic("wk-live")), &track).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_merge_their_envelope_reject_bad_items_alone_and_correct_skewed_clocks() {
    let app = spawn_app().await;
    // The client's clock is two hours behind: it sent at 10:00:05 what happened at 10:00:00.
    let now = chrono::Utc::now();
    let skewed = now - chrono::Duration::hours(2);
    let batch = json!({
        "batch": [
            {"type": "track", "event": "Signup Form Submitted", "userId": "u-2", "messageId": "b-1",
             "originalTimestamp": (skewed - chrono::Duration::seconds(5)).to_rfc3339()},
            {"type": "track", "messageId": "b-2"},
            {"type": "screen", "name": "Home", "anonymousId": "a-3", "messageId": "b-3",
             "context": {"library": {"name": "analytics-ios"}}},
        ],
        "context": {"app": {"name": "shop"}},
        "sentAt": skewed.to_rfc3339(),
        "writeKey": "any"
    });
    let (status, answer) = send(&app, "/v1/batch", None, &batch).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"][0]["index"], 1);
    assert_eq!(answer["rejected"][0]["errors"][0]["field"], "event");
    app.wait_for_events(2, Duration::from_secs(10)).await;

    let (event_type, source, category, _, _, metadata, timestamp) = row(&app, "b-1").await;
    assert_eq!(
        (event_type.as_str(), source.as_str(), category.as_str()),
        ("Signup Form Submitted", "backend", "form_submit")
    );
    let corrected = chrono::NaiveDateTime::parse_from_str(&timestamp, "%Y-%m-%dT%H:%M:%S").unwrap().and_utc();
    let expected = now - chrono::Duration::seconds(5);
    assert!((corrected - expected).num_seconds().abs() <= 3, "corrected to {corrected}, expected about {expected}");
    assert!(
        metadata["originalTimestamp"].is_string()
            && metadata["sentAt"].is_string()
            && metadata["receivedAt"].is_string()
    );
    let stored: Value = sqlx::query_scalar("SELECT context FROM event.events WHERE metadata->>'messageId' = 'b-3'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored["app"]["name"], "shop", "the envelope's context is merged in");
    let (_, source, category, ..) = row(&app, "b-3").await;
    assert_eq!((source.as_str(), category.as_str()), ("frontend", "page_view"));

    // Nothing valid: 400, which SDKs do not retry.
    let (status, answer) = send(&app, "/v1/batch", None, &json!({"batch": [{"type": "track"}]})).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_message")));
    assert_eq!(answer["errors"][0]["field"], "[0].event");
    let (status, _) = send(&app, "/v1/batch", None, &json!({"messages": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_limits_answer_clearly() {
    let app = spawn_app().await;
    let big = json!({"type": "track", "event": "big", "userId": "u", "messageId": "big-1",
                     "properties": {"blob": "x".repeat(40 * 1024)}});
    let small = json!({"type": "track", "event": "small", "userId": "u", "messageId": "small-1"});
    let (status, answer) = send(&app, "/v1/batch", None, &json!({"batch": [big, small]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 0);
    assert!(answer["rejected"][0]["errors"][0]["message"].as_str().unwrap().contains("limit is 32768"), "{answer}");
    let (status, answer) = send(&app, "/v1/track", None, &big).await;
    assert_eq!((status, answer["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));
    let huge: Vec<Value> = (0..200)
        .map(|i| json!({"type": "track", "event": "e", "properties": {"pad": "y".repeat(30_000), "i": i}}))
        .collect();
    let (status, _) = send(&app, "/v1/batch", None, &json!({"batch": huge})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rudderstack_webhook_takes_batch_envelopes_and_keeps_the_good_items() {
    let app = spawn_app().await;
    let (status, answer) = app
        .post(
            "/webhooks/rudderstack",
            &json!({"batch": [
                {"type": "track", "event": "Kept", "userId": "u", "messageId": "w-1"},
                {"type": "track", "userId": "u", "messageId": "w-2"},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["event_ids"].as_array().unwrap().len(), 1);
    assert_eq!(answer["rejected"][0]["index"], 1);
    app.wait_for_events(1, Duration::from_secs(10)).await;
    let (event_type, ..) = row(&app, "w-1").await;
    assert_eq!(event_type, "Kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_processors_take_webhook_url_as_well() {
    let app = spawn_app().await;
    let (status, processor) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "legacy", "processor_type": "webhook",
                    "config": {"webhook_url": "https://crm.example.com/hook"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{processor}");
    assert_eq!(processor["config"]["webhook_url"], "https://crm.example.com/hook");
}
