//! Retention: expired days leave `event.events` by dropping whole partitions, with the rollups,
//! the id guard and the entity streams kept consistent; and the in-place conversion of a store
//! that already holds events.

use std::time::Duration;

use chrono::{Days, NaiveTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{Options, TestApp, fresh_database, spawn_app, spawn_app_with, wait_until};
use event_service::store::retention;

async fn partitions(pool: &PgPool) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT c.relname::text, c.relispartition FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'event' AND c.relkind = 'r' AND c.relname LIKE 'events\\_%' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every rollup says exactly what a count over the stored events says, and the id guard holds
/// exactly the stored ids, each with its row's `stored_at`.
async fn assert_consistent(pool: &PgPool) {
    let pairs = [
        (
            "SELECT day::text || '/' || event_source || '/' || event_category || '/' || event_type, events \
             FROM event.rollup_daily WHERE events <> 0 ORDER BY 1",
            "SELECT ((\"timestamp\" AT TIME ZONE 'UTC')::date)::text || '/' || event_source || '/' || event_category \
                 || '/' || event_type, count(*) FROM event.events GROUP BY 1 ORDER BY 1",
        ),
        (
            "SELECT user_id || '/' || day::text || '/' || event_type, events FROM event.rollup_user_daily \
             WHERE events <> 0 ORDER BY 1",
            "SELECT user_id || '/' || ((\"timestamp\" AT TIME ZONE 'UTC')::date)::text || '/' || event_type, count(*) \
             FROM event.events WHERE user_id IS NOT NULL GROUP BY 1 ORDER BY 1",
        ),
        (
            "SELECT status, events FROM event.rollup_status WHERE events <> 0 ORDER BY 1",
            "SELECT status, count(*) FROM event.events GROUP BY 1 ORDER BY 1",
        ),
        (
            "SELECT user_id || '/' || pending || '/' || processed, events FROM event.rollup_users \
             WHERE events <> 0 ORDER BY 1",
            "SELECT user_id || '/' || count(*) FILTER (WHERE status = 'pending') || '/' \
                 || count(*) FILTER (WHERE status = 'processed'), count(*) FROM event.events \
             WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY 1",
        ),
        (
            "SELECT event_id::text || '/' || stored_at::text, 1::bigint FROM event.event_ids ORDER BY 1",
            "SELECT event_id::text || '/' || stored_at::text, 1::bigint FROM event.events ORDER BY 1",
        ),
    ];
    for (rollup, truth) in pairs {
        let kept: Vec<(String, i64)> = sqlx::query_as(rollup).fetch_all(pool).await.unwrap();
        let counted: Vec<(String, i64)> = sqlx::query_as(truth).fetch_all(pool).await.unwrap();
        assert_eq!(kept, counted, "{rollup}");
    }
}

async fn stream_versions(app: &TestApp, stream_id: &str) -> Vec<i64> {
    let (status, body) = app.get(&format!("/api/v1/events/stream/{stream_id}")).await;
    assert!(status.is_success(), "{status} {body}");
    body["events"].as_array().unwrap().iter().map(|event| event["stream_version"].as_i64().unwrap()).collect()
}

async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

fn event(i: usize, stream: Option<&str>) -> Value {
    let mut body = json!({"event_type": "retention.test", "user_id": format!("u{}", i % 2), "data": {"i": i}});
    if let Some(stream) = stream {
        body["stream_id"] = json!(stream);
    }
    body
}

#[tokio::test]
async fn expired_days_leave_as_whole_partitions_with_their_counts_and_ids() {
    let mut app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(app.create(event(i, (2..5).contains(&i).then_some("account:7"))).await);
    }
    // The first four were stored 40 days ago, in that day's partition.
    let (old, kept) = ids.split_at(4);
    let old: Vec<Uuid> = old.iter().map(|id| id.parse().unwrap()).collect();
    age(&app.pool, &old, 40).await;
    let name = format!("events_p{}", (Utc::now().date_naive() - Days::new(40)).format("%Y%m%d"));
    let (_, before) = app.get("/api/v1/events/statistics").await;
    assert_eq!(before["total_events"], 6, "{before}");
    // What happened to events is logged; those logs leave by time with the same retention.
    for (at, attempt) in [("now() - interval '40 days'", 1), ("now()", 2)] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO event.processing_results (event_id, processor_id, processor_name, attempt, status, processed_at) \
             VALUES ($1, 'p', 'p', {attempt}, 'success', {at})"
        )))
        .bind(old[0])
        .execute(&app.pool)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO event.delivery_attempts (subscription_id, event_id, webhook_id, attempt, status, attempted_at) \
             VALUES ('s', $1, 'w', {attempt}, 'delivered', {at})"
        )))
        .bind(old[0])
        .execute(&app.pool)
        .await
        .unwrap();
    }

    // A persister with a 30-day retention drops that day when it starts.
    app.stop_persister().await;
    app.retention_days = Some(30);
    app.start_persister().await;
    let pool = app.pool.clone();
    let gone = name.clone();
    wait_until(Duration::from_secs(20), || {
        let pool = pool.clone();
        let gone = gone.clone();
        async move { (!partitions(&pool).await.iter().any(|(name, _)| *name == gone)).then_some(()) }
    })
    .await
    .expect("the expired partition is dropped");

    assert_eq!(app.count_events().await, 2);
    for id in &old {
        assert_eq!(app.get(&format!("/api/v1/events/{id}")).await.0, 404);
    }
    for id in kept {
        assert_eq!(app.get(&format!("/api/v1/events/{id}")).await.0, 200);
    }
    assert_consistent(&app.pool).await;
    let (_, after) = app.get("/api/v1/events/statistics").await;
    assert_eq!(after["total_events"], 2, "{after}");
    assert_eq!(metric(&app, "event_retention_partitions_dropped_total").await, 1.0);
    assert_eq!(metric(&app, "event_retention_events_dropped_total").await, 4.0);
    let logs: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM event.processing_results), (SELECT count(*) FROM event.delivery_attempts)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(logs, (1, 1), "the logs of 40 days ago are gone, today's stay");

    // The stream lost versions 1 and 2 and goes on numbering after 3.
    assert_eq!(stream_versions(&app, "account:7").await, [3]);
    app.create(event(9, Some("account:7"))).await;
    assert_eq!(stream_versions(&app, "account:7").await, [3, 4]);

    // Idempotency is exact for what is retained: sending a retained event again stores
    // nothing. An id whose event has left is free again (sent over NATS with a message id of
    // its own: JetStream's two-minute duplicate window still remembers the first publish).
    let mut again = event(4, None);
    again["event_id"] = json!(kept[0]);
    app.create(again).await;
    let mut returning = event(0, None);
    returning["event_id"] = json!(old[0]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "returning-0");
    app.publish("events.backend.user_action.retention.test", headers, returning.to_string().into_bytes()).await;
    assert_eq!(app.wait_for_events(4, Duration::from_secs(10)).await, 4);
    assert_eq!(app.get(&format!("/api/v1/events/{}", old[0])).await.0, 200);
    assert_consistent(&app.pool).await;
    // The day partitions ahead are ready.
    let today = format!("events_p{}", Utc::now().date_naive().format("%Y%m%d"));
    let ahead = format!("events_p{}", (Utc::now().date_naive() + Days::new(2)).format("%Y%m%d"));
    let names: Vec<String> = partitions(&app.pool).await.into_iter().map(|(name, _)| name).collect();
    assert!(names.contains(&today) && names.contains(&ahead), "{names:?}");
}

