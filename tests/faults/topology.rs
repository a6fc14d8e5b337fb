//! The production shape on loopback: nats-server (alone, or three in a cluster), PostgreSQL,
//! and every stage a process of its own (the debug binaries this package builds): two
//! gateways, a persister, a processor, a dispatcher (with its sender) and a projector. Plus a
//! webhook receiver in this process that records every event id delivered to it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_service::infra::local::{LocalNats, LocalPostgres, LocalProcess, NatsCluster, free_port};
use serde_json::{Value, json};

/// Where the events travel.
pub enum Nats {
    Single(LocalNats),
    Cluster(NatsCluster),
}

impl Nats {
    pub fn url(&self) -> String {
        match self {
            Nats::Single(server) => server.url.clone(),
            Nats::Cluster(cluster) => cluster.url_from(0),
        }
    }
}

/// A stage process and what it takes to start it again.
struct Stage {
    binary: &'static str,
    addr: String,
    process: Option<LocalProcess>,
}

pub struct Topology {
    pub dir: tempfile::TempDir,
    pub nats: Nats,
    pub postgres: LocalPostgres,
    pub database_url: String,
    pub pool: sqlx::PgPool,
    pub http: reqwest::Client,
    stages: Vec<(String, Stage)>,
    /// Event ids the webhook receiver got.
    pub delivered: Arc<Mutex<HashMap<String, u32>>>,
    receiver_url: String,
}

pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/nats/bin/nats-server"))
}

/// The folder of this package's binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_event-gateway")).parent().expect("bin dir").to_owned()
}

const STAGES: &[(&str, &str)] = &[
    ("gateway-1", "event-gateway"),
    ("gateway-2", "event-gateway"),
    ("persister", "event-persister"),
    ("processor", "event-processor"),
    ("dispatcher", "event-dispatcher"),
    ("projector", "event-projector"),
];

impl Topology {
    /// Servers, the schema, every stage ready, a subscription to `fault.>` at the receiver.
    pub async fn start(cluster: bool) -> Self {
        event_service::infra::callback::install_crypto_provider();
        let mut dir = tempfile::Builder::new().prefix("evsvc-faults-").tempdir().expect("temp dir");
        if std::env::var_os("EVENT_CHAOS_SUMMARY").is_some() {
            // A soak keeps its logs and data for a look afterwards.
            dir.disable_cleanup(true);
            eprintln!("chaos: logs and data under {}", dir.path().display());
        }
        let nats = match cluster {
            false => Nats::Single(LocalNats::start(&nats_server_bin(), &dir.path().join("nats"), 0).expect("nats")),
            true => Nats::Cluster(NatsCluster::start(&nats_server_bin(), dir.path(), 3).expect("nats cluster")),
        };
        let postgres = LocalPostgres::start(&dir.path().join("postgres"), 0, false).expect("postgres");
        event_service::infra::db::ensure_database(&postgres.url("postgres"), "event_service").await.expect("database");
        let database_url = postgres.url("event_service");
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_lazy(&database_url).expect("pool");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
        let delivered: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let receiver_url = receiver(delivered.clone()).await;
        let stages = STAGES
            .iter()
            .map(|(name, binary)| {
                let addr = format!("127.0.0.1:{}", free_port().expect("port"));
                ((*name).to_owned(), Stage { binary, addr, process: None })
            })
            .collect();
        let mut topology = Self {
            dir,
            nats,
            postgres,
            database_url,
            pool,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
            stages,
            delivered,
            receiver_url,
        };
        set_up(&topology.nats.url(), &topology.database_url, if cluster { 3 } else { 1 }).await;
        for index in 0..topology.stages.len() {
            let name = topology.stages[index].0.clone();
            topology.launch(&name);
        }
        for index in 0..topology.stages.len() {
            let name = topology.stages[index].0.clone();
            topology.wait_ready(&name).await;
        }
        let subscription = json!({"subscription_id": "faults", "event_types": ["fault.>"],
                                  "callback_url": format!("{}/hook", topology.receiver_url)});
        let created = topology.http.post(topology.url("gateway-1", "/api/v1/events/subscriptions")).json(&subscription);
        let created = created.send().await.expect("subscribe");
        assert!(created.status().is_success(), "{}", created.text().await.unwrap_or_default());
        // Dispatchers reload on a notification.
        tokio::time::sleep(Duration::from_millis(500)).await;
        topology
    }

