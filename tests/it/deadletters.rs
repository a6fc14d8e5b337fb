//! Dead letters as an operator meets them: a poison NATS message, a processor that fails
//! until it is fixed and a subscription that fails until it is fixed are each dead-lettered,
//! listed, shown and redriven, and then land exactly as if they had succeeded the first time.
//! Deletes, purges, the admin scope and the counters in `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, TestApp, callback_args, dispatcher_args, spawn_app, spawn_app_with, wait_until};
use crate::receiver::Receiver;

const LIST: &str = "/api/v1/events/deadletters";

async fn listed(app: &TestApp, query: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("{LIST}?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["dead_letters"].as_array().unwrap().clone()
}

async fn wait_for_listed(app: &TestApp, query: &str, count: usize) -> Vec<Value> {
    wait_until(Duration::from_secs(30), || async {
        let letters = listed(app, query).await;
        (letters.len() >= count).then_some(letters)
    })
    .await
    .unwrap_or_else(|| panic!("fewer than {count} dead letters match {query}"))
}

async fn redrive(app: &TestApp, body: Value) -> Value {
    let (status, answer) = app.post(&format!("{LIST}/redrive"), &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn delete(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let response = app.http.delete(app.url(path)).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// Endpoints that answer 500 until `fixed` is set, then 200.
async fn broken_until(fixed: &Arc<AtomicBool>) -> Receiver {
    let fixed = fixed.clone();
    Receiver::scripted(move |path, _| {
        if path.starts_with("ok") || fixed.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_nats_message_is_listed_shown_and_stored_once_its_payload_is_fixed() {
    let app = spawn_app().await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-42");
    app.publish("events.backend.transaction.order.placed", headers, b"{\"order\": 42".to_vec()).await;
    app.publish("events.backend.user_action.user.signed_up", HeaderMap::new(), b"not json".to_vec()).await;

    // Listed, and every filter narrows.
    let all = wait_for_listed(&app, "stage=persister", 2).await;
    assert_eq!(metric(&app, "event_dead_letters_stored{stage=\"persister\"}").await, 2.0);
    assert_eq!(listed(&app, "reason=invalid_json").await.len(), 2);
    assert_eq!(listed(&app, "reason=processor_failed").await.len(), 0);
    assert_eq!(listed(&app, "stage=sender").await.len(), 0);
    let orders = listed(&app, "event_type=order.*").await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(listed(&app, "limit=1").await.len(), 1);
    let (_, second_page) = app.get(&format!("{LIST}?after={}", all[0]["seq"])).await;
    assert_eq!(second_page["dead_letters"][0]["seq"], all[1]["seq"], "the cursor goes on after the first");
    let (status, refused) = app.get(&format!("{LIST}?stage=nowhere&since=yesterday")).await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_error")));

    // Shown with the original payload and where it came from.
    let seq = orders[0]["seq"].as_u64().unwrap();
    let (status, shown) = app.get(&format!("{LIST}/{seq}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["stage"], "persister");
    assert_eq!(shown["reason_code"], "invalid_json");
    assert_eq!(shown["original_subject"], "events.backend.transaction.order.placed");
    assert_eq!(shown["event_type"], "order.placed");
    assert_eq!((shown["payload_encoding"].as_str(), shown["payload"].as_str()), (Some("text"), Some("{\"order\": 42")));
    assert_eq!(shown["headers"]["Event-Service-Original-Msg-Id"], json!(["order-42"]));

    // Redriven unchanged, it is refused again: a new dead letter says where it came from.
    let answer = redrive(&app, json!({"seqs": [seq]})).await;
    assert_eq!(answer["redriven"][0]["action"], "republished", "{answer}");
    assert_eq!(app.get(&format!("{LIST}/{seq}")).await.0, StatusCode::NOT_FOUND);
    let again = wait_until(Duration::from_secs(20), || async {
        let letters = listed(&app, "event_type=order.*").await;
        letters.into_iter().find(|letter| letter["seq"].as_u64() != Some(seq))
    })
    .await
    .expect("refused again");
    let again_seq = again["seq"].as_u64().unwrap();
    let (_, shown) = app.get(&format!("{LIST}/{again_seq}")).await;
    assert_eq!(shown["headers"]["Event-Service-Redriven-From"], json!([seq.to_string()]));

    // Fixed, it is stored once, with the id its producer's Nats-Msg-Id gives it.
    let fixed = json!({"data": {"order": 42}});
    let answer = redrive(&app, json!({"seqs": [again_seq], "payload": fixed})).await;
    assert_eq!(answer["redriven"].as_array().unwrap().len(), 1, "{answer}");
    app.wait_for_events(1, Duration::from_secs(20)).await;
    let expected_id = event_service::domain::event_id_from_key("nats-msg-id", "order-42");
    let (status, stored) = app.get(&format!("/api/v1/events/{expected_id}")).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!((stored["event_type"].as_str(), &stored["data"]), (Some("order.placed"), &json!({"order": 42})));
    let answer = redrive(&app, json!({"seqs": [again_seq]})).await;
    assert_eq!(answer["refused"][0]["code"], "not_found", "a redrive lands once: {answer}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.count_events().await, 1);

    // A payload replaces one dead letter's only; a purge needs a filter or all=true.
    let (status, _) = app.post(&format!("{LIST}/redrive"), &json!({"filter": {}, "payload": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(delete(&app, LIST).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, misspelled) = delete(&app, &format!("{LIST}?stage=persister&reason_code=x")).await;
    assert_eq!((status, misspelled["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "never wider");
    assert_eq!(listed(&app, "").await.len(), 1, "nothing was purged");
    let (status, purged) = delete(&app, &format!("{LIST}?event_type=user.*")).await;
    assert_eq!((status, purged["deleted"].as_u64()), (StatusCode::OK, Some(1)), "{purged}");
    assert!(listed(&app, "").await.is_empty());
    assert_eq!(delete(&app, &format!("{LIST}/{again_seq}")).await.0, StatusCode::NOT_FOUND);

    assert_eq!(metric(&app, "event_dead_letters_redriven_total{stage=\"persister\"}").await, 2.0);
    assert_eq!(metric(&app, "event_dead_letters_deleted_total{stage=\"persister\"}").await, 1.0);
    assert_eq!(metric(&app, "event_dead_letters_stored{stage=\"persister\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_failed_runs_again_when_redriven_and_the_event_is_processed() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let fixed = Arc::new(AtomicBool::new(false));
    let hooks = broken_until(&fixed).await;
    for (name, path, priority) in [("audit", "ok/audit", 2), ("billing", "billing", 1)] {
        let body = json!({"processor_name": name, "processor_type": "webhook", "max_retries": 0, "priority": priority,
                          "config": {"url": hooks.url(path)}});
        let (status, answer) = app.post("/api/v1/events/processors", &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    // The processor stage loads a registration within a second (a notification): let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = app.create(json!({"event_type": "invoice.sent", "user_id": "u1"})).await;
    app.wait_for_status(&id, &["failed"]).await;
    let letters = wait_for_listed(&app, "stage=processor", 1).await;
    assert_eq!(
        (letters[0]["event_id"].as_str(), letters[0]["reason_code"].as_str()),
        (Some(id.as_str()), Some("processor_failed"))
    );
    let seq = letters[0]["seq"].as_u64().unwrap();

    // Still broken: the replay fails, the dead letter stays, the event stays failed.
    let answer = redrive(&app, json!({"filter": {"stage": "processor"}})).await;
    let replay_id = answer["redriven"][0]["replay_id"].as_str().expect("a replay job").to_owned();
    assert_eq!(answer["redriven"][0]["action"], "reprocessing");
    wait_for_job(&app, &replay_id).await;
    assert_eq!(listed(&app, "stage=processor").await.len(), 1);
    assert_eq!(app.get(&format!("/api/v1/events/{id}")).await.1["status"], "failed");

    // Fixed: only the processor that failed runs again; the event is processed, the dead letter gone.
    fixed.store(true, Ordering::SeqCst);
    let answer = redrive(&app, json!({"seqs": [seq]})).await;
    let replay_id = answer["redriven"][0]["replay_id"].as_str().expect("a replay job").to_owned();
    wait_for_job(&app, &replay_id).await;
    let event = app.wait_for_status(&id, &["processed"]).await;
    assert_eq!(event["processors"], json!(["audit", "billing"]), "{event}");
    assert_eq!(hooks.paths_for(&id), ["ok/audit", "billing", "billing", "billing"]);
    assert!(listed(&app, "stage=processor").await.is_empty());
}

async fn wait_for_job(app: &TestApp, replay_id: &str) -> Value {
    wait_until(Duration::from_secs(20), || async {
        let (_, job) = app.get(&format!("/api/v1/events/replay/{replay_id}")).await;
        (job["status"] == "completed").then_some(job)
    })
    .await
    .expect("the replay job completes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_failed_is_delivered_when_redriven_with_its_webhook_id() {
    let mut app = spawn_app().await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    let fixed = Arc::new(AtomicBool::new(false));
    let hooks = broken_until(&fixed).await;
    let policy = json!({"max_retries": 1, "backoff_seconds": [0.05]});
    let body = json!({"event_types": ["parcel.*"], "callback_url": hooks.url("parcels"), "retry_policy": policy});
    let (status, subscription) = app.post("/api/v1/events/subscriptions", &body).await;
    assert_eq!(status, StatusCode::OK, "{subscription}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let id = app.create(json!({"event_type": "parcel.shipped"})).await;
    let letters = wait_for_listed(&app, "stage=sender", 1).await;
    let letter = &letters[0];
    assert_eq!(
        (letter["event_id"].as_str(), letter["reason_code"].as_str()),
        (Some(id.as_str()), Some("delivery_failed"))
    );
    assert_eq!(letter["subscription_id"], subscription["subscription_id"]);
    let failed_id = hooks.received()[0].headers["webhook-id"].clone();

    fixed.store(true, Ordering::SeqCst);
    let answer = redrive(&app, json!({"seqs": [letter["seq"]]})).await;
    assert_eq!(answer["redriven"][0]["action"], "requeued", "{answer}");
    let received = wait_until(Duration::from_secs(20), || async {
        let received = hooks.received();
        (received.len() >= 3).then_some(received)
    })
    .await
    .expect("delivered after the redrive");
    assert_eq!(received.len(), 3, "two failed attempts, then the redriven one");
    assert_eq!(received[2].headers["webhook-id"], failed_id, "the same webhook id: receivers dedupe it");
    assert_eq!(received[2].body["event_id"], id.as_str());
    assert!(listed(&app, "").await.is_empty());
    let sub_id = subscription["subscription_id"].as_str().unwrap();
    wait_until(Duration::from_secs(10), || async {
        let (_, log) = app.get(&format!("/api/v1/events/subscriptions/{sub_id}/deliveries")).await;
        log["deliveries"].as_array().unwrap().iter().any(|d| d["status"] == "delivered").then_some(())
    })
    .await
    .expect("the delivery log says delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_need_the_admin_key() {
    let app = spawn_app_with(Options {
        api_keys: vec!["admin-key".into()],
        ingest_keys: vec!["ingest-key".into()],
        ..Options::default()
    })
    .await;
    let get = |key: &'static str| app.http.get(app.url(LIST)).bearer_auth(key).send();
    assert_eq!(get("ingest-key").await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(get("admin-key").await.unwrap().status(), StatusCode::OK);
    let redrive = app.http.post(app.url(&format!("{LIST}/redrive"))).json(&json!({"seqs": [1]}));
    assert_eq!(redrive.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
}
