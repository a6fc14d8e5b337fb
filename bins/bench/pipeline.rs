//! `event-bench`: measures a running event-service from the outside, the way users load it.
//!
//! Scenarios (pick with `--scenarios`):
//! - `create`: `POST /api/v1/events/create` latency (answered once stored) with N clients.
//! - `processing`: processing throughput and create → processed latency with one `publish`
//!   processor (registered by the bench, removed afterwards).
//! - `projection`: projector throughput and create → projection updated latency (needs
//!   `--database-url`, to see what the projector stored rather than a read-time fold).
//! - `fanout`: webhook deliveries per second and event created → delivered latency with 100
//!   subscriptions calling a receiver inside the bench (the service must be allowed to call
//!   loopback, as the local run is).
//!
//! Reads HTTP answers and `event.processed.success` on NATS; writes events (type `bench.*`),
//! one processor and one stream (`BENCH_OUT`), which it removes at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(version, about = "Measures a running event-service (start one with ./scripts/run)")]
struct Args {
    /// The service's HTTP address.
    #[arg(long, env = "EVENT_BENCH_URL", default_value = "http://127.0.0.1:8230")]
    url: String,
    /// The service's NATS server (`./scripts/run` prints it).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The service's PostgreSQL (`./scripts/run` prints it); the projection scenario reads it.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// An API key, when the service requires one.
    #[arg(long, env = "EVENT_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Small runs (under a minute) for before/after checks.
    #[arg(long)]
    quick: bool,
    #[arg(long, value_delimiter = ',', default_value = "create,processing,fanout")]
    scenarios: Vec<Scenario>,
    /// Concurrent HTTP clients for the create scenario.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Create,
    Processing,
    Projection,
    Fanout,
}

struct Bench {
    args: Args,
    http: reqwest::Client,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    event_service::callback::install_crypto_provider();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let bench = Bench { args, http };
    let health: Value = bench.http.get(format!("{}/health", bench.args.url)).send().await?.json().await?;
    println!("service {} at {}", health["version"], bench.args.url);
    if bench.args.scenarios.contains(&Scenario::Create) {
        bench.create_latency(1).await?;
        bench.create_latency(bench.args.clients).await?;
    }
    if bench.args.scenarios.contains(&Scenario::Processing) {
        bench.processing().await?;
    }
    if bench.args.scenarios.contains(&Scenario::Projection) {
        bench.projection().await?;
    }
    if bench.args.scenarios.contains(&Scenario::Fanout) {
        bench.fanout().await?;
    }
    Ok(())
}

impl Bench {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.args.url));
        match &self.args.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Single-event create, answered once PostgreSQL has the event.
    async fn create_latency(&self, clients: usize) -> anyhow::Result<()> {
        let total = if self.args.quick { 2_000 } else { 20_000 };
        let per_client = total / clients.max(1);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let request = self.post("/api/v1/events/create");
            tasks.push(tokio::spawn(async move {
                let mut histogram = new_histogram();
                let mut failures = 0;
                for i in 0..per_client {
                    let body = json!({"event_type": "bench.create", "user_id": format!("bench-{}", i % 100),
                                      "data": {"client": client, "i": i, "plan": "premium"}});
                    let Some(request) = request.try_clone() else { break };
                    let sent = Instant::now();
                    match request.json(&body).send().await {
                        Ok(response) if response.status() == reqwest::StatusCode::OK => {
                            let _ = response.bytes().await;
                            record(&mut histogram, sent.elapsed());
                        }
                        _ => failures += 1,
                    }
                }
                (histogram, failures)
            }));
        }
        let mut histogram = new_histogram();
        let mut failures = 0;
        for task in tasks {
            let (part, failed) = task.await?;
            histogram.add(part)?;
            failures += failed;
        }
        let elapsed = started.elapsed();
        report(&format!("create (stored), {clients} client(s)"), &histogram, histogram.len(), elapsed);
        if failures > 0 {
            println!("  {failures} requests were not answered 200");
        }
        Ok(())
    }

    /// Throughput of the processor stage with one publish processor, then create → processed
    /// latency one event at a time.
    async fn processing(&self) -> anyhow::Result<()> {
        let nats = async_nats::connect(&self.args.nats_url)
            .await
            .with_context(|| format!("cannot reach NATS at {} (pass --nats-url)", self.args.nats_url))?;
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
            "processing throughput, one publish processor: {done} of {total} events processed in {:.2} s = {:.0} events/s \
             (ingest took {:.2} s)",
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64(),
            accepted.as_secs_f64()
        );

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
        report("create → processed (one publish processor)", &histogram, histogram.len(), started.elapsed());

        listener.abort();
        let mut delete = self.http.delete(format!("{}/api/v1/events/processors/bench-publish", self.args.url));
        if let Some(key) = &self.args.api_key {
            delete = delete.bearer_auth(key);
        }
        let _ = delete.send().await;
        let _ = js.delete_stream("BENCH_OUT").await;
        Ok(())
    }
}