/// The store as the migrations before 0010 left it, with three events and their rollups.
async fn store_before_partitioning() -> (String, Vec<Uuid>) {
    let url = fresh_database().await;
    let pool = PgPool::connect(&url).await.unwrap();
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.migrations = migrator.migrations.iter().filter(|m| m.version <= 9).cloned().collect::<Vec<_>>().into();
    migrator.run(&pool).await.unwrap();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids.iter().enumerate() {
        let stream = (i < 2).then_some("order:1");
        sqlx::query(
            "INSERT INTO event.events (event_id, event_type, event_source, event_category, user_id, data, status, \
                 stream_id, stream_version, stream_seq, subject, \"timestamp\", created_at, stored_at) \
             VALUES ($1, 'order.placed', 'backend', 'user_action', 'u1', $2, 'processed', $3, $4, $5, \
                 'events.backend.user_action.order.placed', now() - interval '3 days', now() - interval '3 days', \
                 now() - interval '3 days')",
        )
        .bind(id)
        .bind(json!({"i": i}))
        .bind(stream)
        .bind(stream.map(|_| i as i64 + 1))
        .bind(i as i64 + 1)
        .execute(&pool)
        .await
        .unwrap();
    }
    for statement in [
        "INSERT INTO event.event_streams (stream_id, stream_type, entity_type, entity_id, version) \
         VALUES ('order:1', 'order', 'order', '1', 2)",
        "INSERT INTO event.rollup_daily SELECT ((now() - interval '3 days') AT TIME ZONE 'UTC')::date, 'backend', \
         'user_action', 'order.placed', 3",
        "INSERT INTO event.rollup_user_daily SELECT 'u1', ((now() - interval '3 days') AT TIME ZONE 'UTC')::date, \
         'backend', 'user_action', 'order.placed', 3",
        "INSERT INTO event.rollup_status VALUES ('processed', 3)",
        "INSERT INTO event.rollup_users (user_id, events, processed) VALUES ('u1', 3, 3)",
        "INSERT INTO event.persister_position VALUES ('EVENTS', 0)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    pool.close().await;
    (url, ids)
}

#[tokio::test]
async fn a_store_with_events_converts_in_place_and_its_old_part_leaves_whole() {
    let (url, old) = store_before_partitioning().await;
    let app = spawn_app_with(Options { database_url: Some(url), ..Options::default() }).await;

    // The old table is the first partition, holding everything before tomorrow; days follow.
    let tomorrow = Utc::now().date_naive() + Days::new(1);
    let first = format!("events_to_{}", tomorrow.format("%Y%m%d"));
    let tables = partitions(&app.pool).await;
    assert!(tables.contains(&(first.clone(), true)), "{tables:?}");
    assert!(tables.contains(&(format!("events_p{}", tomorrow.format("%Y%m%d")), true)), "{tables:?}");
    assert_eq!(app.count_events().await, 3);
    assert_consistent(&app.pool).await;
    let (status, body) = app.get(&format!("/api/v1/events/{}", old[2])).await;
    assert_eq!((status.as_u16(), &body["data"]["i"]), (200, &json!(2)), "{body}");

    // Old ids stay taken; the stream goes on from its stored version.
    let mut again = json!({"event_type": "order.placed", "event_id": old[0], "stream_id": "order:1"});
    app.create(again.clone()).await;
    assert_eq!(app.count_events().await, 3);
    again["event_id"] = json!(Uuid::now_v7());
    app.create(again).await;
    assert_eq!(stream_versions(&app, "order:1").await, [1, 2, 3]);
    assert_consistent(&app.pool).await;

    // Two days on with a one-day retention, the old partition (and what was stored today in
    // it) leaves as a whole; the counts go with it.
    let later = Utc::now() + chrono::Duration::days(2);
    let report = retention::maintain(&app.pool, Some(chrono::Duration::days(1)), later).await.unwrap().unwrap();
    assert_eq!(report.dropped, [first]);
    assert_eq!(report.events_dropped, 4);
    assert_eq!(app.count_events().await, 0);
    assert_consistent(&app.pool).await;
    let rollup_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM event.rollup_daily) + (SELECT count(*) FROM event.rollup_user_daily) \
             + (SELECT count(*) FROM event.rollup_users)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(rollup_rows, 0, "counter rows at zero go");
    let version: i64 = sqlx::query_scalar("SELECT version FROM event.event_streams WHERE stream_id = 'order:1'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(version, 3, "a stream keeps its version");
}

#[tokio::test]
async fn a_day_without_its_partition_gets_one_and_nothing_is_lost() {
    let app = spawn_app().await;
    let today = format!("events_p{}", Utc::now().date_naive().format("%Y%m%d"));
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE event.{today}"))).execute(&app.pool).await.unwrap();
    let id = app.create(event(1, Some("account:1"))).await;
    assert_eq!(app.get(&format!("/api/v1/events/{id}")).await.0, 200);
    let names: Vec<String> = partitions(&app.pool).await.into_iter().map(|(name, _)| name).collect();
    assert!(names.contains(&today), "{names:?}");
    assert_consistent(&app.pool).await;
}

/// Moves the given events' rows `days` back, into that day's partition (created here).
async fn age(pool: &PgPool, ids: &[Uuid], days: u64) {
    let day = Utc::now().date_naive() - Days::new(days);
    let from = day.and_time(NaiveTime::MIN).and_utc();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS event.events_p{} PARTITION OF event.events FOR VALUES FROM ('{}') TO ('{}')",
        day.format("%Y%m%d"),
        from.to_rfc3339(),
        (from + chrono::Duration::days(1)).to_rfc3339()
    )))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE event.events SET stored_at = stored_at - interval '{days} days' WHERE event_id = ANY($1)"
    )))
    .bind(ids)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE event.event_ids SET stored_at = stored_at - interval '{days} days' WHERE event_id = ANY($1)"
    )))
    .bind(ids)
    .execute(pool)
    .await
    .unwrap();
}

