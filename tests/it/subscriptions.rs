//! Subscriptions: the API, and webhook delivery against an in-process receiver.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::harness::{Options, TestApp, callback_args, dispatcher_args, spawn_app, spawn_app_with, wait_until};
use crate::receiver::{Received, Receiver};

async fn subscribe(app: &TestApp, body: Value) -> Value {
    let (status, subscription) = app.post("/api/v1/events/subscriptions", &body).await;
    assert_eq!(status, StatusCode::OK, "{subscription}");
    subscription
}

/// Dispatchers reload on a notification; leave them the moment they need.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

async fn app_with_dispatcher() -> TestApp {
    let mut app = spawn_app().await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    app
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("/api/v1/events/subscriptions/{id}/deliveries")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["deliveries"].as_array().unwrap().clone()
}

async fn wait_for_received(hooks: &Receiver, count: usize) -> Vec<Received> {
    wait_until(Duration::from_secs(20), || async {
        let received = hooks.received();
        (received.len() >= count).then_some(received)
    })
    .await
    .unwrap_or_else(|| panic!("fewer than {count} deliveries arrived (got {})", hooks.received().len()))
}

/// Standard Webhooks verification, written from the specification independently of the
/// service's signer.
fn verify(secret: &str, delivery: &Received) -> bool {
    let header = |name: &str| delivery.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let key = base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let signed =
        [header("webhook-id").as_bytes(), b".", header("webhook-timestamp").as_bytes(), b".", &delivery.raw].concat();
    mac.update(&signed);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header("webhook-signature").split(' ').any(|signature| signature == format!("v1,{expected}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_created_shown_masked_updated_and_deleted() {
    let app = spawn_app().await;
    let mut created_events = app.bus_client().subscribe("event.subscription.created").await.unwrap();
    for (body, field) in [
        (json!({"callback_url": "https://a.example.com/"}), "event_types"),
        (json!({"event_types": [], "callback_url": "https://a.example.com/"}), "event_types"),
        (json!({"event_types": ["a"], "callback_url": "ftp://a.example.com/"}), "callback_url"),
        (json!({"event_types": ["a"], "callback_url": "http://169.254.169.254/latest"}), "callback_url"),
        (json!({"event_types": ["a"], "subscriber_type": "webhook"}), "callback_url"),
        (json!({"event_types": ["a"], "event_categories": ["nope"]}), "event_categories"),
    ] {
        let (status, answer) = app.post("/api/v1/events/subscriptions", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(answer["errors"][0]["field"], field, "{body}: {answer}");
    }
    let created = subscribe(
        &app,
        json!({"subscription_id": "crm", "event_types": ["user.*"], "callback_url": "https://crm.example.com/in",
               "subscriber_name": "crm-service", "rate_limit_per_second": 50}),
    )
    .await;
    let secret = created["webhook_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() > 40, "{secret}");
    assert_eq!(created["subscriber_type"], "service");
    assert_eq!(created["retry_policy"]["max_retries"], 5);
    assert_eq!(created["enabled"], true);
    let announced = tokio::time::timeout(Duration::from_secs(5), created_events.next()).await.unwrap().unwrap();
    let announced: Value = serde_json::from_slice(&announced.payload).unwrap();
    assert_eq!(
        (announced["subscription_id"].as_str(), announced["event_types"].clone()),
        (Some("crm"), json!(["user.*"]))
    );

    let (_, shown) = app.get("/api/v1/events/subscriptions/crm").await;
    assert_eq!(shown["webhook_secret"], "whsec_********");
    assert_eq!(shown["stats"]["delivered"], 0);
    let (_, revealed) = app.get("/api/v1/events/subscriptions/crm/secret").await;
    assert_eq!(revealed["webhook_secret"], secret.as_str());
    let (status, again) =
        app.post("/api/v1/events/subscriptions", &json!({"subscription_id": "crm", "event_types": ["x"]})).await;
    assert_eq!((status, again["code"].as_str()), (StatusCode::CONFLICT, Some("duplicate_subscription_id")));

    let patched: Value = app
        .http
        .patch(app.url("/api/v1/events/subscriptions/crm"))
        .json(&json!({"enabled": false, "event_sources": ["frontend"], "callback_url": "https://crm.example.com/v2"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (patched["enabled"].as_bool(), patched["callback_url"].as_str()),
        (Some(false), Some("https://crm.example.com/v2"))
    );
    assert_eq!(patched["event_sources"], json!(["frontend"]));
    assert_eq!(patched["event_types"], json!(["user.*"]), "untouched fields stay");
    let (_, listed) = app.get("/api/v1/events/subscriptions?enabled=false").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (_, listed) = app.get("/api/v1/events/subscriptions?event_type=order.placed").await;
    assert_eq!(listed.as_array().unwrap().len(), 0);

    let deleted = app.http.delete(app.url("/api/v1/events/subscriptions/crm")).send().await.unwrap();
    assert_eq!(deleted.json::<Value>().await.unwrap(), json!({"status": "deleted", "subscription_id": "crm"}));
    assert_eq!(app.get("/api/v1/events/subscriptions/crm").await.0, StatusCode::NOT_FOUND);
    let gone = app.http.delete(app.url("/api/v1/events/subscriptions/crm")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_and_filtered_by_type_source_and_category() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::start().await;
    let users = subscribe(
        &app,
        json!({"event_types": ["user.*"], "event_sources": ["backend"], "callback_url": hooks.url("users")}),
    )
    .await;
    subscribe(
        &app,
        json!({"event_types": ["order.>"], "event_categories": ["payment"], "callback_url": hooks.url("payments")}),
    )
    .await;
    subscribe(&app, json!({"event_types": ["user.deleted"], "callback_url": hooks.url("deletions"), "enabled": false}))
        .await;
    settle().await;
    let user = app.create(json!({"event_type": "user.created", "user_id": "u1"})).await;
    app.create(json!({"event_type": "user.created.v2"})).await;
    app.post("/api/v1/events/frontend", &json!({"event_type": "user.created"})).await;
    app.create(json!({"event_type": "order.placed"})).await;
    let payment = app.create(json!({"event_type": "order.paid.card", "event_category": "payment"})).await;
    app.create(json!({"event_type": "user.deleted"})).await;
    let received = wait_for_received(&hooks, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received_now = hooks.received();
    assert_eq!(
        received_now.len(),
        3,
        "{:?}",
        received_now.iter().map(|r| (&r.path, &r.body["event_type"])).collect::<Vec<_>>()
    );
    assert_eq!(hooks.paths_for(&user), ["users"]);
    assert_eq!(hooks.paths_for(&payment), ["payments"]);
    let deletion = received_now
        .iter()
        .find(|r| r.path == "users" && r.body["event_type"] == "user.deleted")
        .expect("user.deleted to users");
    assert_eq!(deletion.body["event_source"], "backend");

    let secret = users["webhook_secret"].as_str().unwrap();
    let delivery = received.iter().find(|r| r.body["event_id"] == user.as_str()).unwrap();
    assert!(verify(secret, delivery), "signature verifies with the subscription's secret");
    assert!(!verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", delivery), "and with no other");
    let timestamp: i64 = delivery.headers["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 30);
    assert_eq!(delivery.body["user_id"], "u1");

    let log = deliveries(&app, users["subscription_id"].as_str().unwrap()).await;
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|attempt| attempt["status"] == "delivered" && attempt["status_code"] == 200));
}

/// Since when every delivery to the subscription has failed (`None`: the last one went through).
async fn failing_since(app: &TestApp, subscription: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT failing_since FROM event.event_subscriptions WHERE subscription_id = $1")
        .bind(subscription["subscription_id"].as_str().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_retry_with_the_same_webhook_id_and_honour_retry_after() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::scripted(|path, call| {
        if path == "flaky" && call == 1 { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
    })
    .await;
    let policy = json!({"max_retries": 3, "backoff_seconds": [0.05]});
    let flaky = subscribe(
        &app,
        json!({"event_types": ["job.done"], "callback_url": hooks.url("flaky"), "retry_policy": policy}),
    )
    .await;
    subscribe(&app, json!({"event_types": ["job.done"], "callback_url": hooks.url("busy"), "retry_policy": policy}))
        .await;
    settle().await;
    let id = app.create(json!({"event_type": "job.done"})).await;
    wait_for_received(&hooks, 4).await;

    let flaky_calls: Vec<Received> = hooks.received().into_iter().filter(|r| r.path == "flaky").collect();
    assert_eq!(flaky_calls.len(), 2);
    assert_eq!(flaky_calls[0].headers["webhook-id"], flaky_calls[1].headers["webhook-id"]);
    let log = deliveries(&app, flaky["subscription_id"].as_str().unwrap()).await;
    let statuses: Vec<(&str, i64)> =
        log.iter().map(|a| (a["status"].as_str().unwrap(), a["attempt"].as_i64().unwrap())).collect();
    assert_eq!(statuses, [("delivered", 2), ("retry", 1)], "newest first");
    assert_eq!(log[1]["status_code"], 500);
    assert!(log[1]["next_attempt_at"].is_string());
    assert_eq!(log[1]["event_id"], id.as_str());
    // The 500 opened the subscription's failure record; the delivery after it closed it.
    assert_eq!(failing_since(&app, &flaky).await, None);

    // 429 with Retry-After: 1 waits a second, not the 50 ms schedule.
    let busy = hooks.arrivals("busy");
    assert_eq!(busy.len(), 2);
    assert!(busy[1] - busy[0] >= Duration::from_millis(950), "{:?}", busy[1] - busy[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_and_other_client_errors_are_not_retried() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::scripted(|path, _| match path {
        "gone" => StatusCode::GONE,
        "reject" => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    })
    .await;
    let mut disabled = app.bus_client().subscribe("event.subscription.disabled").await.unwrap();
    let policy = json!({"max_retries": 3, "backoff_seconds": [0.05]});
    let gone =
        subscribe(&app, json!({"event_types": ["ping"], "callback_url": hooks.url("gone"), "retry_policy": policy}))
            .await;
    let reject =
        subscribe(&app, json!({"event_types": ["ping"], "callback_url": hooks.url("reject"), "retry_policy": policy}))
            .await;
    settle().await;
    app.create(json!({"event_type": "ping"})).await;
    wait_for_received(&hooks, 2).await;

    let announced = tokio::time::timeout(Duration::from_secs(5), disabled.next()).await.unwrap().unwrap();
    let announced: Value = serde_json::from_slice(&announced.payload).unwrap();
    assert_eq!(announced["subscription_id"], gone["subscription_id"]);
    let (_, gone_now) =
        app.get(&format!("/api/v1/events/subscriptions/{}", gone["subscription_id"].as_str().unwrap())).await;
    assert_eq!(gone_now["enabled"], false);
    assert!(gone_now["disabled_reason"].as_str().unwrap().contains("410"));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    app.create(json!({"event_type": "ping"})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let paths: Vec<String> = hooks.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths.iter().filter(|p| *p == "gone").count(), 1, "a disabled subscription gets nothing");
    assert_eq!(paths.iter().filter(|p| *p == "reject").count(), 2, "one attempt per event, never retried");
    let log = deliveries(&app, reject["subscription_id"].as_str().unwrap()).await;
    assert!(log.iter().all(|a| a["status"] == "failed" && a["status_code"] == 400 && a["attempt"] == 1));
    assert!(failing_since(&app, &reject).await.is_some(), "every delivery failed: the failure record is open");
    let letters = app.wait_for_dead_letters(3).await;
    let codes: Vec<String> = letters
        .iter()
        .filter(|l| l.subject.as_str() == "deadletter.sender")
        .map(|l| l.headers.get("Event-Service-Reason-Code").unwrap().as_str().to_owned())
        .collect();
    assert_eq!(codes.iter().filter(|c| *c == "delivery_rejected").count(), 2);
    assert_eq!(codes.iter().filter(|c| *c == "endpoint_gone").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_and_deleted_subscriptions_get_nothing_more() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::start().await;
    subscribe(&app, json!({"event_types": ["tick"], "callback_url": hooks.url("limited"), "rate_limit_per_second": 5}))
        .await;
    let doomed = subscribe(
        &app,
        json!({"event_types": ["tock"], "callback_url": hooks.url("doomed"), "rate_limit_per_second": 1}),
    )
    .await;
    settle().await;
    let batch: Vec<Value> = (0..12).map(|_| json!({"event_type": "tick"})).collect();
    assert_eq!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0, StatusCode::OK);
    let batch: Vec<Value> = (0..5).map(|_| json!({"event_type": "tock"})).collect();
    assert_eq!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0, StatusCode::OK);

    // Deliveries already queued for a deleted subscription are dropped.
    wait_until(Duration::from_secs(5), || async { (!hooks.arrivals("doomed").is_empty()).then_some(()) })
        .await
        .unwrap();
    let url = app.url(&format!("/api/v1/events/subscriptions/{}", doomed["subscription_id"].as_str().unwrap()));
    assert_eq!(app.http.delete(url).send().await.unwrap().status(), StatusCode::OK);

    wait_until(Duration::from_secs(10), || async { (hooks.arrivals("limited").len() == 12).then_some(()) })
        .await
        .unwrap();
    let limited = hooks.arrivals("limited");
    for pair in limited.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(180), "5/s means 200 ms apart: {:?}", pair[1] - pair[0]);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(hooks.arrivals("doomed").len() <= 2, "at most the one in flight when it was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_addresses_are_recorded_not_retried() {
    let mut app = spawn_app().await;
    // This dispatcher may not call loopback.
    let strict = event_service::infra::settings::CallbackArgs { deny_private: true, allowed_nets: vec![] };
    app.start_dispatcher(dispatcher_args(), strict).await;
    let hooks = Receiver::start().await;
    let sub = subscribe(&app, json!({"event_types": ["secret.stuff"], "callback_url": hooks.url("inside")})).await;
    settle().await;
    app.create(json!({"event_type": "secret.stuff"})).await;
    let id = sub["subscription_id"].as_str().unwrap().to_owned();
    let log = wait_until(Duration::from_secs(5), || async {
        let log = deliveries(&app, &id).await;
        (!log.is_empty()).then_some(log)
    })
    .await
    .unwrap();
    assert_eq!(log[0]["status"], "refused");
    assert!(log[0]["error"].as_str().unwrap().contains("loopback"), "{}", log[0]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deliveries(&app, &id).await.len(), 1, "not retried");
    assert!(hooks.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_delivery_still_delivers_and_resend_and_recover_work() {
    let mut app = app_with_dispatcher().await;
    // Redeliver unacknowledged deliveries after 2 s instead of a minute.
    let stream = app.js.get_stream("DELIVERIES").await.unwrap();
    let mut config = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("sender")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.ack_wait = Duration::from_secs(2);
    app.js.update_consumer_on_stream(config, "DELIVERIES").await.unwrap();
    let hooks =
        Receiver::scripted(
            |path, call| if path == "slowfail" && call == 1 { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        )
        .await;
    let sub = subscribe(&app, json!({"event_types": ["slow.job"], "callback_url": hooks.url("slow")})).await;
    settle().await;
    let id = app.create(json!({"event_type": "slow.job"})).await;
    wait_until(Duration::from_secs(5), || async { (!hooks.arrivals("slow").is_empty()).then_some(()) }).await.unwrap();
    app.kill_dispatchers().await;
    app.start_dispatcher(dispatcher_args(), callback_args()).await;
    let sub_id = sub["subscription_id"].as_str().unwrap().to_owned();
    let log = wait_until(Duration::from_secs(10), || async {
        let log = deliveries(&app, &sub_id).await;
        log.iter().any(|a| a["status"] == "delivered").then_some(log)
    })
    .await
    .expect("delivered after the crash");
    assert_eq!(log[0]["event_id"], id.as_str());
    assert!(hooks.arrivals("slow").len() >= 2, "the request in flight at the crash is sent again");

    // Resend one event; recover the failures of a window.
    let resend = app.url(&format!("/api/v1/events/subscriptions/{sub_id}/deliveries/{id}/resend"));
    let before = hooks.arrivals("slow").len();
    let answer: Value = app.http.post(resend).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["status"], "queued");
    wait_until(Duration::from_secs(5), || async { (hooks.arrivals("slow").len() > before).then_some(()) })
        .await
        .unwrap();

    let failing = subscribe(&app, json!({"event_types": ["fail.once"], "callback_url": hooks.url("slowfail")})).await;
    let failing_id = failing["subscription_id"].as_str().unwrap().to_owned();
    settle().await;
    let since = chrono::Utc::now();
    app.create(json!({"event_type": "fail.once"})).await;
    wait_until(Duration::from_secs(5), || async { (!deliveries(&app, &failing_id).await.is_empty()).then_some(()) })
        .await
        .unwrap();
    let (status, recovered) =
        app.post(&format!("/api/v1/events/subscriptions/{failing_id}/recover"), &json!({"since": since})).await;
    assert_eq!((status, recovered["queued"].as_i64()), (StatusCode::OK, Some(1)), "{recovered}");
    let log = wait_until(Duration::from_secs(5), || async {
        let log = deliveries(&app, &failing_id).await;
        (log.first().is_some_and(|a| a["status"] == "delivered")).then_some(log)
    })
    .await
    .expect("recovered delivery");
    assert_eq!(log.len(), 2);
    let (status, _) = app.post(&format!("/api/v1/events/subscriptions/{failing_id}/recover"), &json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscriptions_get_a_thousand_events_exactly_once() {
    let app = spawn_app_with(Options::default()).await;
    let mut app = app;
    let mut settings = dispatcher_args();
    settings.sender_concurrency = 128;
    // The receiver is healthy: only a starved machine (other tests on the same two cores) could
    // make an answer late, and a timeout would send again.
    settings.delivery_timeout_ms = 30_000;
    app.start_dispatcher(settings, callback_args()).await;
    let hooks = Receiver::start().await;
    for i in 0..100 {
        subscribe(&app, json!({"event_types": ["fan.>"], "callback_url": hooks.url(&format!("s{i}"))})).await;
    }
    settle().await;
    let started = Instant::now();
    for chunk in 0..10 {
        let batch: Vec<Value> =
            (0..100).map(|i| json!({"event_type": "fan.out", "data": {"n": chunk * 100 + i}})).collect();
        // 202 is fine too: the batch is in JetStream, PostgreSQL is just busy.
        assert!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0.is_success());
    }
    wait_until(Duration::from_secs(240), || async { (hooks.count() >= 100_000).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("only {} of 100000 deliveries arrived", hooks.count()));
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per_pair: HashMap<(String, String), usize> = HashMap::new();
    for received in hooks.received() {
        *per_pair.entry((received.path, received.body["event_id"].as_str().unwrap().to_owned())).or_default() += 1;
    }
    assert_eq!(per_pair.len(), 100_000);
    assert!(per_pair.values().all(|count| *count == 1), "each delivery exactly once to a healthy receiver");
    eprintln!("100 subscriptions x 1000 events: {:.0} deliveries/s", 100_000.0 / elapsed.as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_delays_only_its_own_deliveries() {
    let mut app = spawn_app().await;
    let settings = dispatcher_args(); // 32 deliveries at once, 8 per subscription, 2 s timeout
    let per_subscription = usize::from(settings.sender_subscription_concurrency);
    app.start_dispatcher(settings, callback_args()).await;
    let hooks = Receiver::start().await;
    subscribe(
        &app,
        json!({"subscription_id": "stalled", "event_types": ["lane.>"], "callback_url": hooks.url("stall")}),
    )
    .await;
    subscribe(&app, json!({"subscription_id": "healthy", "event_types": ["lane.>"], "callback_url": hooks.url("ok")}))
        .await;
    settle().await;
    let events = 60;
    let batch: Vec<Value> = (0..events).map(|n| json!({"event_type": "lane.test", "data": {"n": n}})).collect();
    assert!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0.is_success());

    let healthy = || hooks.received().iter().filter(|r| r.path == "ok").count();
    wait_until(Duration::from_secs(30), || async { (healthy() >= events).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("the healthy subscription got {} of {events}", healthy()));
    // Every stalled call waits out the 2 s timeout. Behind a batch barrier the healthy
    // deliveries would wait for those; with lanes they went by while the stalled subscription
    // held at most its own slots for a round or two.
    let stalled = hooks.arrivals("stall");
    assert!(stalled.len() <= 2 * per_subscription, "{} stalled calls before the healthy ones were done", stalled.len());
    let first = stalled[0];
    let at_once = stalled.iter().filter(|at| at.duration_since(first) < Duration::from_millis(1500)).count();
    assert!(at_once <= per_subscription, "{at_once} calls to one subscription in flight at once");
    assert!(at_once > 1, "its deliveries are not sent one by one either");

    // The stalled subscription keeps being tried, on its own schedule.
    wait_until(Duration::from_secs(30), || async {
        let failed = deliveries(&app, "stalled").await.iter().filter(|d| d["status"] != "delivered").count();
        (failed >= per_subscription).then_some(())
    })
    .await
    .expect("the stalled deliveries are recorded as failed attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_old_one_until_the_overlap_ends() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::start().await;
    let created = subscribe(
        &app,
        json!({"subscription_id": "rotating", "event_types": ["rot.>"], "callback_url": hooks.url("r")}),
    )
    .await;
    let old = created["webhook_secret"].as_str().unwrap().to_owned();
    settle().await;
    let signatures = |received: &Received| received.headers["webhook-signature"].to_str().unwrap().split(' ').count();

    app.create(json!({"event_type": "rot.before"})).await;
    let before = wait_for_received(&hooks, 1).await.remove(0);
    assert_eq!((signatures(&before), verify(&old, &before)), (1, true));

    // Bad requests change nothing.
    let rotate = "/api/v1/events/subscriptions/rotating/secret/rotate";
    let (status, answer) = app.post(rotate, &json!({"overlap_seconds": -1})).await;
    assert_eq!(
        (status, answer["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("overlap_seconds"))
    );
    let (status, _) = app.post(rotate, &json!({"webhook_secret": "short"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post("/api/v1/events/subscriptions/nobody/secret/rotate", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, rotated) = app.post(rotate, &json!({"overlap_seconds": 3})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["webhook_secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    assert!(rotated["previous_secret_expires_at"].is_string());
    let (_, shown) = app.get("/api/v1/events/subscriptions/rotating/secret").await;
    assert_eq!(shown["webhook_secret"], new.as_str());
    settle().await;

    // During the overlap: both signatures, so a receiver holding either secret verifies.
    app.create(json!({"event_type": "rot.during"})).await;
    let during = wait_for_received(&hooks, 2).await.remove(1);
    assert_eq!(signatures(&during), 2);
    assert!(verify(&new, &during) && verify(&old, &during));

    // After it: the new secret alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.create(json!({"event_type": "rot.after"})).await;
    let after = wait_for_received(&hooks, 3).await.remove(2);
    assert_eq!(signatures(&after), 1);
    assert!(verify(&new, &after) && !verify(&old, &after));

    // A rotation without a body uses the default overlap (a day).
    let response = app.http.post(app.url(rotate)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(answer["previous_secret_expires_at"].as_str().unwrap()).unwrap();
    let hours = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((23.9..=24.0).contains(&hours), "{hours}");
}

/// The dispatcher consumer's filter and how many events it has been given.
async fn dispatcher_consumer(app: &TestApp) -> (String, u64) {
    let events = app.js.get_stream("EVENTS").await.unwrap();
    let info = events.consumer_info("dispatcher").await.unwrap();
    (info.config.filter_subject.clone(), info.delivered.consumer_sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_takes_no_events_while_no_subscription_can_take_one() {
    let app = app_with_dispatcher().await;
    let hooks = Receiver::start().await;
    let idle = wait_until(Duration::from_secs(10), || async {
        let consumer = dispatcher_consumer(&app).await;
        (consumer.0 == "events._none").then_some(consumer)
    })
    .await
    .expect("with no subscription the dispatcher consumer idles");
    // A process that starts applies the topology; an idle consumer stays idle.
    app.apply_topology().await;
    assert_eq!(dispatcher_consumer(&app).await, idle, "a restart does not reopen the consumer");
    let batch: Vec<Value> = (0..5).map(|_| json!({"event_type": "quiet.time"})).collect();
    assert_eq!(app.post("/api/v1/events/batch", &Value::Array(batch)).await.0, StatusCode::OK);

    // A disabled subscription delivers nothing, so the consumer still takes nothing.
    let sub = subscribe(
        &app,
        json!({"subscription_id": "late", "event_types": ["quiet.>"], "callback_url": hooks.url("late"), "enabled": false}),
    )
    .await;
    assert_eq!(dispatcher_consumer(&app).await, idle, "nothing was handed to the dispatcher");

    // Enabled, it takes events again by the time the answer comes.
    let url = app.url(&format!("/api/v1/events/subscriptions/{}", sub["subscription_id"].as_str().unwrap()));
    let enabled = app.http.patch(&url).json(&json!({"enabled": true})).send().await.unwrap();
    assert_eq!(enabled.status(), StatusCode::OK);
    assert_eq!(dispatcher_consumer(&app).await.0, "events.>");
    settle().await;
    let event_id = app.create(json!({"event_type": "quiet.again"})).await;
    let received = wait_for_received(&hooks, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hooks.received().len(), 1, "events accepted while nobody subscribed are not delivered later");
    assert_eq!(received[0].body["event_id"], event_id.as_str());

    // Deleted, the consumer idles again as the answer comes, and what follows is not handed over.
    assert_eq!(app.http.delete(&url).send().await.unwrap().status(), StatusCode::OK);
    let (filter, handed) = dispatcher_consumer(&app).await;
    assert_eq!(filter, "events._none");
    app.create(json!({"event_type": "quiet.end"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dispatcher_consumer(&app).await, ("events._none".to_owned(), handed));
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("event_consumer_takes_events{stream=\"EVENTS\",consumer=\"dispatcher\"} 0"), "{text}");

    // Disabled behind the gateway's back (as the sender does after a 410): the dispatcher
    // idles the consumer when it reloads.
    subscribe(&app, json!({"subscription_id": "other", "event_types": ["x"], "callback_url": hooks.url("x")})).await;
    assert_eq!(dispatcher_consumer(&app).await.0, "events.>");
    sqlx::query("UPDATE event.event_subscriptions SET enabled = false").execute(&app.pool).await.unwrap();
    app.bus_client().publish("_EVSVC.subscriptions.changed", "".into()).await.unwrap();
    wait_until(Duration::from_secs(5), || async {
        (dispatcher_consumer(&app).await.0 == "events._none").then_some(())
    })
    .await
    .expect("the dispatcher idles its consumer after reloading");
}