    pub fn url(&self, stage: &str, path: &str) -> String {
        format!("http://{}{path}", self.stage(stage).addr)
    }

    fn stage(&self, name: &str) -> &Stage {
        &self.stages.iter().find(|(stage, _)| stage == name).expect("a stage of the topology").1
    }

    fn stage_mut(&mut self, name: &str) -> &mut Stage {
        &mut self.stages.iter_mut().find(|(stage, _)| stage == name).expect("a stage of the topology").1
    }

    /// Starts a stage's process.
    pub fn launch(&mut self, name: &str) {
        let (nats_url, database_url) = (self.nats.url(), self.database_url.clone());
        let replicas = if matches!(self.nats, Nats::Cluster(_)) { "3" } else { "1" };
        let log = self.dir.path().join("logs").join(format!("{name}.log"));
        let stage = self.stage_mut(name);
        let mut command = Command::new(bin_dir().join(stage.binary));
        let address_variable = if stage.binary == "event-gateway" { "EVENT_HTTP_ADDR" } else { "EVENT_METRICS_ADDR" };
        command
            .env("NATS_URL", nats_url)
            .env("DATABASE_URL", database_url)
            .env("EVENT_STREAM_REPLICAS", replicas)
            .env("EVENT_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env("EVENT_CALLBACK_ALLOWED_NETS", "127.0.0.0/8")
            .env(address_variable, &stage.addr);
        stage.process = Some(LocalProcess::spawn(name, command, &log).expect("spawn a stage"));
    }

    /// kill -9.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut process) = self.stage_mut(name).process.take() {
            process.kill();
        }
    }

    /// Waits until the stage answers `/health/ready` with 200.
    pub async fn wait_ready(&mut self, name: &str) {
        let url = self.url(name, "/health/ready");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(process) = self.stage_mut(name).process.as_mut() {
                assert!(process.running(), "{name} exited:\n{}", tail(&process.log));
            }
            let ready = self.http.get(&url).send().await;
            if ready.is_ok_and(|answer| answer.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} is not ready in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The gateways' URLs, for producers that fail over between them.
    pub fn gateways(&self) -> Vec<String> {
        vec![self.url("gateway-1", ""), self.url("gateway-2", "")]
    }

    /// The log files, for a failure message.
    pub fn logs(&self) -> String {
        self.dir.path().join("logs").display().to_string()
    }
}

/// Streams and schema before the stages start (as `event-service setup` does): a cluster that
/// has just formed may refuse replicated streams for a moment, so this tries again.
async fn set_up(nats_url: &str, database_url: &str, replicas: usize) {
    use event_service::domain::Secret;
    use event_service::infra::settings::{DatabaseArgs, NatsArgs};
    let nats = NatsArgs {
        nats_url: None,
        replicas,
        ack_timeout_ms: 5000,
        events_max_age_secs: 3600,
        stored_max_age_secs: 3600,
    };
    let database = DatabaseArgs { database_url: None, max_connections: 2 };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (nats_url, database_url) = (Secret::new(nats_url), Secret::new(database_url));
        match event_service::service::connect_and_set_up(&nats_url, &nats, &database_url, &database, "faults").await {
            Ok((bus, _pool)) => return bus.flush_at_exit().await,
            Err(error) => assert!(Instant::now() < deadline, "cannot set up: {error}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The last lines of a log, for a failure message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A webhook receiver: counts each event id it is sent, answers 204.
async fn receiver(delivered: Arc<Mutex<HashMap<String, u32>>>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let delivered = delivered.clone();
            async move {
                if let Ok(event) = serde_json::from_slice::<Value>(&body)
                    && let Some(id) = event["event_id"].as_str()
                {
                    *delivered.lock().expect("lock").entry(id.to_owned()).or_default() += 1;
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}
