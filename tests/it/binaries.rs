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
