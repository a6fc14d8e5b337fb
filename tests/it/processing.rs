//! Processors: the registry endpoints, and the processor stage against real webhooks, NATS
//! services and streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, TestApp, spawn_app, spawn_app_with, wait_until};
use crate::receiver::Receiver;

/// Registers a processor and gives the workers the moment they need to load it (they reload
/// on a notification; "within a second" is the promise).
async fn register(app: &TestApp, body: Value) -> Value {
    let (status, processor) = app.post("/api/v1/events/processors", &body).await;
    assert_eq!(status, StatusCode::OK, "{processor}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    processor
}

async fn results(app: &TestApp, event_id: &str) -> Vec<(String, i32, String)> {
    sqlx::query_as(
        "SELECT processor_name, attempt, status FROM event.processing_results \
         WHERE event_id = $1::uuid AND run_id = '' ORDER BY result_id",
    )
    .bind(event_id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_are_registered_listed_toggled_and_deleted() {
    let app = spawn_app().await;
    let (status, answer) = app.post("/api/v1/events/processors", &json!({"config": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = answer["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["processor_name", "processor_type"]);
    let (status, answer) =
        app.post("/api/v1/events/processors", &json!({"processor_name": "hook", "processor_type": "webhook"})).await;
    assert_eq!((status, answer["errors"][0]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("config.url")));

    let created = register(
        &app,
        json!({"processor_name": "crm_sync", "processor_type": "webhook", "priority": 5,
               "config": {"url": "https://crm.example.com/hook"}, "filters": {"event_type": "user.*"}}),
    )
    .await;
    assert_eq!(created["enabled"], true);
    assert_eq!(created["error_count"], 0);
    assert_eq!(created["last_error"], Value::Null);
    assert_eq!(created["last_processed_at"], Value::Null);
    assert_eq!(created["max_retries"], 3);
    assert_eq!(created["filters"], json!({"event_type": "user.*"}));
    let id = created["processor_id"].as_str().unwrap().to_owned();
    register(&app, json!({"processor_id": "scorer-1", "processor_name": "scorer", "processor_type": "internal"})).await;

    let (status, again) =
        app.post("/api/v1/events/processors", &json!({"processor_name": "crm_sync", "processor_type": "nats"})).await;
    assert_eq!((status, again["code"].as_str()), (StatusCode::CONFLICT, Some("duplicate_processor_name")));

    let (_, listed) = app.get("/api/v1/events/processors").await;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|p| p["processor_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["crm_sync", "scorer"], "highest priority first");
    let (status, one) = app.get(&format!("/api/v1/events/processors/{id}")).await;
    assert_eq!((status, one["processor_name"].as_str()), (StatusCode::OK, Some("crm_sync")));

    let toggle = |query: &str| app.http.put(app.url(&format!("/api/v1/events/processors/{id}/toggle{query}"))).send();
    let answer: Value = toggle("?enabled=false").await.unwrap().json().await.unwrap();
    assert_eq!(answer, json!({"status": "updated", "processor_id": id, "enabled": false}));
    assert_eq!(toggle("").await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(toggle("?enabled=maybe").await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    let missing = app.http.put(app.url("/api/v1/events/processors/nope/toggle?enabled=true")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let deleted = app.http.delete(app.url(&format!("/api/v1/events/processors/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    let deleted = app.http.delete(app.url(&format!("/api/v1/events/processors/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.get(&format!("/api/v1/events/processors/{id}")).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_run_by_priority_and_a_failure_blocks_no_one() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let hooks = Receiver::start().await;
    for (name, priority, path, retries) in
        [("low", 1, "ok/low", 3), ("high", 10, "ok/high", 3), ("broken", 5, "fail", 1)]
    {
        register(
            &app,
            json!({"processor_name": name, "processor_type": "webhook", "priority": priority, "max_retries": retries,
                   "config": {"url": hooks.url(path), "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
        )
        .await;
    }
    let mut failed_events = app.bus_client().subscribe("event.processed.failed").await.unwrap();
    let id = app.create(json!({"event_type": "order.placed", "user_id": "buyer"})).await;
    let event = app.wait_for_status(&id, &["failed"]).await;

    // First attempt in priority order, then only the broken one is retried.
    assert_eq!(hooks.paths_for(&id), ["ok/high", "fail", "ok/low", "fail"]);
    assert_eq!(
        results(&app, &id).await,
        [
            ("high".into(), 1, "success".into()),
            ("broken".into(), 1, "retry".into()),
            ("low".into(), 1, "success".into()),
            ("broken".into(), 2, "failed".into()),
        ]
    );
    assert_eq!(event["processors"], json!(["high", "low"]));
    assert_eq!(event["retry_count"], 1);
    assert!(event["error_message"].as_str().unwrap().starts_with("broken: HTTP 500"), "{event}");
    assert!(event["processed_at"].is_string());

    // The failure is announced and the event dead-lettered with the reason.
    let announced = tokio::time::timeout(Duration::from_secs(5), failed_events.next()).await.unwrap().unwrap();
    let announced: Value = serde_json::from_slice(&announced.payload).unwrap();
    assert_eq!(
        (announced["event_id"].as_str(), announced["processor_name"].as_str()),
        (Some(id.as_str()), Some("broken"))
    );
    assert_eq!(announced["retry_count"], 1);
    let letters = app.wait_for_dead_letters(1).await;
    let letter = letters.iter().find(|l| l.subject.as_str() == "deadletter.processor").expect("processor dead letter");
    assert_eq!(letter.headers.get("Event-Service-Reason-Code").map(|v| v.as_str()), Some("processor_failed"));

    // Deliveries are Standard-Webhooks-signed.
    let delivery = hooks.received().into_iter().find(|r| r.path == "ok/high").unwrap();
    let headers = |name: &str| delivery.headers.get(name).unwrap().to_str().unwrap().to_owned();
    let expected = event_service::infra::callback::sign(
        &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        &headers("webhook-id"),
        headers("webhook-timestamp").parse().unwrap(),
        &delivery.raw,
    );
    assert_eq!(headers("webhook-signature"), expected[2].1);
    assert_eq!(delivery.body["event_type"], "order.placed");

    // Counters and statistics follow.
    let (_, broken) = app.get("/api/v1/events/processors").await;
    let broken = broken.as_array().unwrap().iter().find(|p| p["processor_name"] == "broken").unwrap().clone();
    assert_eq!(broken["error_count"], 2);
    assert!(broken["last_error"].as_str().unwrap().starts_with("HTTP 500"));
    assert!(broken["last_processed_at"].is_string());
    let (_, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!((stats["failed_events"].as_i64(), stats["pending_events"].as_i64()), (Some(1), Some(0)), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_processor_is_retried_until_it_succeeds() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let hooks =
        Receiver::scripted(
            |path, call| {
                if path == "flaky" && call <= 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
            },
        )
        .await;
    register(
        &app,
        json!({"processor_name": "steady", "processor_type": "webhook", "priority": 2,
                          "config": {"url": hooks.url("steady")}}),
    )
    .await;
    register(
        &app,
        json!({"processor_name": "flaky", "processor_type": "webhook", "priority": 1,
                          "config": {"url": hooks.url("flaky")}}),
    )
    .await;
    let id = app.create(json!({"event_type": "invoice.sent", "user_id": "billing"})).await;
    let event = app.wait_for_status(&id, &["processed"]).await;
    assert_eq!(hooks.paths_for(&id), ["steady", "flaky", "flaky", "flaky"], "only the failed processor re-runs");
    assert_eq!(
        results(&app, &id).await,
        [
            ("steady".into(), 1, "success".into()),
            ("flaky".into(), 1, "retry".into()),
            ("flaky".into(), 2, "retry".into()),
            ("flaky".into(), 3, "success".into()),
        ]
    );
    assert_eq!(event["processors"], json!(["steady", "flaky"]));
    assert_eq!(event["retry_count"], 2);
    assert_eq!(event["error_message"], Value::Null);
    let (_, stats) = app.get("/api/v1/events/statistics?user_id=billing").await;
    assert_eq!(stats["processed_events"], 1);
    assert!(stats["average_processing_time"].as_f64().unwrap() > 0.0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_processors_toggle_off_within_a_second_and_wildcards_filter() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    // A processor written as a NATS service: it answers requests on processors.{name}.
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = app.bus_client().subscribe("processors.scorer").await.unwrap();
    let (client, counter) = (app.bus_client().clone(), calls.clone());
    tokio::spawn(async move {
        while let Some(request) = service.next().await {
            counter.fetch_add(1, Ordering::SeqCst);
            if let Some(reply) = request.reply {
                client.publish(reply, "scored".into()).await.unwrap();
            }
        }
    });
    let scorer = register(
        &app,
        json!({"processor_name": "scorer", "processor_type": "nats", "filters": {"event_type": "user.*"}}),
    )
    .await;
    register(
        &app,
        json!({"processor_name": "orders", "processor_type": "internal", "config": {"subject": "svc.orders"},
               "filters": {"event_type": "order.>", "event_source": "frontend"}}),
    )
    .await;
    let mut orders = app.bus_client().subscribe("svc.orders").await.unwrap();
    let client = app.bus_client().clone();
    tokio::spawn(async move {
        while let Some(request) = orders.next().await {
            if let Some(reply) = request.reply {
                client.publish(reply, "ok".into()).await.unwrap();
            }
        }
    });

    let user = app.create(json!({"event_type": "user.registered"})).await;
    let nested = app.create(json!({"event_type": "user.registered.v2"})).await;
    let order_backend = app.create(json!({"event_type": "order.placed.eu"})).await;
    let (_, order) = app.post("/api/v1/events/frontend", &json!({"event_type": "order.placed.eu"})).await;
    let order_frontend = order["event_id"].as_str().unwrap().to_owned();
    for (id, expected) in [
        (&user, json!(["scorer"])),
        (&nested, json!([])),
        (&order_backend, json!([])),
        (&order_frontend, json!(["orders"])),
    ] {
        let event = app.wait_for_status(id, &["processed"]).await;
        assert_eq!(event["processors"], expected, "{}", event["event_type"]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Off: the next matching event is processed with no processor, without a restart.
    let id = scorer["processor_id"].as_str().unwrap();
    let toggled = app.http.put(app.url(&format!("/api/v1/events/processors/{id}/toggle?enabled=false"))).send();
    assert_eq!(toggled.await.unwrap().status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = app.create(json!({"event_type": "user.updated"})).await;
    let event = app.wait_for_status(&later, &["processed"]).await;
    assert_eq!(event["processors"], json!([]));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a disabled processor is not called");

    // A NATS processor nobody serves fails with a clear reason.
    register(
        &app,
        json!({"processor_name": "ghost", "processor_type": "nats", "max_retries": 0,
                          "filters": {"event_type": "ghost.call"}}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ghost = app.create(json!({"event_type": "ghost.call"})).await;
    let event = app.wait_for_status(&ghost, &["failed"]).await;
    assert_eq!(event["error_message"], "ghost: no responders on processors.ghost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_processors_republish_with_puback_and_two_workers_never_double_complete() {
    let mut app = spawn_app_with(Options { processors: 2, ..Options::default() }).await;
    app.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ANALYTICS".into(),
            subjects: vec!["analytics.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    register(
        &app,
        json!({"processor_name": "fanout", "processor_type": "publish",
               "config": {"subject": "analytics.{source}.{event_type}"}}),
    )
    .await;
    let hooks = Receiver::start().await;
    register(
        &app,
        json!({"processor_name": "audit", "processor_type": "webhook", "config": {"url": hooks.url("audit")}}),
    )
    .await;
    let events: Vec<Value> =
        (0..300).map(|i| json!({"event_type": format!("metric.tick"), "user_id": format!("u{}", i % 7)})).collect();
    for chunk in events.chunks(100) {
        let (status, _) = app.post("/api/v1/events/batch", &Value::Array(chunk.to_vec())).await;
        assert_eq!(status, StatusCode::OK);
    }
    let pool = app.pool.clone();
    wait_until(Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM event.events WHERE status = 'processed'")
                .fetch_one(&pool)
                .await
                .unwrap();
            (done == 300).then_some(())
        }
    })
    .await
    .expect("300 events processed");
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT event_id, processor_name FROM event.processing_results \
         WHERE status = 'success' GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0);
    assert_eq!(hooks.received().len(), 300, "each event delivered once");
    let info = app.js.get_stream("ANALYTICS").await.unwrap().get_info().await.unwrap();
    assert_eq!(info.state.messages, 300);
    let analytics = app.js.get_stream("ANALYTICS").await.unwrap();
    let stored = analytics.get_last_raw_message_by_subject("analytics.backend.metric.tick").await.unwrap();
    let stored: Value = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(stored["event_type"], "metric.tick");
    let (_, stats) = app.get("/api/v1/events/statistics").await;
    assert_eq!((stats["processed_events"].as_i64(), stats["pending_events"].as_i64()), (Some(300), Some(0)));
    app.stop_processors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_write_waits_for_the_persister() {
    let mut app =
        spawn_app_with(Options { processors: 1, start_persister: false, store_timeout_ms: 200, ..Options::default() })
            .await;
    let hooks = Receiver::start().await;
    register(
        &app,
        json!({"processor_name": "early", "processor_type": "webhook", "config": {"url": hooks.url("early")},
               "filters": {"event_type": "early.bird"}}),
    )
    .await;
    register(
        &app,
        json!({"processor_name": "doomed", "processor_type": "webhook", "config": {"url": hooks.url("fail")},
               "max_retries": 0, "filters": {"event_type": "early.doomed"}}),
    )
    .await;
    let (status, created) = app.post("/api/v1/events/create", &json!({"event_type": "early.bird"})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = created["event_id"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(5), || async { (!hooks.received().is_empty()).then_some(()) }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.start_persister().await;
    let event = app.wait_for_status(&id, &["processed"]).await;
    assert_eq!(event["processors"], json!(["early"]));
    assert_eq!(hooks.paths_for(&id), ["early"], "the processor ran once; only the status write waited");

    // A processor that failed for good before the row existed still names its error.
    app.stop_persister().await;
    let (_, created) = app.post("/api/v1/events/create", &json!({"event_type": "early.doomed"})).await;
    let doomed = created["event_id"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(5), || async { (!hooks.paths_for(&doomed).is_empty()).then_some(()) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.start_persister().await;
    let event = app.wait_for_status(&doomed, &["failed"]).await;
    assert!(event["error_message"].as_str().unwrap().starts_with("doomed: HTTP 500"), "{event}");
    assert_eq!(hooks.paths_for(&doomed), ["fail"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_processors_show_their_events_as_processing() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let hooks = Receiver::start().await;
    register(
        &app,
        json!({"processor_name": "slowpoke", "processor_type": "webhook", "config": {"url": hooks.url("slow")}}),
    )
    .await;
    let id = app.create(json!({"event_type": "report.requested", "user_id": "analyst"})).await;
    app.wait_for_status(&id, &["processing"]).await;
    let (_, stats) = app.get("/api/v1/events/statistics?user_id=analyst").await;
    assert_eq!((stats["processing_events"].as_i64(), stats["pending_events"].as_i64()), (Some(1), Some(0)));
    app.wait_for_status(&id, &["processed"]).await;
    let (_, stats) = app.get("/api/v1/events/statistics?user_id=analyst").await;
    assert_eq!((stats["processing_events"].as_i64(), stats["processed_events"].as_i64()), (Some(0), Some(1)));
}

/// Registers `orders`, an internal processor of `order.*` events answered "ok" by a service
/// on `processors.orders`, without waiting for the workers to load it.
async fn orders_processor(app: &TestApp) -> Value {
    let mut requests = app.bus_client().subscribe("processors.orders").await.unwrap();
    let client = app.bus_client().clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                client.publish(reply, "ok".into()).await.unwrap();
            }
        }
    });
    let (status, processor) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "orders", "processor_type": "internal", "filters": {"event_type": "order.*"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{processor}");
    processor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_no_processor_takes_are_stored_processed_the_others_wait_for_the_processor_stage() {
    let mut app = spawn_app().await;
    let processor = orders_processor(&app).await;
    // The persister reloads the registry on the change notification: probe until it has.
    let probe = wait_until(Duration::from_secs(10), || async {
        let id = app.create(json!({"event_type": "order.probe"})).await;
        let (_, event) = app.get(&format!("/api/v1/events/{id}")).await;
        (event["status"] == "pending").then_some(id)
    })
    .await
    .expect("the persister sees the new processor");

    let taken = app.create(json!({"event_type": "order.placed", "user_id": "u1"})).await;
    let other = app.create(json!({"event_type": "page.viewed", "user_id": "u1"})).await;
    let (_, stored) = app.get(&format!("/api/v1/events/{taken}")).await;
    assert_eq!((stored["status"].as_str(), &stored["processed_at"]), (Some("pending"), &Value::Null));
    let (_, stored) = app.get(&format!("/api/v1/events/{other}")).await;
    assert_eq!((stored["status"].as_str(), stored["processors"].clone()), (Some("processed"), json!([])));
    assert!(stored["processed_at"].is_string());
    let (_, user) = app.get("/api/v1/events/statistics?user_id=u1").await;
    assert_eq!((user["pending_events"].as_i64(), user["processed_events"].as_i64()), (Some(1), Some(1)), "{user}");

    // The processor stage runs what takes the pending ones.
    app.start_processor().await;
    for id in [&probe, &taken] {
        let event = app.wait_for_status(id, &["processed"]).await;
        assert_eq!(event["processors"], json!(["orders"]));
    }
    app.stop_processors().await;

    // Stored pending for a processor that is disabled before the processor stage gets to the
    // event: the stage acks the message (nothing takes it), and its sweep marks the event
    // processed a few seconds later, counted in /metrics.
    let late = app.create(json!({"event_type": "order.cancelled", "user_id": "u1"})).await;
    assert_eq!(app.get(&format!("/api/v1/events/{late}")).await.1["status"], "pending");
    let id = processor["processor_id"].as_str().unwrap();
    let toggled = app.http.put(app.url(&format!("/api/v1/events/processors/{id}/toggle?enabled=false"))).send();
    assert!(toggled.await.unwrap().status().is_success());
    app.start_processor().await;
    let event = app.wait_for_status(&late, &["processed"]).await;
    assert_eq!(event["processors"], json!([]));
    assert_eq!(results(&app, &late).await, []);
    let (_, user) = app.get("/api/v1/events/statistics?user_id=u1").await;
    assert_eq!((user["pending_events"].as_i64(), user["processed_events"].as_i64()), (Some(0), Some(3)), "{user}");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let swept = metrics.lines().find_map(|line| line.strip_prefix("event_processor_swept_total "));
    assert_eq!(swept, Some("1"), "{metrics}");
}

/// The processor consumer's filter.
async fn processor_filter(app: &TestApp) -> String {
    let events = app.js.get_stream("EVENTS").await.unwrap();
    events.consumer_info("processor").await.unwrap().config.filter_subject.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_consumer_idles_without_processors_and_what_it_skipped_is_settled() {
    let mut app = spawn_app().await;
    let processor = orders_processor(&app).await;
    assert_eq!(processor_filter(&app).await, "events.>");
    let pending = || async {
        let id = app.create(json!({"event_type": "order.probe"})).await;
        (app.get(&format!("/api/v1/events/{id}")).await.1["status"] == "pending").then_some(id)
    };
    let before = wait_until(Duration::from_secs(10), pending).await.expect("the persister sees the processor");

    // Disabled before any worker ran: the consumer idles at the stream's head, past `before`.
    let toggle = |enabled: bool| {
        let id = processor["processor_id"].as_str().unwrap();
        app.http.put(app.url(&format!("/api/v1/events/processors/{id}/toggle?enabled={enabled}"))).send()
    };
    assert!(toggle(false).await.unwrap().status().is_success());
    assert_eq!(processor_filter(&app).await, "events._none");
    // Enabled again before the sweep got to `before`: the processor takes it, but the consumer
    // will never hand it over.
    assert!(toggle(true).await.unwrap().status().is_success());
    assert_eq!(processor_filter(&app).await, "events.>");
    let after = wait_until(Duration::from_secs(10), pending).await.expect("the persister sees it enabled");

    app.start_processor().await;
    let event = app.wait_for_status(&after, &["processed"]).await;
    assert_eq!(event["processors"], json!(["orders"]));
    let event = app.wait_for_status(&before, &["processed"]).await;
    assert_eq!(event["processors"], json!([]), "settled by the sweep, not run");
    assert_eq!(results(&app, &before).await, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_processors_follow_the_one_callback_rule() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let hooks = Receiver::scripted(|path, _| match path {
        "rejects" => StatusCode::BAD_REQUEST,
        "gone" => StatusCode::GONE,
        _ => StatusCode::OK,
    })
    .await;
    for (name, path) in [("rejecter", "rejects"), ("vanished", "gone")] {
        register(
            &app,
            json!({"processor_name": name, "processor_type": "webhook", "max_retries": 3,
                   "config": {"url": hooks.url(path)}, "filters": {"event_type": format!("{name}.*")}}),
        )
        .await;
    }
    // A 400 is not retried, however many retries the processor has left.
    let rejected = app.create(json!({"event_type": "rejecter.call", "user_id": "u"})).await;
    let event = app.wait_for_status(&rejected, &["failed"]).await;
    assert_eq!(hooks.paths_for(&rejected), ["rejects"]);
    assert_eq!(results(&app, &rejected).await, [("rejecter".into(), 1, "failed".into())]);
    assert!(event["error_message"].as_str().unwrap().starts_with("rejecter: HTTP 400"), "{event}");

    // A 410 fails at once and disables the processor, which then takes nothing more.
    let gone = app.create(json!({"event_type": "vanished.call", "user_id": "u"})).await;
    app.wait_for_status(&gone, &["failed"]).await;
    assert_eq!(hooks.paths_for(&gone), ["gone"]);
    let disabled = wait_until(Duration::from_secs(5), || async {
        let (_, list) = app.get("/api/v1/events/processors").await;
        let processor = list.as_array()?.iter().find(|p| p["processor_name"] == "vanished")?.clone();
        (processor["enabled"] == false).then_some(processor)
    })
    .await
    .expect("the processor is disabled");
    assert!(disabled["last_error"].as_str().unwrap().contains("410"), "{disabled}");
    // Workers see a registry change within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = app.create(json!({"event_type": "vanished.call", "user_id": "u"})).await;
    app.wait_for_status(&later, &["processed"]).await;
    assert!(hooks.paths_for(&later).is_empty(), "a disabled processor is not called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_follow_one_rule_everywhere() {
    let app = spawn_app().await;
    let empty_token = "user..created";
    let (status, processor) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "p", "processor_type": "nats", "filters": {"event_type": empty_token}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{processor}");
    assert_eq!(processor["errors"][0]["field"], "filters.event_type");
    let (status, subscription) = app
        .post(
            "/api/v1/events/subscriptions",
            &json!({"event_types": [empty_token], "callback_url": "https://x.example/h"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{subscription}");
    assert_eq!(subscription["errors"][0]["field"], "event_types");
    let (status, definition) = app
        .post(
            "/api/v1/events/projections/definitions",
            &json!({"name": "d", "entity_type": "order", "event_types": [empty_token]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{definition}");
    assert_eq!(definition["errors"][0]["field"], "event_types");
}
