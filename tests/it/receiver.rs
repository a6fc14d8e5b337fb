//! An in-process HTTP receiver for webhook tests: records every request and answers with the
//! status a test scripts per path and call number. Paths starting with `slow` answer after
//! 800 ms.

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
        let shared = Shared { received: Arc::default(), calls: Arc::default(), script: Arc::new(script) };
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

    /// The paths hit for one event, in arrival order.
    pub fn paths_for(&self, event_id: &str) -> Vec<String> {
        self.received().into_iter().filter(|r| r.body["event_id"] == event_id).map(|r| r.path).collect()
    }
}

async fn record(State(shared): State<Shared>, Path(path): Path<String>, headers: HeaderMap, raw: Bytes) -> StatusCode {
    let call = {
        let mut calls = shared.calls.lock().unwrap();
        let count = calls.entry(path.clone()).or_default();
        *count += 1;
        *count
    };
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received { path: path.clone(), headers, body, raw });
    if path.starts_with("slow") {
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    }
    (shared.script)(&path, call)
}
