//! `event-bench`: measures the pipeline from the outside, the way users load it, beside the raw
//! limits of the servers it runs on.
//!
//! Without `--url` it starts everything itself in a fresh folder: a nats-server, a durable
//! PostgreSQL and the release `event-service` next to this binary, so a run always begins from
//! an empty store and the service's peak RSS can be read. With `--url` it targets a running
//! service (give `--nats-url`, `--database-url` and `--service-pid` for the scenarios that need
//! them).
//!
//! Reads HTTP answers, NATS subjects and PostgreSQL counts. Writes events (types `bench.*` and
//! `seed.*`), and temporary fixtures it removes at the end: a processor, 100 subscriptions,
//! the streams `BENCH_RAW` and `BENCH_OUT`, the table `public.bench_raw`.
//! Results are printed as they come and as one Markdown table at the end (`--markdown` also
//! writes it to a file), each figure beside its target and, for throughput, its raw limit.

mod baseline;
mod cpu;
mod ingest;
mod live;
mod overload;
mod pipeline;
mod query;
mod report;
mod scaleout;
mod schema;
mod service;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::Value;
use sqlx::PgPool;

use cpu::CpuTimes;
use report::Report;
use service::Service;

#[derive(Parser)]
#[command(version, about = "Measures event-service against the raw limits of NATS and PostgreSQL")]
pub struct Args {
    /// A running service to measure; without it the bench starts its own (and its servers).
    #[arg(long, env = "EVENT_BENCH_URL")]
    url: Option<String>,
    /// The running service's NATS server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The running service's PostgreSQL (baselines, persisted counts, seeding and the projector
    /// read it).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// The running service's process id, to report its peak RSS.
    #[arg(long)]
    service_pid: Option<u32>,
    /// An API key, when the running service requires one.
    #[arg(long, env = "EVENT_BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The nats-server binary for a started service.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server_bin: PathBuf,
    /// Where a started service and its servers keep their data (removed afterwards unless
    /// `--keep`); default: a new folder under the system temp dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the started servers' data folder.
    #[arg(long)]
    keep: bool,
    /// Small runs (under two minutes in all) for before/after checks on a change.
    #[arg(long)]
    quick: bool,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,batch,persisted,nats,create,frontend,processing,projection,fanout,fanout-stalled,live,schema,overload,query"
    )]
    scenarios: Vec<Scenario>,
    /// Concurrent HTTP clients for the latency scenarios (besides one client alone).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Batch requests in flight at once in the throughput scenarios.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Also write the results table (Markdown) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Raw JetStream publish and raw PostgreSQL COPY of the same events: the limits.
    Baseline,
    /// HTTP batches of 100 and 1 000, answered once JetStream has them.
    Batch,
    /// HTTP batches of 1 000 answered once stored, counted in PostgreSQL.
    Persisted,
    /// JetStream publish to `events.>` until PostgreSQL has every event.
    Nats,
    /// `POST /create` latency, answered once stored.
    Create,
    /// `POST /frontend` latency.
    Frontend,
    /// One publish processor: throughput and create → processed latency.
    Processing,
    /// The projector: throughput and create → projection updated latency.
    Projection,
    /// Webhook deliveries to 100 subscriptions.
    Fanout,
    /// Twice the sustainable rate, open loop: the service's memory, its answers, catch-up time.
    Overload,
    /// The same with one of the 100 endpoints never answering: what the 99 others still get.
    FanoutStalled,
    /// 100 live tails (SSE) following a steady load: what they receive, how late, what they cost.
    Live,
    /// Batch ingest of a type with a schema beside one without: what the check costs.
    Schema,
    /// Query of 1 000 rows and statistics over a seeded store.
    Query,
    /// The stages as separate processes, one and then two gateways, processors and
    /// dispatchers, on servers of their own (not in the default list: run it alone).
    Scaleout,
}

