//! `event-cluster`: the production topology as local processes, for machines without Docker
//! (`./scripts/cluster` builds and starts it). Three nats-servers in a cluster with every
//! stream on three replicas, PostgreSQL, and every stage a process of its own: two gateways,
//! one persister, two processors, two dispatchers, two projectors (one active, one standby).
//!
//! Writes under `EVENT_CLUSTER_DIR` (default `.data/cluster`): the servers' data, one log per
//! process in `logs/`, `cluster.json` (every URL, written once every stage is ready) and
//! `prometheus.yml` (a scrape configuration for all of them). Ctrl-C stops the stages (each
//! finishes the work in hand), then the servers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use event_service::domain::Secret;
use event_service::infra::local::{LocalPostgres, LocalProcess, NatsCluster, free_port};
use event_service::infra::settings::{DatabaseArgs, NatsArgs};
use event_service::infra::{callback, db, shutdown};
use event_service::service;
use serde_json::json;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service topology as local processes")]
struct Args {
    /// Where the servers keep their data and the processes their logs.
    #[arg(long, env = "EVENT_CLUSTER_DIR", default_value = ".data/cluster")]
    dir: PathBuf,
    /// The first gateway listens here, the second on the next port; the worker stages'
    /// metrics and probes from ten ports up. 0: free ports everywhere.
    #[arg(long, env = "EVENT_CLUSTER_PORT", default_value_t = 8230)]
    port: u16,
    /// The nats-server binary.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server_bin: PathBuf,
    /// Where the stage binaries are (default: beside this one).
    #[arg(long, env = "EVENT_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// One stage process of the topology.
struct Stage {
    name: String,
    binary: &'static str,
    /// Gateways: the HTTP API; workers: metrics and probes.
    addr: String,
    gateway: bool,
}

/// The stages, two instances where production runs two.
fn topology(port: u16) -> anyhow::Result<Vec<Stage>> {
    let mut stages = Vec::new();
    let next = |offset: u16| -> anyhow::Result<String> {
        let port = if port == 0 { free_port()? } else { port + offset };
        Ok(format!("127.0.0.1:{port}"))
    };
    for (index, offset) in [(1, 0), (2, 1)] {
        stages.push(Stage {
            name: format!("gateway-{index}"),
            binary: "event-gateway",
            addr: next(offset)?,
            gateway: true,
        });
    }
    let workers = [
        ("persister", "event-persister", 10),
        ("processor-1", "event-processor", 11),
        ("processor-2", "event-processor", 12),
        ("dispatcher-1", "event-dispatcher", 13),
        ("dispatcher-2", "event-dispatcher", 14),
        ("projector-1", "event-projector", 15),
        ("projector-2", "event-projector", 16),
    ];
    for (name, binary, offset) in workers {
        stages.push(Stage { name: name.to_owned(), binary, addr: next(offset)?, gateway: false });
    }
    Ok(stages)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = event_service::infra::telemetry::init("pretty", "event-cluster");
    let token = shutdown::on_signal();
    let dir = std::path::absolute(&args.dir)?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?.parent().context("no folder for the binaries")?.to_owned(),
    };
    std::fs::create_dir_all(dir.join("logs"))?;
    // Written again once this run is ready; a stale one would point at stopped processes.
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    println!("==> starting three nats-servers in a cluster");
    let nats = NatsCluster::start(&args.nats_server_bin, &dir, 3)?;
    println!("==> starting PostgreSQL");
    let postgres = LocalPostgres::start(&dir.join("postgres"), 0, true)?;
    db::ensure_database(&postgres.url("postgres"), "event_service").await?;
    let database_url = postgres.url("event_service");
    println!("==> streams on three replicas, and the schema");
    set_up(&nats.url_from(0), &database_url).await?;

    let stages = topology(args.port)?;
    let mut processes = Vec::with_capacity(stages.len());
    for (index, stage) in stages.iter().enumerate() {
        let mut command = Command::new(bin_dir.join(stage.binary));
        command
            .env("NATS_URL", nats.url_from(index))
            .env("DATABASE_URL", &database_url)
            .env("EVENT_STREAM_REPLICAS", "3")
            .env("EVENT_LOG_FORMAT", "json")
            .env(if stage.gateway { "EVENT_HTTP_ADDR" } else { "EVENT_METRICS_ADDR" }, &stage.addr);
        if std::env::var_os("EVENT_CALLBACK_ALLOWED_NETS").is_none() {
            // A local topology: webhooks to services on this machine are the point.
            command.env("EVENT_CALLBACK_ALLOWED_NETS", "127.0.0.0/8,::1/128");
        }
        let log = dir.join("logs").join(format!("{}.log", stage.name));
        processes.push(LocalProcess::spawn(&stage.name, command, &log)?);
    }
    wait_until_ready(&stages, &mut processes, &token).await?;
    describe(&dir, &stages, &nats, &database_url)?;
    println!("Ctrl-C stops everything.");

