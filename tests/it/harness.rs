//! Starts the service in-process against private servers, and helpers to poke at it.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use async_nats::jetstream;
use event_service::domain::Secret;
use event_service::gateway::Gateway;
use event_service::infra::bus::Bus;
use event_service::infra::local::{LocalNats, LocalPostgres};
use event_service::infra::settings::{
    CallbackArgs, DatabaseArgs, DispatcherArgs, GatewayArgs, NatsArgs, PersisterArgs, ProcessorArgs, PublicArgs,
};
use event_service::service;
use event_service::stages::persister::Persister;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn init_logs() {
    event_service::infra::callback::install_crypto_provider();
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
        }
    });
}

pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/nats/bin/nats-server"))
}

/// Port of the PostgreSQL cluster shared by every test of this run. It is started on a thread
/// that lives as long as the process, so it stops when the test binary exits.
fn shared_postgres_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            remove_stale_clusters();
            // Named after this process, so the next run can tell it is stale and remove it.
            let dir = std::env::temp_dir().join(format!("evsvc-pg-{}", std::process::id()));
            match LocalPostgres::start(&dir, 0, false) {
                Ok(postgres) => {
                    sender.send(Ok(postgres.port)).expect("send port");
                    let _keep = postgres;
                    loop {
                        std::thread::park();
                    }
                }
                Err(error) => sender.send(Err(format!("{error:#}"))).expect("send error"),
            }
        });
        receiver.recv().expect("postgres thread").unwrap_or_else(|error| panic!("cannot start PostgreSQL: {error}"))
    })
}

