//! The binaries as operators run them: `event-service` exporting spans to an OTLP endpoint
//! and logging JSON, and `scripts/cluster` (every stage its own process, three nats-servers).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{fresh_database, nats_server_bin, wait_until};
use crate::receiver::Receiver;
use event_service::infra::local::LocalNats;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An OTLP/HTTP receiver: keeps the body of every `POST /v1/traces`.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let kept = Arc::clone(&bodies);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock().unwrap().push(body);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_otlp_endpoint_and_logs_name_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let nats = LocalNats::start(&nats_server_bin(), dir.path(), 0).unwrap();
    let database = fresh_database().await;
    let (otlp, exported) = otlp_receiver().await;
    let hooks = Receiver::start().await;
    let port = free_port();
    let mut service = tokio::process::Command::new(env!("CARGO_BIN_EXE_event-service"))
        .env("NATS_URL", &nats.url)
        .env("DATABASE_URL", &database)
        .env("EVENT_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("EVENT_CALLBACK_ALLOWED_NETS", "127.0.0.0/8")
        .env("EVENT_LOG_FORMAT", "json")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut stdout = BufReader::new(service.stdout.take().unwrap()).lines();
    let kept = Arc::clone(&lines);
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    let base = format!("http://127.0.0.1:{port}");
    event_service::infra::callback::install_crypto_provider();
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(60), || async {
        let ready = http.get(format!("{base}/health/ready")).send().await;
        ready.is_ok_and(|answer| answer.status() == StatusCode::OK).then_some(())
    })
    .await
    .expect("event-service gets ready");
    let processor = json!({"processor_name": "flaky", "processor_type": "webhook", "max_retries": 0,
                           "config": {"url": hooks.url("fail")}, "filters": {"event_type": "otel.*"}});
    let answer = http.post(format!("{base}/api/v1/events/processors")).json(&processor).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let trace_id = "5e1f2a3b4c5d6e7f8091a2b3c4d5e6f7";
    let answer = http
        .post(format!("{base}/api/v1/events/create"))
        .header("traceparent", format!("00-{trace_id}-1122334455667788-01"))
        .json(&json!({"event_type": "otel.checked"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);

    let raw_id = hex_bytes(trace_id);
    let exported_trace = wait_until(Duration::from_secs(20), || async {
        let bodies = exported.lock().unwrap().clone();
        let spans = bodies.iter().filter(|body| body.windows(16).any(|window| window == raw_id.as_slice())).count();
        (spans > 0).then_some(())
    })
    .await;
    assert!(exported_trace.is_some(), "no exported span names the producer's trace");
    let logged = wait_until(Duration::from_secs(20), || async {
        let lines = lines.lock().unwrap().clone();
        lines.into_iter().find(|line| line.contains("processor did not succeed"))
    })
    .await
    .unwrap_or_else(|| panic!("the failed run is logged:\n{}", lines.lock().unwrap().join("\n")));
    let logged: Value = serde_json::from_str(&logged).unwrap();
    assert_eq!(logged["trace_id"], trace_id, "{logged}");
    let callback = hooks.received().into_iter().next().expect("the processor was called");
    assert!(callback.headers["traceparent"].to_str().unwrap().contains(trace_id));
}

/// `scripts/cluster` running, and stopped (as Ctrl-C does) when dropped.
struct Cluster {
    child: tokio::process::Child,
    description: Value,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    /// A failed test shows the end of every process's log, which goes with the temporary
    /// directory: CI keeps nothing else of a run.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = self.dir.path().join("logs");
        let mut paths: Vec<_> =
            std::fs::read_dir(&logs).into_iter().flatten().flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("==> {} (last {} lines)", path.display(), tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("evsvc-cluster-").tempdir().unwrap();
        let binaries = std::path::Path::new(env!("CARGO_BIN_EXE_event-cluster")).parent().unwrap().to_owned();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster");
        let child = tokio::process::Command::new(script)
            .env("EVENT_BIN_DIR", binaries)
            .env("EVENT_CLUSTER_DIR", dir.path())
            .env("EVENT_CLUSTER_PORT", "0")
            .env("NATS_SERVER_BIN", nats_server_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let described = dir.path().join("cluster.json");
        let mut cluster = Self { child, description: Value::Null, dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let description = loop {
            assert!(cluster.child.try_wait().unwrap().is_none(), "scripts/cluster exited at start");
            if let Some(description) =
                std::fs::read(&described).ok().and_then(|text| serde_json::from_slice::<Value>(&text).ok())
            {
                break description;
            }
            assert!(tokio::time::Instant::now() < deadline, "every stage of the cluster gets ready in time");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        cluster.description = description;
        cluster
    }

    fn url(&self, stage: &str) -> String {
        self.description["stages"][stage].as_str().unwrap().to_owned()
    }

    /// Ctrl-C, and the exit status.
    async fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        tokio::time::timeout(Duration::from_secs(90), self.child.wait()).await.expect("stops in time").unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_runs_every_stage_as_a_process_on_three_nats_servers() {
    let cluster = Cluster::start().await;
    event_service::infra::callback::install_crypto_provider();
    let http = reqwest::Client::new();
    let stages = cluster.description["stages"].as_object().unwrap().clone();
    assert_eq!(stages.len(), 9, "{stages:?}");

    // In through one gateway, out through the other.
    let created = http
        .post(format!("{}/api/v1/events/create", cluster.url("gateway-1")))
        .json(&json!({"event_type": "cluster.checked", "user_id": "u-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK, "stored before the answer (read-your-writes)");
    let event_id = created.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_owned();
    let read = http.get(format!("{}/api/v1/events/{event_id}", cluster.url("gateway-2"))).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.json::<Value>().await.unwrap()["event_type"], "cluster.checked");

    for (name, url) in &stages {
        let url = url.as_str().unwrap();
        let ready = http.get(format!("{url}/health/ready")).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::OK, "{name}");
        let metrics = http.get(format!("{url}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), StatusCode::OK, "{name}");
        let text = metrics.text().await.unwrap();
        assert!(text.contains("# TYPE event_db_pool_connections gauge"), "{name}: {text}");
    }
    let persister =
        http.get(format!("{}/metrics", cluster.url("persister"))).send().await.unwrap().text().await.unwrap();
    assert!(persister.contains("event_stage_messages_total{stage=\"persister\",outcome=\"ack\"} 1"), "{persister}");
    let gateway = http.get(format!("{}/metrics", cluster.url("gateway-1"))).send().await.unwrap().text().await.unwrap();
    assert!(gateway.contains("event_events_accepted_total{path=\"create\"} 1"), "{gateway}");

    // Every stream on three replicas.
    let nats_url = cluster.description["nats"].as_str().unwrap().to_owned();
    let servers: Vec<&str> = nats_url.split(',').collect();
    let client = async_nats::connect(servers.as_slice()).await.unwrap();
    let mut events = async_nats::jetstream::new(client).get_stream("EVENTS").await.unwrap();
    let info = events.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.cluster.as_ref().map(|cluster| cluster.replicas.len()), Some(2), "a leader and two replicas");

    let status = cluster.interrupt().await;
    assert!(status.success(), "Ctrl-C stops the cluster cleanly: {status}");
}

#[test]
fn the_image_ships_every_binary_and_compose_runs_every_stage() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let manifest = read("Cargo.toml");
    let binaries: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.strip_prefix("name = \"event-"))
        .filter_map(|rest| rest.strip_suffix('"'))
        .collect();
    assert!(binaries.len() >= 7, "{binaries:?}");
    let dockerfile = read("Dockerfile");
    for binary in &binaries {
        assert!(dockerfile.contains(&format!("target/release/event-{binary}")), "the image lacks event-{binary}");
    }
    let compose = read("compose.yaml");
    let prometheus = read("deploy/prometheus.yml");
    for (stage, instances) in [("gateway", 2), ("persister", 1), ("processor", 2), ("dispatcher", 2), ("projector", 2)]
    {
        assert!(compose.contains(&format!("entrypoint: [\"event-{stage}\"]")), "compose runs no {stage}");
        let services: Vec<String> = match instances {
            1 => vec![stage.to_owned()],
            n => (1..=n).map(|index| format!("{stage}-{index}")).collect(),
        };
        for service in services {
            assert!(compose.contains(&format!("\n  {service}:\n")), "compose has no service {service}");
            assert!(prometheus.contains(&format!("\"{service}:")), "Prometheus does not scrape {service}");
        }
    }
    assert!(compose.contains("EVENT_STREAM_REPLICAS: \"3\""));
}