    let mut check = tokio::time::interval(Duration::from_secs(2));
    let mut exited = vec![false; processes.len()];
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = check.tick() => {
                for (process, exited) in processes.iter_mut().zip(exited.iter_mut()) {
                    if !*exited && !process.running() {
                        *exited = true;
                        eprintln!("{} exited; see {}", process.name, process.log.display());
                    }
                }
            }
        }
    }
    println!("==> stopping the stages (each finishes the work in hand), then the servers");
    for process in &mut processes {
        process.stop(Duration::from_secs(30));
    }
    drop(nats);
    drop(postgres);
    Ok(())
}

/// The topology with three replicas and the migrations, retried while the cluster settles.
async fn set_up(nats_url: &str, database_url: &str) -> anyhow::Result<()> {
    let nats = NatsArgs {
        nats_url: None,
        replicas: 3,
        ack_timeout_ms: 5000,
        events_max_age_secs: 7 * 24 * 3600,
        stored_max_age_secs: 7 * 24 * 3600,
    };
    let database = DatabaseArgs { database_url: None, max_connections: 4 };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = service::connect_and_set_up(
            &Secret::new(nats_url),
            &nats,
            &Secret::new(database_url),
            &database,
            "event-cluster",
        )
        .await;
        match attempt {
            Ok((bus, _pool)) => {
                bus.flush_at_exit().await;
                return Ok(());
            }
            Err(error) if Instant::now() < deadline => {
                tracing::info!(error = %error, "the cluster is settling; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Waits until every stage answers `/health/ready` with 200.
async fn wait_until_ready(
    stages: &[Stage],
    processes: &mut [LocalProcess],
    token: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    callback::install_crypto_provider();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    for (stage, process) in stages.iter().zip(processes.iter_mut()) {
        loop {
            if !process.running() {
                bail!("{} exited at start; see {}", stage.name, process.log.display());
            }
            if token.is_cancelled() {
                bail!("stopped before the cluster was ready");
            }
            let ready = http.get(format!("http://{}/health/ready", stage.addr)).send().await;
            if ready.is_ok_and(|answer| answer.status().is_success()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} is not ready; see {}", stage.name, process.log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Prints the URLs, and writes them (`cluster.json`) and a Prometheus configuration.
fn describe(dir: &Path, stages: &[Stage], nats: &NatsCluster, database_url: &str) -> anyhow::Result<()> {
    println!("event-cluster is running");
    for stage in stages {
        let what = if stage.gateway { "HTTP API, /metrics" } else { "/metrics, /health/ready" };
        println!("  {:<13} http://{:<22} ({what})", stage.name, stage.addr);
    }
    for server in &nats.servers {
        println!("  {:<13} {:<29} (monitoring {})", "nats", server.url, server.monitor_url);
    }
    println!("  {:<13} {database_url}", "postgres");
    println!("  {:<13} {}", "logs", dir.join("logs").display());
    let targets: Vec<String> = stages.iter().map(|stage| stage.addr.clone()).collect();
    let prometheus = format!(
        "# Written by event-cluster: scrape every stage.\nscrape_configs:\n  - job_name: event-service\n    \
         scrape_interval: 5s\n    static_configs:\n      - targets: {}\n",
        serde_json::to_string(&targets)?
    );
    std::fs::write(dir.join("prometheus.yml"), prometheus)?;
    println!("  {:<13} {}", "prometheus", dir.join("prometheus.yml").display());
    let description = json!({
        "gateways": stages.iter().filter(|s| s.gateway).map(|s| format!("http://{}", s.addr)).collect::<Vec<_>>(),
        "stages": stages.iter().map(|s| (s.name.clone(), json!(format!("http://{}", s.addr)))).collect::<serde_json::Map<_, _>>(),
        "nats": nats.url_from(0),
        "postgres": database_url,
    });
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&description)?)?;
    Ok(())
}