/// Removes the clusters of earlier test runs whose process is gone: the shared cluster lives
/// until its test binary exits, so that binary cannot clean up after it.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("evsvc-pg-").and_then(|pid| pid.parse::<u32>().ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A new, empty database on the shared cluster.
pub async fn fresh_database() -> String {
    let port = shared_postgres_port();
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    event_service::infra::db::ensure_database(&admin, &name).await.expect("create database");
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

#[derive(Clone)]
pub struct Options {
    pub api_keys: Vec<String>,
    pub ingest_keys: Vec<String>,
    pub rudderstack_secret: Option<String>,
    pub store_timeout_ms: u64,
    pub start_persister: bool,
    pub database_url: Option<String>,
    pub max_batch_events: u16,
    /// Processor workers to start with the app.
    pub processors: usize,
    pub write_keys: Vec<String>,
    pub cors_origins: Vec<String>,
    pub public_rate_limit: u32,
    pub max_inflight_events: u32,
    pub live_max_tails: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            api_keys: vec![],
            ingest_keys: vec![],
            rudderstack_secret: None,
            store_timeout_ms: 5000,
            start_persister: true,
            database_url: None,
            max_batch_events: 1000,
            processors: 0,
            write_keys: vec![],
            cors_origins: vec!["*".to_owned()],
            public_rate_limit: 0,
            max_inflight_events: 20_000,
            live_max_tails: 1000,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    bus: Bus,
    service_pool: PgPool,
    token: CancellationToken,
    persister: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    processors: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    dispatchers: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    projectors: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    pub nats_server: LocalNats,
    /// `EVENT_RETENTION_DAYS` of the next persister started.
    pub retention_days: Option<u32>,
    /// `EVENT_STORED_STREAM` of the next persister started.
    pub stored_stream: bool,
    _dir: tempfile::TempDir,
}

/// The NATS settings of a test app on this server.
fn nats_args(nats_server: &LocalNats) -> NatsArgs {
    NatsArgs {
        nats_url: Some(Secret::new(nats_server.url.as_str())),
        replicas: 1,
        events_max_age_secs: 3600,
        stored_max_age_secs: 3600,
        ack_timeout_ms: 2000,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    init_logs();
    let dir = tempfile::Builder::new().prefix("evsvc-it-").tempdir().expect("temp dir");
    let nats_server = LocalNats::start(&nats_server_bin(), dir.path(), 0).expect("start nats-server");
    let database_url = match options.database_url.clone() {
        Some(url) => url,
        None => fresh_database().await,
    };
    let nats_args = nats_args(&nats_server);
    let database_secret = Secret::new(database_url.clone());
    let database_args = DatabaseArgs { database_url: Some(database_secret.clone()), max_connections: 8 };
    let (bus, service_pool) = service::connect_and_set_up(
        &Secret::new(nats_server.url.as_str()),
        &nats_args,
        &database_secret,
        &database_args,
        "test-service",
    )
    .await
    .expect("set up");
    let gateway_args = GatewayArgs {
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        api_keys: options.api_keys.iter().map(|key| Secret::new(key.as_str())).collect(),
        ingest_keys: options.ingest_keys.iter().map(|key| Secret::new(key.as_str())).collect(),
        allow_unauthenticated: false,
        rudderstack_secret: options.rudderstack_secret.as_deref().map(Secret::from),
        max_batch_events: options.max_batch_events,
        max_body_bytes: 1024 * 1024,
        max_batch_body_bytes: 16 * 1024 * 1024,
        store_timeout_ms: options.store_timeout_ms,
        max_inflight_events: options.max_inflight_events,
        live_max_tails: options.live_max_tails,
        snapshot_every: 10,
        public: PublicArgs {
            write_keys: options.write_keys.iter().map(|key| Secret::new(key.as_str())).collect(),
            cors_origins: options.cors_origins.clone(),
            rate_limit: options.public_rate_limit,
            ..PublicArgs::default()
        },
    };
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let gateway =
        Gateway::build(bus.clone(), service_pool.clone(), &gateway_args, token.clone()).await.expect("gateway");
    tokio::spawn(gateway.run(listener, token.clone()));

    let js = jetstream::new(async_nats::connect(&nats_server.url).await.expect("test nats client"));
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_lazy(&database_url).expect("pool");
    let mut app = TestApp {
        base,
        http: reqwest::Client::new(),
        js,
        pool,
        bus,
        service_pool,
        token,
        persister: None,
        processors: Vec::new(),
        dispatchers: Vec::new(),
        projectors: Vec::new(),
        nats_server,
        retention_days: None,
        stored_stream: true,
        _dir: dir,
    };
    if options.start_persister {
        app.start_persister().await;
    }
    for _ in 0..options.processors {
        app.start_processor().await;
    }
    app
}

/// Processor settings for tests: retries after milliseconds.
pub fn processor_args() -> ProcessorArgs {
    ProcessorArgs { batch_size: 64, concurrency: 16, retry_delay_ms: 20, retry_max_delay_ms: 200 }
}

/// Dispatcher settings for tests.
pub fn dispatcher_args() -> DispatcherArgs {
    DispatcherArgs {
        sender_concurrency: 32,
        sender_subscription_concurrency: 8,
        delivery_timeout_ms: 2000,
        disable_after_secs: 3600,
    }
}

/// Callbacks may reach the test's receivers on loopback.
pub fn callback_args() -> CallbackArgs {
    CallbackArgs { deny_private: false, allowed_nets: vec!["127.0.0.0/8".parse().expect("net")] }
}

impl TestApp {
    pub async fn start_persister(&mut self) {
        assert!(self.persister.is_none(), "persister already running");
        let token = self.token.child_token();
        let persister = Persister::build(
            self.bus.clone(),
            self.service_pool.clone(),
            &PersisterArgs { batch_size: 500, retention_days: self.retention_days, stored_stream: self.stored_stream },
        )
        .await
        .expect("persister");
        let run = persister.run(token.clone());
        let handle = tokio::spawn(async move { Ok(run.await?) });
        self.persister = Some((token, handle));
    }

    /// The service's own NATS connection, for subscribing and serving in tests.
    pub fn bus_client(&self) -> &async_nats::Client {
        self.bus.client()
    }

    /// Applies the JetStream topology again, as every process does when it starts.
    pub async fn apply_topology(&self) {
        event_service::infra::topology::apply(&self.bus, &nats_args(&self.nats_server))
            .await
            .expect("topology applied");
    }

    /// Starts one more processor worker (processor stage and replayer).
    pub async fn start_processor(&mut self) {
        let token = self.token.child_token();
        let (bus, pool, worker_token) = (self.bus.clone(), self.service_pool.clone(), token.clone());
        let handle = tokio::spawn(async move {
            Ok(service::run_processing(bus, pool, &processor_args(), &callback_args(), worker_token).await?)
        });
        self.processors.push((token, handle));
        // The worker subscribes to registry changes as it starts.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Starts one more dispatcher + sender.
    pub async fn start_dispatcher(&mut self, settings: DispatcherArgs, callbacks: CallbackArgs) {
        let token = self.token.child_token();
        let (bus, pool, worker_token) = (self.bus.clone(), self.service_pool.clone(), token.clone());
        let handle =
            tokio::spawn(
                async move { Ok(service::run_dispatching(bus, pool, &settings, &callbacks, worker_token).await?) },
            );
        self.dispatchers.push((token, handle));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Starts one more projector (snapshots every 10 applied events); the first one started
    /// holds the pin, later ones stand by.
    pub async fn start_projector(&mut self) {
        let token = self.token.child_token();
        let (bus, pool, worker_token) = (self.bus.clone(), self.service_pool.clone(), token.clone());
        let handle = tokio::spawn(async move {
            let settings = event_service::infra::settings::ProjectorArgs { snapshot_every: 10 };
            Ok(service::run_projector(bus, pool, &settings, worker_token).await?)
        });
        self.projectors.push((token, handle));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// A crash of the oldest projector.
    pub async fn kill_projector(&mut self) {
        let (_token, handle) = self.projectors.remove(0);
        handle.abort();
        let _ = handle.await;
    }

    /// A crash of every dispatcher: gone mid-delivery, acking nothing more.
    pub async fn kill_dispatchers(&mut self) {
        for (_token, handle) in self.dispatchers.drain(..) {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Stops every processor worker gracefully.
    pub async fn stop_processors(&mut self) {
        for (token, handle) in self.processors.drain(..) {
            token.cancel();
            handle.await.expect("join").expect("processor result");
        }
    }

    /// Waits until the event has one of `statuses`; returns the stored event.
    pub async fn wait_for_status(&self, event_id: &str, statuses: &[&str]) -> Value {
        let path = format!("/api/v1/events/{event_id}");
        let reached = wait_until(Duration::from_secs(15), || async {
            let (status, event) = self.get(&path).await;
            (status == StatusCode::OK && statuses.contains(&event["status"].as_str().unwrap_or(""))).then_some(event)
        })
        .await;
        match reached {
            Some(event) => event,
            None => {
                let (_, event) = self.get(&path).await;
                let results: Vec<(String, i32, String, Option<String>)> = sqlx::query_as(
                    "SELECT processor_name, attempt, status, message FROM event.processing_results \
                     WHERE event_id = $1::uuid ORDER BY result_id",
                )
                .bind(event_id)
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
                panic!("event {event_id} did not reach {statuses:?}: {event}\nresults: {results:?}")
            }
        }
    }

    /// Creates an event over HTTP and returns its id.
    pub async fn create(&self, body: Value) -> String {
        let (status, created) = self.post("/api/v1/events/create", &body).await;
        assert!(status.is_success(), "create: {status} {created}");
        created["event_id"].as_str().expect("event_id").to_owned()
    }

    /// Starts nats-server again on the same port and store, after `nats_server.stop()`.
    pub fn restart_nats(&mut self) {
        let port: u16 = self.nats_server.url.rsplit(':').next().and_then(|port| port.parse().ok()).expect("port");
        self.nats_server = LocalNats::start(&nats_server_bin(), self._dir.path(), port).expect("restart nats-server");
    }

    /// Freezes nats-server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause_nats(&self) {
        // SAFETY: signalling a child we started.
        unsafe { libc::kill(self.nats_server.pid() as i32, libc::SIGSTOP) };
    }

    pub fn resume_nats(&self) {
        // SAFETY: signalling a child we started.
        unsafe { libc::kill(self.nats_server.pid() as i32, libc::SIGCONT) };
    }

    /// A crash: the persister vanishes mid-batch, acking nothing more.
    pub async fn kill_persister(&mut self) {
        let (_token, handle) = self.persister.take().expect("persister running");
        handle.abort();
        let _ = handle.await;
    }

    /// Graceful stop: the persister finishes its batch and exits.
    pub async fn stop_persister(&mut self) {
        let (token, handle) = self.persister.take().expect("persister running");
        token.cancel();
        handle.await.expect("join").expect("persister result");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self.http.post(self.url(path)).json(body).send().await.expect("request");
        split(response).await
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let response = self.http.post(self.url(path)).body(body).send().await.expect("request");
        split(response).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("request");
        split(response).await
    }

    pub async fn count_events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM event.events").fetch_one(&self.pool).await.expect("count")
    }

    /// Waits until at least `expected` events are stored; returns the count.
    pub async fn wait_for_events(&self, expected: i64, timeout: Duration) -> i64 {
        let pool = self.pool.clone();
        wait_until(timeout, || {
            let pool = pool.clone();
            async move {
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM event.events").fetch_one(&pool).await.unwrap_or(-1);
                (count >= expected).then_some(count)
            }
        })
        .await
        .unwrap_or_else(|| panic!("fewer than {expected} events stored within {timeout:?}"))
    }

    /// Every message in DEADLETTER, oldest first.
    pub async fn dead_letters(&self) -> Vec<jetstream::message::StreamMessage> {
        let stream = self.js.get_stream("DEADLETTER").await.expect("deadletter stream");
        let last = stream.get_info().await.expect("info").state.last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                messages.push(message);
            }
        }
        messages
    }

    pub async fn wait_for_dead_letters(&self, expected: usize) -> Vec<jetstream::message::StreamMessage> {
        for _ in 0..200 {
            let letters = self.dead_letters().await;
            if letters.len() >= expected {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {expected} dead letters");
    }

    /// Publishes straight to JetStream, as a NATS-native producer would.
    pub async fn publish(&self, subject: &str, headers: async_nats::HeaderMap, body: Vec<u8>) -> u64 {
        self.js
            .publish_with_headers(subject.to_owned(), headers, body.into())
            .await
            .expect("publish")
            .await
            .expect("puback")
            .sequence
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn split(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Polls `check` until it returns Some or `timeout` passes.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
