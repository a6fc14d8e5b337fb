//! An in-process HTTP receiver for webhook tests: records every request and answers with the
//! status a test scripts per path and call number. Paths starting with `slow` answer after
//! 800 ms; paths starting with `busy` answer their first call 429 with `Retry-After: 1`; paths
//! starting with `stall` never answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Bytes,
}

type Script = Arc<dyn Fn(&str, usize) -> StatusCode + Send + Sync>;

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    arrivals: Arc<Mutex<Vec<(String, std::time::Instant)>>>,
    script: Script,
}

pub struct Receiver {
    pub base: String,
    shared: Shared,
}

impl Receiver {
    /// Paths starting with `fail` answer 500, the others 200.
    pub async fn start() -> Self {
        Self::scripted(
            |path, _| if path.starts_with("fail") { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK },
        )
        .await
    }

    /// `script(path, call)` (call counts from 1 per path) decides each answer.
    pub async fn scripted(script: impl Fn(&str, usize) -> StatusCode + Send + Sync + 'static) -> Self {
        let shared = Shared {
            received: Arc::default(),
            calls: Arc::default(),
            arrivals: Arc::default(),
            script: Arc::new(script),
        };
        let app = axum::Router::new().route("/{*path}", post(record)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, shared }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// When each request for a path arrived, in order.
    pub fn arrivals(&self, path: &str) -> Vec<std::time::Instant> {
        self.shared.arrivals.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, at)| *at).collect()
    }

    /// The paths hit for one event, in arrival order.
    pub fn paths_for(&self, event_id: &str) -> Vec<String> {
        self.received().into_iter().filter(|r| r.body["event_id"] == event_id).map(|r| r.path).collect()
    }
}

async fn record(
    State(shared): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let call = {
        let mut calls = shared.calls.lock().unwrap();
        let count = calls.entry(path.clone()).or_default();
        *count += 1;
        *count
    };
    shared.arrivals.lock().unwrap().push((path.clone(), std::time::Instant::now()));
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received { path: path.clone(), headers, body, raw });
    if path.starts_with("stall") {
        std::future::pending::<()>().await;
    }
    if path.starts_with("slow") {
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    }
    if path.starts_with("busy") && call == 1 {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
    }
    (shared.script)(&path, call).into_response()
}
