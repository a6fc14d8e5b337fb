//! Request bodies as clients really send them, and what the public endpoints add for browsers:
//! compressed bodies, bodies over the limit, `text/plain` beacons, CORS, the per-client rate
//! limit.

use std::io::Write;
use std::time::Duration;

use flate2::Compression;
use flate2::write::{GzEncoder, ZlibEncoder};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Options, spawn_app, spawn_app_with};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_deflate_bodies_are_read_and_bombs_are_refused() {
    let app = spawn_app().await;
    let body = json!({"event_type": "compressed.gzip", "user_id": "u"}).to_string();
    let response = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut deflate = ZlibEncoder::new(Vec::new(), Compression::default());
    deflate.write_all(json!({"event_type": "compressed.deflate"}).to_string().as_bytes()).unwrap();
    let response = app
        .http
        .post(app.url("/api/v1/events/frontend"))
        .header("content-encoding", "deflate")
        .body(deflate.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    app.wait_for_events(2, Duration::from_secs(10)).await;

    // 64 MB of zeros in 64 KB: the limit applies to what it inflates to.
    let bomb = gzip(&vec![0u8; 64 * 1024 * 1024]);
    assert!(bomb.len() < 1024 * 1024);
    let started = std::time::Instant::now();
    let response = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "payload_too_large");
    assert!(started.elapsed() < Duration::from_secs(15));

    let response = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("content-encoding", "gzip")
        .body("not gzip at all")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_far_too_much_reads_the_413() {
    let app = spawn_app().await;
    // 20 MB to an endpoint that takes 1 MiB: the answer arrives instead of a reset.
    let body = format!("{{\"event_type\": \"big\", \"data\": {{\"blob\": \"{}\"}}}}", "x".repeat(20 * 1024 * 1024));
    let response =
        app.http.post(app.url("/api/v1/events/create")).body(body).send().await.expect("an answer, not a reset");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "payload_too_large");
    assert_eq!(app.count_events().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacons_and_cors_reach_the_public_endpoints_only() {
    let app =
        spawn_app_with(Options { cors_origins: vec!["https://shop.example.com".into()], ..Options::default() }).await;
    // navigator.sendBeacon posts text/plain.
    let response = app
        .http
        .post(app.url("/api/v1/events/frontend"))
        .header("content-type", "text/plain;charset=UTF-8")
        .header("origin", "https://shop.example.com")
        .body(json!({"event_type": "beacon.sent"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().get("access-control-allow-origin").unwrap(), "https://shop.example.com");

    let preflight = |path: &'static str, origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type, authorization")
            .send()
    };
    for path in ["/api/v1/events/frontend", "/api/v1/events/frontend/batch", "/v1/track", "/v1/batch"] {
        let response = preflight(path, "https://shop.example.com").await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        let headers = response.headers();
        assert_eq!(headers.get("access-control-allow-origin").unwrap(), "https://shop.example.com", "{path}");
        let allowed = headers.get("access-control-allow-headers").unwrap().to_str().unwrap().to_lowercase();
        assert!(allowed.contains("content-type") && allowed.contains("authorization"), "{path}: {allowed}");
    }
    // Another origin is not allowed; management endpoints never answer CORS.
    let other = preflight("/api/v1/events/frontend", "https://evil.example.net").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let management = preflight("/api/v1/events/create", "https://shop.example.com").await.unwrap();
    assert!(management.headers().get("access-control-allow-origin").is_none());
    let posted = app
        .http
        .post(app.url("/api/v1/events/create"))
        .header("origin", "https://shop.example.com")
        .json(&json!({"event_type": "from.backend"}))
        .send()
        .await
        .unwrap();
    assert!(posted.status().is_success());
    assert!(posted.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_public_rate_limit_gets_429() {
    let app = spawn_app_with(Options { public_rate_limit: 3, ..Options::default() }).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = app.http.post(app.url("/api/v1/events/frontend")).json(&json!({"event_type": "rl"})).send();
        let response = response.await.unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after: u64 = response.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
            assert!((1..=1).contains(&retry_after), "{retry_after}");
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["code"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    assert_eq!(statuses.iter().filter(|status| **status == 200).count(), 3, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Management endpoints are not limited.
    for _ in 0..5 {
        assert!(app.post("/api/v1/events/create", &json!({"event_type": "backend.rl"})).await.0.is_success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_carry_a_timestamp() {
    let app = spawn_app().await;
    for path in ["/health", "/api/v1/events/frontend/health"] {
        let (status, health) = app.get(path).await;
        assert_eq!(status, StatusCode::OK);
        let timestamp = health["timestamp"].as_str().unwrap_or_else(|| panic!("{path}: {health}"));
        assert!(chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(), "{timestamp}");
    }
}
