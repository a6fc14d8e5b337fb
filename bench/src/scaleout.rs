//! The scale-out scenario (`--scenarios scaleout`): the stages as separate processes against one
//! nats-server and one PostgreSQL of their own, first one instance each, then two gateways,
//! two processors and two dispatchers (the persister and the projector stay single: one is
//! active at a time by design). The same load runs on both: HTTP batches spread over the
//! gateways, one publish processor, 10 subscriptions to a receiver in this process.
//!
//! Reads each process's CPU from `/proc`, the rows, STORED and what the receiver got. Writes
//! events `bench.scale` (in 50 entity streams), a processor and the subscriptions, all in the
//! scenario's own folder, removed at the end. Reports per topology: stored, processed and
//! delivered rates, CPU per 1 000 events of every process, and whether exactly-once storage,
//! STORED's order and gapless stream versions held.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use event_service::infra::local::{LocalNats, LocalPostgres, LocalProcess, free_port};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::Bench;
use crate::cpu::{self, CpuTimes};
use crate::report::Limit;

const SUBSCRIPTIONS: usize = 10;
const STREAMS: usize = 50;

/// One topology of separate processes, in a folder of its own.
struct Topology {
    dir: PathBuf,
    nats: LocalNats,
    postgres: LocalPostgres,
    pool: sqlx::PgPool,
    gateways: Vec<String>,
    processes: Vec<LocalProcess>,
}

impl Topology {
    async fn start(nats_server: &Path, instances: usize) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("event-bench-scale-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let nats = LocalNats::start(nats_server, &dir.join("nats"), 0)?;
        let postgres = LocalPostgres::start(&dir.join("postgres"), 0, true)?;
        event_service::infra::db::ensure_database(&postgres.url("postgres"), "event_service").await?;
        let database_url = postgres.url("event_service");
        let bin = std::env::current_exe()?.parent().context("the bench binary has no folder")?.to_owned();
        let spawn = |role: &str, index: usize, addr: Option<&str>| -> anyhow::Result<LocalProcess> {
            let binary = bin.join(format!("event-{role}"));
            if !binary.exists() {
                bail!("{} is missing: build it with cargo build --release --workspace", binary.display());
            }
            let mut command = Command::new(&binary);
            command
                .env("NATS_URL", &nats.url)
                .env("DATABASE_URL", &database_url)
                .env("EVENT_HTTP_ADDR", addr.unwrap_or("127.0.0.1:0"))
                .env("EVENT_CALLBACK_ALLOWED_NETS", "127.0.0.0/8")
                .env("RUST_LOG", "warn");
            let name = format!("{role}-{index}");
            LocalProcess::spawn(&name, command, &dir.join(format!("{name}.log")))
        };
        let mut processes = Vec::new();
        let mut gateways = Vec::new();
        for index in 1..=instances {
            let addr = format!("127.0.0.1:{}", free_port()?);
            processes.push(spawn("gateway", index, Some(&addr))?);
            gateways.push(format!("http://{addr}"));
            // The first one applies the migrations and the topology before the others start.
            wait_healthy(&gateways[0]).await?;
        }
        processes.push(spawn("persister", 1, None)?);
        processes.push(spawn("projector", 1, None)?);
        for index in 1..=instances {
            processes.push(spawn("processor", index, None)?);
            processes.push(spawn("dispatcher", index, None)?);
        }
        for gateway in &gateways {
            wait_healthy(gateway).await?;
        }
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&database_url).await?;
        Ok(Self { dir, nats, postgres, pool, gateways, processes })
    }

    /// CPU so far of each process, and a reading of PostgreSQL and nats-server.
    fn cpu(&self) -> (Vec<(String, Option<cpu::ProcStat>)>, CpuTimes) {
        let processes =
            self.processes.iter().map(|process| (process.name.clone(), cpu::process(process.id()))).collect();
        (processes, CpuTimes::now())
    }

    fn stop(mut self) {
        for process in &mut self.processes {
            process.stop(Duration::from_secs(10));
        }
        self.nats.stop();
        self.postgres.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_healthy(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(response) = reqwest::get(format!("{url}/health/ready")).await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} was not ready within 60 s")
}

