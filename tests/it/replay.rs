//! Replays: selection by ids, stream and time range, dry runs, republishing for a target
//! service, and jobs that wait in JetStream for a worker.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, TestApp, spawn_app_with, wait_until};
use crate::receiver::Receiver;

async fn wait_for_job(app: &TestApp, replay_id: &str) -> Value {
    let path = format!("/api/v1/events/replay/{replay_id}");
    wait_until(Duration::from_secs(15), || async {
        let (status, job) = app.get(&path).await;
        (status == StatusCode::OK && job["status"] == "completed").then_some(job)
    })
    .await
    .unwrap_or_else(|| panic!("replay {replay_id} did not complete"))
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_select_by_ids_stream_and_time_and_keep_the_originals() {
    let app = spawn_app_with(Options { processors: 1, ..Options::default() }).await;
    let hooks = Receiver::start().await;
    let (status, _) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "rehook", "processor_type": "webhook",
                                                   "config": {"url": hooks.url("rehook")}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut ids = Vec::new();
    for (i, user) in ["ann", "bob", "ann", "bob", "ann"].iter().enumerate() {
        let id = app
            .create(json!({"event_type": "profile.changed", "user_id": user,
                           "timestamp": format!("2025-03-0{}T10:00:00Z", i + 1)}))
            .await;
        app.wait_for_status(&id, &["processed"]).await;
        ids.push(id);
    }
    let live_results = count(&app, "SELECT count(*) FROM event.processing_results").await;
    assert_eq!(live_results, 5);

    // Dry run: counts and lists, changes nothing.
    let (status, dry) =
        app.post("/api/v1/events/replay", &json!({"stream_id": "user:ann", "dry_run": true, "limit": 2})).await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!((dry["status"].as_str(), dry["dry_run"].as_bool()), (Some("replay_started"), Some(true)));
    assert_eq!(dry["events_count"], 3);
    assert_eq!(dry["event_ids"], json!([ids[0], ids[2]]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&app, "SELECT count(*) FROM event.processing_results").await, live_results);
    assert_eq!(count(&app, "SELECT count(*) FROM event.replay_jobs").await, 0);
    assert_eq!(hooks.received().len(), 5);

    // By ids.
    let (status, started) = app.post("/api/v1/events/replay", &json!({"event_ids": [ids[1]]})).await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!((started["events_count"].as_i64(), started["dry_run"].as_bool()), (Some(1), Some(false)));
    let job = wait_for_job(&app, started["replay_id"].as_str().unwrap()).await;
    assert_eq!(
        (job["replayed"].as_i64(), job["failed"].as_i64(), job["progress"].as_f64()),
        (Some(1), Some(0), Some(1.0))
    );
    let replay_rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id::text, run_id FROM event.processing_results WHERE run_id <> '' ORDER BY result_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(replay_rows, [(ids[1].clone(), started["replay_id"].as_str().unwrap().to_owned())]);
    assert_eq!(
        count(&app, "SELECT count(*) FROM event.processing_results WHERE run_id = ''").await,
        5,
        "originals kept"
    );

    // By stream: in stream order.
    let (_, started) = app.post("/api/v1/events/replay", &json!({"stream_id": "user:ann"})).await;
    wait_for_job(&app, started["replay_id"].as_str().unwrap()).await;
    let replayed: Vec<String> =
        hooks.received()[6..].iter().map(|r| r.body["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(replayed, [ids[0].clone(), ids[2].clone(), ids[4].clone()]);

    // By time range, republished for a target service.
    let mut target = app.bus_client().subscribe("replay.billing.>").await.unwrap();
    let mut completed = app.bus_client().subscribe("event.replay.completed").await.unwrap();
    let (_, started) = app
        .post(
            "/api/v1/events/replay",
            &json!({"start_time": "2025-03-02T00:00:00Z", "end_time": "2025-03-03T23:00:00Z", "target_service": "billing"}),
        )
        .await;
    assert_eq!(started["events_count"], 2);
    let job = wait_for_job(&app, started["replay_id"].as_str().unwrap()).await;
    assert_eq!(job["replayed"], 2);
    let mut republished = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), target.next()).await.unwrap().unwrap();
        assert_eq!(message.subject.as_str(), "replay.billing.backend.user_action.profile.changed");
        let body: Value = serde_json::from_slice(&message.payload).unwrap();
        republished.push(body["event_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(republished, [ids[1].clone(), ids[2].clone()]);
    let done = tokio::time::timeout(Duration::from_secs(5), completed.next()).await.unwrap().unwrap();
    let done: Value = serde_json::from_slice(&done.payload).unwrap();
    assert_eq!((done["replayed"].as_i64(), done["failed"].as_i64()), (Some(2), Some(0)));
    let stream = app.js.get_stream("EVENT_SERVICE").await.unwrap();
    assert!(stream.get_last_raw_message_by_subject("event.replay.started").await.is_ok());

    // Nothing selected is fine; no selector, half a range or unknown processors are not.
    let (status, empty) = app.post("/api/v1/events/replay", &json!({"stream_id": "user:nobody"})).await;
    assert_eq!((status, empty["events_count"].as_i64()), (StatusCode::OK, Some(0)));
    for (body, field) in [
        (json!({"dry_run": true}), "body"),
        (json!({"start_time": "2025-03-01T00:00:00Z"}), "end_time"),
        (json!({"start_time": "2025-03-02T00:00:00Z", "end_time": "2025-03-01T00:00:00Z"}), "end_time"),
        (json!({"stream_id": "user:ann", "processors": ["nope"]}), "processors"),
        (json!({"event_ids": ["not-a-uuid"]}), "event_ids"),
        (json!({"stream_id": "user:ann", "target_service": "bad target"}), "target_service"),
    ] {
        let (status, answer) = app.post("/api/v1/events/replay", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(answer["errors"][0]["field"], field, "{body}: {answer}");
    }
    assert_eq!(app.get(&format!("/api/v1/events/replay/{}", uuid::Uuid::now_v7())).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_job_waits_in_jetstream_for_a_worker_and_lifts_failed_events() {
    // No worker at first: the job is queued in JetStream, not in the gateway's memory.
    let mut app = spawn_app_with(Options::default()).await;
    let hooks = Receiver::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.create(json!({"event_type": "ledger.entry", "stream_id": "ledger:main", "data": {"i": i}})).await);
    }
    sqlx::query("UPDATE event.events SET status = 'failed' WHERE event_id = $1::uuid")
        .bind(&ids[0])
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, _) = app
        .post(
            "/api/v1/events/processors",
            &json!({"processor_name": "ledger", "processor_type": "webhook",
                                                   "filters": {"event_type": "ledger.*"},
                                                   "config": {"url": hooks.url("ledger")}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, started) =
        app.post("/api/v1/events/replay", &json!({"stream_id": "ledger:main", "processors": ["ledger"]})).await;
    let replay_id = started["replay_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, job) = app.get(&format!("/api/v1/events/replay/{replay_id}")).await;
    assert_eq!((job["status"].as_str(), job["progress"].as_f64()), (Some("queued"), Some(0.0)));

    app.start_processor().await;
    let job = wait_for_job(&app, &replay_id).await;
    assert_eq!((job["events_count"].as_i64(), job["replayed"].as_i64()), (Some(3), Some(3)));
    assert!(job["started_at"].is_string() && job["completed_at"].is_string());
    let (_, first) = app.get(&format!("/api/v1/events/{}", ids[0])).await;
    assert_eq!(first["status"], "processed", "a failed event whose processors now succeed is lifted");
    assert_eq!(first["processors"], json!(["ledger"]));
    app.stop_processors().await;
}
