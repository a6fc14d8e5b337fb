//! Pipeline scenarios behind the store: processing with one `publish` processor, the
//! projector, and webhook fan-out to 100 subscriptions.
//!
//! Reads `event.processed.success` on NATS, projection rows in PostgreSQL and what a receiver
//! inside the bench is sent. Registers one processor, the stream `BENCH_OUT` and 100
//! subscriptions, all removed at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::Bench;
use crate::cpu::CpuTimes;
use crate::report::{Limit, new_histogram, record};

impl Bench {
    /// Throughput of the processor stage with one publish processor, then create → processed
    /// latency one event at a time.
    pub async fn processing(&self) -> anyhow::Result<()> {
        let nats = self.nats.clone();
        let js = async_nats::jetstream::new(nats.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_OUT".into(),
            subjects: vec!["bench.processed.>".into()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await?;
        let registered = self
            .post("/api/v1/events/processors")
            .json(&json!({"processor_id": "bench-publish", "processor_name": "bench-publish",
                          "processor_type": "publish", "filters": {"event_type": "bench.processing"},
                          "config": {"subject": "bench.processed.{event_type}"}}))
            .send()
            .await?;
        if !registered.status().is_success() {
            bail!("cannot register the bench processor: {}", registered.text().await?);
        }
        // Workers reload on a notification; leave them a moment.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut processed = nats.subscribe("event.processed.success").await?;
        let seen = arrivals.clone();
        let listener = tokio::spawn(async move {
            while let Some(message) = processed.next().await {
                let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else { continue };
                if body["processor_name"] == "bench-publish"
                    && let Some(id) = body["event_id"].as_str()
                {
                    seen.lock().await.insert(id.to_owned(), Instant::now());
                }
            }
        });

        // Throughput: batches in, processed announcements out.
        let total: usize = if self.args.quick { 5_000 } else { 50_000 };
        let batch = 500;
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let mut sends = futures::stream::iter((0..total / batch).map(|b| {
            let events: Vec<Value> = (0..batch)
                .map(|i| {
                    json!({"event_type": "bench.processing", "user_id": format!("bench-{}", i % 100),
                                "data": {"batch": b, "i": i}})
                })
                .collect();
            self.post("/api/v1/events/batch").json(&events).send()
        }))
        .buffer_unordered(4);
        while let Some(response) = sends.next().await {
            let response = response?;
            if !response.status().is_success() {
                bail!("batch refused: {}", response.text().await?);
            }
        }
        let accepted = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let done = arrivals.lock().await.len();
            if done >= total || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (done, last) = {
            let seen = arrivals.lock().await;
            (seen.len(), seen.values().max().copied().unwrap_or_else(Instant::now))
        };
        let elapsed = last.duration_since(started);
        println!(
            "  {done} of {total} events processed in {:.2} s (ingest took {:.2} s)",
            elapsed.as_secs_f64(),
            accepted.as_secs_f64()
        );
        self.report.rate(
            "Processing, one `publish` processor",
            done as f64 / elapsed.as_secs_f64(),
            "ev",
            "> 500 ev/s per processor (spec)",
            Limit::None,
        );
        self.cpu_cost("Processing, one `publish` processor", &cpu, total).await?;

        // Latency: create (stored) → processed, one at a time.
        let count = if self.args.quick { 300 } else { 2_000 };
        let mut histogram = new_histogram();
        let started = Instant::now();
        for i in 0..count {
            let sent = Instant::now();
            let response = self
                .post("/api/v1/events/create")
                .json(&json!({"event_type": "bench.processing", "user_id": "bench-latency", "data": {"i": i}}))
                .send()
                .await?;
            let created: Value = response.json().await?;
            let id = created["event_id"].as_str().context("create answered without event_id")?.to_owned();
            let wait_until = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(at) = arrivals.lock().await.get(&id) {
                    record(&mut histogram, at.duration_since(sent));
                    break;
                }
                if Instant::now() > wait_until {
                    println!("  event {id} was not processed within 10 s");
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        self.report.latency("create → processed (one `publish` processor)", &histogram, started.elapsed(), "");

        listener.abort();
        let _ = self.delete("/api/v1/events/processors/bench-publish").send().await;
        let _ = js.delete_stream("BENCH_OUT").await;
        Ok(())
    }
}

impl Bench {
    /// Events over 100 streams in batches, then one at a time to a single stream.
    pub async fn projection(&self) -> anyhow::Result<()> {
        let Some(pool) = self.pool("projection") else { return Ok(()) };
        let pool = pool.clone();
        let kind = format!("bench{}", uuid::Uuid::now_v7().simple());
        let total: i64 = if self.args.quick { 10_000 } else { 50_000 };
        let applied = |pool: sqlx::PgPool, kind: String| async move {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(version)::bigint FROM event.event_projections WHERE projection_name = 'default' AND entity_type = $1",
            )
            .bind(kind)
            .fetch_one(&pool)
            .await
            .map(|sum| sum.unwrap_or(0))
        };
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let mut sends = futures::stream::iter((0..total / 1000).map(|b| {
            let events: Vec<Value> = (0..1000)
                .map(|i| {
                    json!({"event_type": "bench.projected", "stream_id": format!("{kind}:{}", i % 100),
                                "data": {"batch": b, "i": i}})
                })
                .collect();
            self.post("/api/v1/events/batch").json(&events).send()
        }))
        .buffer_unordered(4);
        while let Some(response) = sends.next().await {
            let response = response?;
            if !response.status().is_success() {
                bail!("batch refused: {}", response.text().await?);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while applied(pool.clone(), kind.clone()).await? < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let done = applied(pool.clone(), kind.clone()).await?;
        println!("  {done} of {total} events applied over 100 streams in {:.2} s", elapsed.as_secs_f64());
        self.report.rate("Projector, 100 streams", done as f64 / elapsed.as_secs_f64(), "ev", "", Limit::None);
        self.cpu_cost("Projector, 100 streams", &cpu, total as usize).await?;
        let count = if self.args.quick { 200 } else { 1_000 };
        let mut histogram = new_histogram();
        let stream = format!("{kind}-latency:one");
        let started = Instant::now();
        for i in 0..count {
            let sent = Instant::now();
            let response = self
                .post("/api/v1/events/create")
                .json(&json!({"event_type": "bench.projected", "stream_id": stream, "data": {"i": i}}))
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("create refused: {}", response.text().await?);
            }
            let wait_until = Instant::now() + Duration::from_secs(10);
            loop {
                let version: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM event.event_projections WHERE projection_name = 'default' \
                     AND entity_type = $1 AND entity_id = 'one'",
                )
                .bind(format!("{kind}-latency"))
                .fetch_optional(&pool)
                .await?;
                if version.unwrap_or(0) > i {
                    record(&mut histogram, sent.elapsed());
                    break;
                }
                if Instant::now() > wait_until {
                    println!("  event {i} was not projected within 10 s");
                    break;
                }
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
        self.report.latency("create → projection updated", &histogram, started.elapsed(), "");
        Ok(())
    }
}

/// What the fan-out receiver saw: (subscription path, event id) → count, and latencies.
#[derive(Default)]
struct Fanout {
    seen: HashMap<(String, String), u32>,
    per_event: HashMap<String, u32>,
    latency: Option<Histogram<u64>>,
}

impl Bench {
    /// 100 subscriptions, every event delivered to each, to a receiver in this process. With
    /// `stalled`, subscription 0's endpoint never answers (each of its deliveries waits out the
    /// delivery timeout): the rate counts the 99 healthy subscriptions' deliveries only.
    pub async fn fanout(&self, stalled: bool) -> anyhow::Result<()> {
        let subscriptions = 100;
        let events: usize = if self.args.quick { 200 } else { 1_000 };
        let state: Arc<Mutex<Fanout>> =
            Arc::new(Mutex::new(Fanout { latency: Some(new_histogram()), ..Fanout::default() }));
        let shared = state.clone();
        let app = axum::Router::new()
            .route("/stalled", axum::routing::post(futures::future::pending::<axum::http::StatusCode>))
            .route(
                "/{path}",
                axum::routing::post(
                    move |axum::extract::Path(path): axum::extract::Path<String>, body: axum::body::Bytes| {
                        let shared = shared.clone();
                        async move {
                            let now = chrono::Utc::now();
                            if let Ok(event) = serde_json::from_slice::<Value>(&body) {
                                let created = event["created_at"]
                                    .as_str()
                                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                                let mut state = shared.lock().await;
                                if let (Some(created), Some(latency)) = (created, state.latency.as_mut()) {
                                    let micros =
                                        (now - created.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0);
                                    let _ = latency.record(micros.max(1) as u64);
                                }
                                let id = event["event_id"].as_str().unwrap_or_default().to_owned();
                                *state.per_event.entry(id.clone()).or_default() += 1;
                                *state.seen.entry((path, id)).or_default() += 1;
                            }
                            axum::http::StatusCode::NO_CONTENT
                        }
                    },
                ),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let receiver = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        for i in 0..subscriptions {
            let path = if stalled && i == 0 { "stalled".to_owned() } else { format!("s{i}") };
            let created = self
                .post("/api/v1/events/subscriptions")
                .json(&json!({"subscription_id": format!("bench-fan-{i}"), "event_types": ["bench.fanout"],
                              "callback_url": format!("{receiver}/{path}")}))
                .send()
                .await?;
            if !created.status().is_success() {
                bail!("cannot create a bench subscription: {}", created.text().await?);
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        for chunk in 0..events / 100 {
            let batch: Vec<Value> =
                (0..100).map(|i| json!({"event_type": "bench.fanout", "data": {"n": chunk * 100 + i}})).collect();
            let response = self.post("/api/v1/events/batch").json(&batch).send().await?;
            if !response.status().is_success() {
                bail!("batch refused: {}", response.text().await?);
            }
        }
        let healthy = if stalled { subscriptions - 1 } else { subscriptions };
        let expected = healthy * events;
        // A stalled run may crawl (that is what it measures): it stops at a bound and reports
        // the rate it reached.
        let bound = Duration::from_secs(if stalled { self.size(60, 300) as u64 } else { 600 });
        let deadline = Instant::now() + bound;
        while state.lock().await.seen.len() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let delivered = state.lock().await.seen.len();
        self.wait_recorded(delivered, started_at).await;
        let used = CpuTimes::now();
        {
            let mut state = state.lock().await;
            let delivered = state.seen.len();
            let duplicates = state.seen.values().filter(|count| **count > 1).count();
            println!(
                "  {delivered} of {expected} deliveries in {:.2} s, {duplicates} duplicated",
                elapsed.as_secs_f64()
            );
            let scenario = match stalled {
                false => format!("Webhook fan-out, {events} events × {subscriptions} subscriptions"),
                true => format!(
                    "Webhook fan-out, {events} events × {subscriptions} subscriptions, one never answering \
                     (deliveries to the {healthy} others)"
                ),
            };
            let mut target = if stalled { "≥ 80 % of the run above".to_owned() } else { String::new() };
            if delivered < expected {
                target.push_str(&format!(" (stopped at the {} s bound)", bound.as_secs()));
            }
            self.report.rate(&scenario, delivered as f64 / elapsed.as_secs_f64(), "delivery", &target, Limit::None);
            if self.service_pid.is_some() {
                self.report.cpu_per(&scenario, "deliveries", &used.per_thousand_since(&cpu, delivered));
            }
            if let Some(latency) = &state.latency {
                self.report.latency("created → delivered during that burst", latency, elapsed, "");
            }
            state.latency = Some(new_histogram());
        }
        if !stalled {
            self.fanout_one_at_a_time(&state, subscriptions).await?;
        }
        server.abort();
        for i in 0..subscriptions {
            let _ = self.delete(&format!("/api/v1/events/subscriptions/bench-fan-{i}")).send().await;
        }
        Ok(())
    }

    /// Waits (at most 10 s) until the delivery log holds the `delivered` deliveries of the bench
    /// subscriptions made since `since`, so the CPU figure includes recording the last of them.
    async fn wait_recorded(&self, delivered: usize, since: chrono::DateTime<chrono::Utc>) {
        let Some(pool) = &self.pool else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let recorded: Result<i64, _> = sqlx::query_scalar(
                "SELECT count(*) FROM event.delivery_attempts \
                 WHERE subscription_id LIKE 'bench-fan-%' AND status = 'delivered' AND attempted_at >= $1",
            )
            .bind(since)
            .fetch_one(pool)
            .await;
            if recorded.map_or(true, |recorded| recorded >= delivered as i64) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Latency without a backlog: one event at a time, each to every subscription.
    async fn fanout_one_at_a_time(&self, state: &Mutex<Fanout>, subscriptions: usize) -> anyhow::Result<()> {
        let singles = if self.args.quick { 20 } else { 100 };
        let started = Instant::now();
        for i in 0..singles {
            let created: Value = self
                .post("/api/v1/events/create")
                .json(&json!({"event_type": "bench.fanout", "data": {"single": i}}))
                .send()
                .await?
                .json()
                .await?;
            let id = created["event_id"].as_str().context("create answered without event_id")?.to_owned();
            let deadline = Instant::now() + Duration::from_secs(30);
            while state.lock().await.per_event.get(&id).copied().unwrap_or(0) < subscriptions as u32
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if let Some(latency) = &state.lock().await.latency {
            self.report.latency(
                &format!("created → delivered, one event at a time to {subscriptions} subscriptions"),
                latency,
                started.elapsed(),
                "",
            );
        }
        Ok(())
    }
}