/// What the receiver got: (subscription, event id) → deliveries.
type Seen = Arc<Mutex<HashMap<(String, String), u32>>>;

impl Bench {
    pub async fn scale_out(&self) -> anyhow::Result<()> {
        let events = self.size(5_000, 40_000);
        let seen: Seen = Arc::default();
        let shared = seen.clone();
        let app = axum::Router::new().route(
            "/{path}",
            axum::routing::post(
                move |axum::extract::Path(path): axum::extract::Path<String>, body: axum::body::Bytes| {
                    let shared = shared.clone();
                    async move {
                        if let Ok(event) = serde_json::from_slice::<Value>(&body) {
                            let id = event["event_id"].as_str().unwrap_or_default().to_owned();
                            *shared.lock().await.entry((path, id)).or_default() += 1;
                        }
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let receiver = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        for instances in [1, 2] {
            seen.lock().await.clear();
            let topology = Topology::start(&self.args.nats_server_bin, instances).await?;
            let outcome = self.scale_round(&topology, instances, events, &receiver, &seen).await;
            topology.stop();
            outcome?;
        }
        server.abort();
        Ok(())
    }

    async fn scale_round(
        &self,
        topology: &Topology,
        instances: usize,
        events: usize,
        receiver: &str,
        seen: &Seen,
    ) -> anyhow::Result<()> {
        let http = &self.http;
        let gateway = &topology.gateways[0];
        let processor = json!({"processor_id": "scale", "processor_name": "scale", "processor_type": "publish",
                               "filters": {"event_type": "bench.scale"}, "config": {"subject": "bench.scaled.{event_type}"}});
        let registered = http.post(format!("{gateway}/api/v1/events/processors")).json(&processor).send().await?;
        if !registered.status().is_success() {
            bail!("cannot register the processor: {}", registered.text().await?);
        }
        for i in 0..SUBSCRIPTIONS {
            let subscription = json!({"subscription_id": format!("scale-{i}"), "event_types": ["bench.scale"],
                                      "callback_url": format!("{receiver}/s{i}")});
            let created =
                http.post(format!("{gateway}/api/v1/events/subscriptions")).json(&subscription).send().await?;
            if !created.status().is_success() {
                bail!("cannot create a subscription: {}", created.text().await?);
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let label = match instances {
            1 => "one gateway, processor and dispatcher".to_owned(),
            n => format!("{n} gateways, {n} processors, {n} dispatchers"),
        };
        let before = topology.cpu();
        let started = Instant::now();
        let batch = 500;
        let mut sends = futures::stream::iter((0..events / batch).map(|b| {
            let body: Vec<Value> = (0..batch)
                .map(|i| {
                    let n = b * batch + i;
                    json!({"event_id": Uuid::now_v7(), "event_type": "bench.scale", "user_id": format!("u{}", n % 100),
                           "stream_id": format!("scale:{}", n % STREAMS), "data": {"n": n}})
                })
                .collect();
            let gateway = &topology.gateways[b % topology.gateways.len()];
            http.post(format!("{gateway}/api/v1/events/batch")).json(&body).send()
        }))
        .buffer_unordered(self.args.in_flight);
        while let Some(response) = sends.next().await {
            let response = response?;
            if !response.status().is_success() {
                bail!("batch refused: {}", response.text().await?);
            }
        }
        let pool = &topology.pool;
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.map_err(anyhow::Error::from)
        };
        let target = events as i64;
        wait(target, || count("SELECT count(*) FROM event.events WHERE event_type = 'bench.scale'")).await?;
        let stored_in = started.elapsed();
        wait(target, || {
            count("SELECT count(*) FROM event.events WHERE event_type = 'bench.scale' AND status = 'processed'")
        })
        .await?;
        let processed_in = started.elapsed();
        let deliveries = (events * SUBSCRIPTIONS) as i64;
        wait(deliveries, || async { Ok(seen.lock().await.len() as i64) }).await?;
        let delivered_in = started.elapsed();
        let after = topology.cpu();

        let per_second = |elapsed: Duration, n: usize| n as f64 / elapsed.as_secs_f64().max(1e-9);
        self.report.rate(&format!("Scale-out, {label}: stored"), per_second(stored_in, events), "ev", "", Limit::None);
        self.report.rate(
            &format!("Scale-out, {label}: processed"),
            per_second(processed_in, events),
            "ev",
            "",
            Limit::None,
        );
        let rate = per_second(delivered_in, events * SUBSCRIPTIONS);
        self.report.rate(
            &format!("Scale-out, {label}: delivered ({SUBSCRIPTIONS} subscriptions)"),
            rate,
            "delivery",
            "",
            Limit::None,
        );
        let per_thousand = |seconds: f64| seconds * 1_000_000.0 / events as f64;
        let servers = after.1.used_since(&before.1);
        let cpu: Vec<String> = after
            .0
            .iter()
            .zip(&before.0)
            .map(|((name, now), (_, then))| (name.as_str(), cpu::process_used(then.as_ref(), now.as_ref())))
            .chain([("PostgreSQL", Some(servers.postgres)), ("nats-server", Some(servers.nats))])
            .map(|(name, seconds)| match seconds {
                Some(seconds) => format!("{name} {:.0} ms", per_thousand(seconds)),
                None => format!("{name} ended"),
            })
            .collect();
        self.report.cpu(&format!("Scale-out, {label}"), &cpu.join(" · "));
        self.scale_checks(topology, &label, events, seen).await
    }

    /// Exactly once in the rows and on STORED, in order; versions gapless; every delivery made.
    async fn scale_checks(&self, topology: &Topology, label: &str, events: usize, seen: &Seen) -> anyhow::Result<()> {
        let pool = &topology.pool;
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT event_id) FROM event.events WHERE event_type = 'bench.scale'",
        )
        .fetch_one(pool)
        .await?;
        let gapped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT stream_id FROM event.events WHERE event_type = 'bench.scale' \
             GROUP BY stream_id HAVING min(stream_version) <> 1 OR max(stream_version) <> count(*)) AS g",
        )
        .fetch_one(pool)
        .await?;
        let stored = stored_sequences(&topology.nats.url).await?;
        let in_order = stored.windows(2).all(|pair| pair[0] < pair[1]);
        let (missing, duplicated) = {
            let seen = seen.lock().await;
            (events * SUBSCRIPTIONS - seen.len().min(events * SUBSCRIPTIONS), seen.values().filter(|n| **n > 1).count())
        };
        let verdict = format!(
            "rows {rows} ({distinct} distinct) for {events} sent · STORED {} messages, {} · streams with a version gap: {gapped} · deliveries missing {missing}, repeated {duplicated}",
            stored.len(),
            if in_order { "in order" } else { "OUT OF ORDER" }
        );
        self.report.push(
            &format!("Scale-out, {label}: checks"),
            verdict.clone(),
            "exactly once, in order",
            String::new(),
        );
        println!("  {verdict}");
        if rows != events as i64
            || distinct != rows
            || stored.len() != events
            || !in_order
            || gapped != 0
            || missing != 0
        {
            bail!("scale-out, {label}: a guarantee did not hold: {verdict}");
        }
        Ok(())
    }
}

/// Polls `count` until it reaches `target` (10 minutes at most).
async fn wait<F, Fut>(target: i64, mut count: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<i64>>,
{
    let started = Instant::now();
    while count().await? < target {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("not there after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The EVENTS sequence of every message on STORED, in STORED's order.
async fn stored_sequences(url: &str) -> anyhow::Result<Vec<i64>> {
    let jetstream = async_nats::jetstream::new(async_nats::connect(url).await?);
    let stream = jetstream.get_stream("STORED").await?;
    let consumer = stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await?;
    let mut messages = consumer.messages().await?;
    let mut sequences = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
        let event: Value = serde_json::from_slice(&message.payload)?;
        sequences.push(event["stream_seq"].as_i64().unwrap_or(-1));
    }
    Ok(sequences)
}