/// Waits until the default projection of meter:m1 has folded its stream up to `version`.
async fn default_projection_reaches(pool: &PgPool, version: i64) {
    wait_until(Duration::from_secs(20), || async move {
        let folded: Option<i64> = sqlx::query_scalar(
            "SELECT stream_version FROM event.event_projections WHERE entity_type = 'meter' AND entity_id = 'm1' \
             AND projection_name = 'default'",
        )
        .fetch_optional(pool)
        .await
        .ok()?;
        (folded == Some(version)).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the default projection of meter:m1 reaches version {version}"));
}

#[tokio::test]
async fn projections_keep_their_state_and_refuse_to_guess_a_history_that_has_left() {
    let mut app = spawn_app().await;
    app.start_projector().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let id = app.create(json!({"event_type": "meter.read", "stream_id": "meter:m1", "data": {"n": i}})).await;
        ids.push(id.parse::<Uuid>().unwrap());
    }
    // The projector folds the stream (a snapshot at 10).
    default_projection_reaches(&app.pool, 12).await;
    let (_, now) = app.get("/api/v1/events/projections/meter/m1").await;

    // Versions 1 to 11 leave.
    age(&app.pool, &ids[..11], 40).await;
    let report = retention::maintain(&app.pool, Some(chrono::Duration::days(30)), Utc::now()).await.unwrap().unwrap();
    assert_eq!(report.events_dropped, 11);
    let (_, stream) = app.get("/api/v1/events/stream/meter:m1").await;
    assert_eq!((stream["first_version"].as_i64(), stream["version"].as_i64()), (Some(12), Some(12)), "{stream}");

    // The kept state is exact, and so is time travel back to a snapshot.
    let (status, kept) = app.get("/api/v1/events/projections/meter/m1").await;
    assert_eq!((status.as_u16(), &kept["state"]), (200, &now["state"]), "{kept}");
    let (status, at) = app.get("/api/v1/events/projections/meter/m1?as_of_version=10").await;
    assert_eq!((status.as_u16(), at["snapshot_version"].as_i64()), (200, Some(10)), "{at}");
    // Version 11 needs event 11, which has left.
    let (status, body) = app.get("/api/v1/events/projections/meter/m1?as_of_version=11").await;
    assert_eq!((status.as_u16(), body["code"].as_str()), (410, Some("history_expired")), "{body}");
    // A rebuild would fold only what is left: refused, for the entity and for the definition.
    let (status, body) = app.post("/api/v1/events/projections/meter/m1/rebuild", &json!({})).await;
    assert_eq!((status.as_u16(), body["code"].as_str()), (409, Some("history_expired")), "{body}");
    let (status, body) = app.post("/api/v1/events/projections/definitions/default/rebuild", &json!({})).await;
    assert_eq!((status.as_u16(), body["code"].as_str()), (409, Some("history_expired")), "{body}");
    let (_, still) = app.get("/api/v1/events/projections/meter/m1").await;
    assert_eq!(still["state"], now["state"]);

    // A definition that came after the early events left: the next live event moves the
    // default projection on, and does not start the new one from what is left.
    let (status, body) = app
        .post(
            "/api/v1/events/projections/definitions",
            &json!({"name": "meter_counts", "entity_type": "meter", "reducer": "counter"}),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    app.create(json!({"event_type": "meter.read", "stream_id": "meter:m1", "data": {"n": 12}})).await;
    default_projection_reaches(&app.pool, 13).await;
    let partial: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event.event_projections WHERE projection_name = 'meter_counts'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(partial, 0, "no projection folded from part of its history");
    let (status, body) = app.get("/api/v1/events/projections/meter/m1?name=meter_counts").await;
    assert_eq!((status.as_u16(), body["code"].as_str()), (410, Some("history_expired")), "{body}");
}

#[tokio::test]
async fn reads_by_id_find_events_in_every_day_they_were_stored() {
    use event_service::store::events;

    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(app.create(event(i, Some("account:9"))).await.parse::<Uuid>().unwrap());
    }
    // Three days hold them now: 5 days ago, 2 days ago and today.
    age(&app.pool, &ids[0..2], 5).await;
    age(&app.pool, &ids[2..4], 2).await;
    assert_consistent(&app.pool).await;

    for id in &ids {
        let (status, stored) = app.get(&format!("/api/v1/events/{id}")).await;
        assert_eq!(status, 200, "{stored}");
        assert_eq!(stored["event_id"], id.to_string());
    }
    let mut asked = ids.clone();
    asked.push(Uuid::now_v7());
    let found: Vec<Uuid> = events::events_by_ids(&app.pool, &asked).await.unwrap().iter().map(|e| e.event_id).collect();
    assert_eq!(found, ids, "every stored one, in stream order; the unknown id is not");
    let seqs: Vec<u64> = sqlx::query_scalar::<_, i64>(
        "SELECT stream_seq FROM event.events WHERE event_id = ANY($1) ORDER BY stream_seq",
    )
    .bind(&ids)
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|seq| seq as u64)
    .collect();
    // By id alone, by the range of the messages' sequences (as the projector asks), and with
    // half of the events outside the range given (stored from other messages): all the same.
    for given in [&[][..], &seqs[..], &seqs[3..]] {
        let positions = events::stored_positions(&app.pool, &asked, given).await.unwrap();
        let versions: Vec<(Option<i64>, i64)> =
            ids.iter().map(|id| (positions[id].stream_version, positions[id].stream_seq)).collect();
        let expected: Vec<(Option<i64>, i64)> = (1..=6).zip(&seqs).map(|(v, seq)| (Some(v), *seq as i64)).collect();
        assert_eq!((positions.len(), versions), (6, expected), "sequences given: {given:?}");
    }
    assert!(events::events_by_ids(&app.pool, &[Uuid::now_v7()]).await.unwrap().is_empty());
}