/// What every scenario shares.
pub struct Bench {
    args: Args,
    url: String,
    http: reqwest::Client,
    nats: async_nats::Client,
    pool: Option<PgPool>,
    service_pid: Option<u32>,
    report: Report,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    event_service::infra::callback::install_crypto_provider();
    let started = match args.url {
        Some(_) => None,
        None => Some(Service::start(&args).await?),
    };
    let (url, nats_url, database_url, service_pid) = match &started {
        Some(service) => {
            (service.url.clone(), service.nats_url.clone(), Some(service.database_url.clone()), Some(service.pid()))
        }
        None => {
            (args.url.clone().unwrap_or_default(), args.nats_url.clone(), args.database_url.clone(), args.service_pid)
        }
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let health: Value = http
        .get(format!("{url}/health"))
        .send()
        .await
        .with_context(|| format!("no service answers at {url}"))?
        .json()
        .await?;
    let nats = async_nats::connect(&nats_url).await.with_context(|| format!("cannot reach NATS at {nats_url}"))?;
    let pool = match &database_url {
        Some(database_url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(database_url)
                .await
                .with_context(|| "cannot reach PostgreSQL (--database-url)")?,
        ),
        None => None,
    };
    // The service the bench starts inherits the environment: say when it changes what is measured.
    let stored_stream = match (&started, std::env::var("EVENT_STORED_STREAM")) {
        (Some(_), Ok(value)) => format!(", EVENT_STORED_STREAM={value}"),
        _ => String::new(),
    };
    println!(
        "event-service {} at {url}{}{stored_stream}; {}",
        health["version"].as_str().unwrap_or("?"),
        if started.is_some() { " (started by the bench)" } else { "" },
        report::machine()
    );
    let bench = Bench { args, url, http, nats, pool, service_pid, report: Report::default() };
    let outcome = bench.run().await;
    bench.report.print_table(&bench.machine_line(), bench.args.markdown.as_deref())?;
    if let Some(service) = started {
        service.stop(bench.args.keep);
    }
    outcome
}

impl Bench {
    async fn run(&self) -> anyhow::Result<()> {
        let wanted = |scenario| self.args.scenarios.contains(&scenario);
        if wanted(Scenario::Baseline) {
            self.baselines().await?;
        }
        if wanted(Scenario::Batch) {
            self.batch_ingest(100).await?;
            self.batch_ingest(1_000).await?;
        }
        self.drain().await?;
        if wanted(Scenario::Persisted) {
            self.persisted().await?;
        }
        self.drain().await?;
        if wanted(Scenario::Nats) {
            self.nats_ingest().await?;
        }
        self.drain().await?;
        if wanted(Scenario::Create) {
            self.create_latency(1).await?;
            self.create_latency(self.args.clients).await?;
        }
        if wanted(Scenario::Frontend) {
            self.frontend_latency(1).await?;
            self.frontend_latency(self.args.clients).await?;
        }
        if wanted(Scenario::Processing) {
            self.processing().await?;
        }
        if wanted(Scenario::Projection) {
            self.projection().await?;
        }
        if wanted(Scenario::Fanout) {
            self.fanout(false).await?;
        }
        if wanted(Scenario::FanoutStalled) {
            self.fanout(true).await?;
        }
        if wanted(Scenario::Live) {
            self.live_tails().await?;
        }
        if wanted(Scenario::Schema) {
            self.schema_cost().await?;
        }
        if wanted(Scenario::Overload) {
            self.overload().await?;
        }
        if wanted(Scenario::Query) {
            self.query_at_scale().await?;
        }
        if wanted(Scenario::Scaleout) {
            self.scale_out().await?;
        }
        self.note_rss("end of run");
        Ok(())
    }

    fn machine_line(&self) -> String {
        format!("{}; {}", report::machine(), if self.args.quick { "--quick" } else { "full run" })
    }

    /// Scales a full-run size down for `--quick`.
    fn size(&self, quick: usize, full: usize) -> usize {
        if self.args.quick { quick } else { full }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.post(format!("{}{path}", self.url)))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.get(format!("{}{path}", self.url)))
    }

    fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.put(format!("{}{path}", self.url)))
    }

    fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.delete(format!("{}{path}", self.url)))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.args.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    fn pool(&self, scenario: &str) -> Option<&PgPool> {
        if self.pool.is_none() {
            println!("{scenario}: skipped (needs --database-url when targeting a running service)");
        }
        self.pool.as_ref()
    }

    /// Prints the service's peak RSS so far, when its process is known.
    fn note_rss(&self, after: &str) {
        if let Some(pid) = self.service_pid
            && let Some(memory) = service::memory(pid)
        {
            println!(
                "  service memory after {after}: peak RSS {:.0} MiB, now {:.0} MiB",
                memory.peak_mib, memory.now_mib
            );
            self.report.peak_rss(memory.peak_mib);
        }
    }

    /// Waits until every stage reading EVENTS (persister, processor, projector, dispatcher)
    /// has caught up and vacuums the events table, so that a scenario does not measure the
    /// backlog of the one before.
    async fn drain(&self) -> anyhow::Result<()> {
        self.caught_up().await?;
        // Vacuum now rather than let autovacuum start in the middle of the next measurement.
        if let Some(pool) = &self.pool {
            sqlx::raw_sql("VACUUM (ANALYZE) event.events").execute(pool).await?;
        }
        Ok(())
    }

    /// Reports the CPU the pipeline spent on `events` since `before`, once every stage has
    /// handled them (only when the servers run on this machine).
    async fn cpu_cost(&self, scenario: &str, before: &CpuTimes, events: usize) -> anyhow::Result<()> {
        if self.service_pid.is_none() {
            return Ok(());
        }
        self.caught_up().await?;
        self.report.cpu(scenario, &CpuTimes::now().per_thousand_since(before, events));
        Ok(())
    }

    /// Waits until every stage reading EVENTS has handled everything in it.
    async fn caught_up(&self) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let events = js.get_stream("EVENTS").await?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(900);
        for name in ["persister", "processor", "projector", "dispatcher"] {
            let Ok(mut consumer) = events.get_consumer::<async_nats::jetstream::consumer::pull::Config>(name).await
            else {
                continue;
            };
            let mut idle_since: Option<Instant> = None;
            loop {
                let info = consumer.info().await?;
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    break;
                }
                // A stage that is not deployed (a running service split into binaries) never
                // catches up: after 10 s without anyone pulling, stop waiting for it.
                if info.num_waiting == 0 && info.num_ack_pending == 0 {
                    if idle_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(10) {
                        println!("  (nobody consumes `{name}`: not waiting for it)");
                        break;
                    }
                } else {
                    idle_since = None;
                }
                if Instant::now() > deadline {
                    anyhow::bail!("{name} still had {} events to go after 15 minutes", info.num_pending);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if started.elapsed() > Duration::from_secs(1) {
            println!("  (waited {:.1} s for the pipeline to catch up)", started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Waits until `count` says at least `expected`, polling; answers what it last said.
    async fn wait_for_count<F, Fut>(&self, expected: i64, timeout: Duration, mut count: F) -> anyhow::Result<i64>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<i64>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = count().await?;
            if now >= expected || tokio::time::Instant::now() >= deadline {
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