impl Bench {
    /// Events over 100 streams in batches, then one at a time to a single stream.
    async fn projection(&self) -> anyhow::Result<()> {
        let Some(url) = &self.args.database_url else {
            println!("projection: skipped (pass --database-url)");
            return Ok(());
        };
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(url).await?;
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
        println!(
            "projector throughput: {done} of {total} events applied over 100 streams in {:.2} s = {:.0} events/s",
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64()
        );
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
        report("create → projection updated (stored by the projector)", &histogram, histogram.len(), started.elapsed());
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
    /// 100 subscriptions, every event delivered to each, to a receiver in this process.
    async fn fanout(&self) -> anyhow::Result<()> {
        let subscriptions = 100;
        let events: usize = if self.args.quick { 200 } else { 1_000 };
        let state: Arc<Mutex<Fanout>> =
            Arc::new(Mutex::new(Fanout { latency: Some(new_histogram()), ..Fanout::default() }));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/{path}",
            axum::routing::post(
                move |axum::extract::Path(path): axum::extract::Path<String>, body: axum::body::Bytes| {
                    let shared = shared.clone();
                    async move {
                        let now = chrono::Utc::now();
                        if let Ok(event) = serde_json::from_slice::<Value>(&body) {
                            let created =
                                event["created_at"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
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
            let created = self
                .post("/api/v1/events/subscriptions")
                .json(&json!({"subscription_id": format!("bench-fan-{i}"), "event_types": ["bench.fanout"],
                              "callback_url": format!("{receiver}/s{i}")}))
                .send()
                .await?;
            if !created.status().is_success() {
                bail!("cannot create a bench subscription: {}", created.text().await?);
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let started = Instant::now();
        for chunk in 0..events / 100 {
            let batch: Vec<Value> =
                (0..100).map(|i| json!({"event_type": "bench.fanout", "data": {"n": chunk * 100 + i}})).collect();
            let response = self.post("/api/v1/events/batch").json(&batch).send().await?;
            if !response.status().is_success() {
                bail!("batch refused: {}", response.text().await?);
            }
        }
        let expected = subscriptions * events;
        let deadline = Instant::now() + Duration::from_secs(600);
        while state.lock().await.seen.len() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        {
            let mut state = state.lock().await;
            let delivered = state.seen.len();
            let duplicates = state.seen.values().filter(|count| **count > 1).count();
            println!(
                "fan-out to {subscriptions} subscriptions: {delivered} of {expected} deliveries in {:.2} s = {:.0} \
                 deliveries/s ({duplicates} duplicated)",
                elapsed.as_secs_f64(),
                delivered as f64 / elapsed.as_secs_f64()
            );
            if let Some(latency) = &state.latency {
                report("  created → delivered during that burst", latency, latency.len(), elapsed);
            }
            state.latency = Some(new_histogram());
        }
        // Latency without a backlog: one event at a time, each to every subscription.
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
            report(
                &format!("created → delivered, one event at a time to {subscriptions} subscriptions"),
                latency,
                latency.len(),
                started.elapsed(),
            );
        }
        server.abort();
        for i in 0..subscriptions {
            let mut delete = self.http.delete(format!("{}/api/v1/events/subscriptions/bench-fan-{i}", self.args.url));
            if let Some(key) = &self.args.api_key {
                delete = delete.bearer_auth(key);
            }
            let _ = delete.send().await;
        }
        Ok(())
    }
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 1 h, three significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let _ = histogram.record((elapsed.as_micros() as u64).max(1));
}

fn report(name: &str, histogram: &Histogram<u64>, count: u64, elapsed: Duration) {
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    println!(
        "{name}: n={count} p50={:.2} ms p95={:.2} ms p99={:.2} ms max={:.2} ms, {:.0}/s",
        ms(0.5),
        ms(0.95),
        ms(0.99),
        histogram.max() as f64 / 1000.0,
        count as f64 / elapsed.as_secs_f64()
    );
}
