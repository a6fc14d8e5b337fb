//! The real clients people already use, unmodified, against the service: the RudderStack and
//! Segment Python SDKs, the CloudEvents Python SDK, httpx sending too much, and a headless
//! Chromium on another origin. `./scripts/test` installs them (Python packages in a venv under
//! `.tools/pyclients`, Debian's `chromium`) and says where they are.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Options, TestApp, spawn_app_with, wait_until};

/// A client the test script installs; a clear failure when it is not there.
fn installed(variable: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default));
    assert!(path.exists(), "{} is missing: run ./scripts/test, which installs the real clients", path.display());
    path
}

/// Runs a Python script with the SDK venv; panics with its output when it fails.
pub(crate) async fn python(script: &str, env: &[(&str, &str)]) -> String {
    let interpreter = installed("EVENT_TEST_PYTHON", ".tools/pyclients/bin/python");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.py");
    std::fs::write(&path, script).unwrap();
    let mut command = tokio::process::Command::new(interpreter);
    command.arg(&path).envs(env.iter().copied()).stdin(Stdio::null()).kill_on_drop(true);
    let output =
        tokio::time::timeout(Duration::from_secs(120), command.output()).await.expect("client in time").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the client failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

async fn stored(app: &TestApp, message_id: &str) -> Option<(String, Option<String>, Value, String)> {
    sqlx::query_as(
        "SELECT event_type, user_id, data, event_category FROM event.events WHERE metadata->>'messageId' = $1",
    )
    .bind(message_id)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
}

const SDKS: &str = r#"
import os, sys
from rudderstack.analytics import Client as Rudder
from segment.analytics import Client as Segment

base, key = os.environ["BASE_URL"], os.environ["WRITE_KEY"]
errors = []
def failed(error, items):
    errors.append(repr(error))

# RudderStack: queued, gzip-compressed batches, Basic auth with the write key.
rudder = Rudder(write_key=key, host=base, on_error=failed, max_retries=1)
rudder.track(user_id="rs-user", event="Order Completed", properties={"total": 42}, message_id="rs-track")
rudder.identify(user_id="rs-user", traits={"plan": "pro"}, message_id="rs-identify")
rudder.page(user_id="rs-user", name="Pricing", properties={"path": "/pricing"}, message_id="rs-page")
rudder.flush()
rudder.join()

# Segment: one request per call (sync mode raises on anything but 200).
segment = Segment(write_key=key, host=base, sync_mode=True, on_error=failed)
segment.track(user_id="sg-user", event="Signup Form Submitted", properties={"plan": "team"}, message_id="sg-track")
segment.group(user_id="sg-user", group_id="acme", traits={"name": "Acme"}, message_id="sg-group")
segment.alias(previous_id="anon-1", user_id="sg-user", message_id="sg-alias")
segment.screen(user_id="sg-user", name="Checkout", message_id="sg-screen")

if errors:
    print(errors)
    sys.exit(1)
print("sent")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rudderstack_and_segment_sdks_send_to_the_tracking_api() {
    let app = spawn_app_with(Options { write_keys: vec!["wk-sdk".into()], ..Options::default() }).await;
    python(SDKS, &[("BASE_URL", &app.base), ("WRITE_KEY", "wk-sdk")]).await;
    app.wait_for_events(7, Duration::from_secs(20)).await;
    let expect = [
        ("rs-track", "Order Completed", "rs-user", "user_action"),
        ("rs-identify", "identify", "rs-user", "user_action"),
        ("rs-page", "Pricing", "rs-user", "page_view"),
        ("sg-track", "Signup Form Submitted", "sg-user", "form_submit"),
        ("sg-group", "group", "sg-user", "user_action"),
        ("sg-alias", "alias", "sg-user", "user_action"),
        ("sg-screen", "Checkout", "sg-user", "page_view"),
    ];
    for (message_id, event_type, user, category) in expect {
        let (stored_type, stored_user, _, stored_category) =
            stored(&app, message_id).await.unwrap_or_else(|| panic!("{message_id} is not stored"));
        assert_eq!(
            (stored_type.as_str(), stored_user.as_deref(), stored_category.as_str()),
            (event_type, Some(user), category),
            "{message_id}"
        );
    }
    assert_eq!(stored(&app, "rs-track").await.unwrap().2["total"], 42);
    assert_eq!(stored(&app, "rs-identify").await.unwrap().2["plan"], "pro");
    assert_eq!(stored(&app, "sg-group").await.unwrap().2["name"], "Acme");

    // A wrong write key: the SDK is refused.
    let refused = r#"
import os, sys
from segment.analytics import Client
try:
    Client(write_key="wrong", host=os.environ["BASE_URL"], sync_mode=True).track(user_id="x", event="e")
except Exception as error:
    print(getattr(error, "status", error))
    sys.exit(0)
sys.exit(1)
"#;
    let status = python(refused, &[("BASE_URL", &app.base)]).await;
    assert_eq!(status.trim(), "401");
}

const CLOUDEVENTS: &str = r#"
import json, os
import httpx
from cloudevents.core.v1.event import CloudEvent
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.bindings.http import to_structured, to_binary

url = os.environ["BASE_URL"] + "/api/v1/events/cloudevents"
fmt = JSONFormat()

def send(message):
    answer = httpx.post(url, headers=message.headers, content=message.body)
    assert answer.status_code == 200, (answer.status_code, answer.text)

send(to_structured(CloudEvent(attributes={"type": "com.shop.order.placed", "source": "/shop", "id": "ce-1",
                                          "subject": "order-1"}, data={"total": 7}), fmt))
send(to_binary(CloudEvent(attributes={"type": "com.shop.order.paid", "source": "/shop", "id": "ce-2",
                                      "datacontenttype": "application/json", "region": "eu"},
                          data={"amount": 7}), fmt))
batch = [json.loads(fmt.write(CloudEvent(attributes={"type": "com.shop.item.packed", "source": "/warehouse",
                                                      "id": f"ce-batch-{i}"}, data={"item": i})))
         for i in range(3)]
answer = httpx.post(url, headers={"content-type": "application/cloudevents-batch+json"}, content=json.dumps(batch))
assert answer.status_code == 200, answer.text
answer = httpx.post(url, headers={"content-type": "application/cloudevents+json"},
                    content=json.dumps({"specversion": "1.0", "id": "x", "source": "/s"}))
assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "type", answer.text
print("sent")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevents_sdk_sends_structured_binary_and_batched_events() {
    let app = spawn_app_with(Options::default()).await;
    python(CLOUDEVENTS, &[("BASE_URL", &app.base)]).await;
    app.wait_for_events(5, Duration::from_secs(20)).await;
    let rows: Vec<(String, Value, Value, String)> =
        sqlx::query_as("SELECT event_type, data, metadata, event_source FROM event.events ORDER BY metadata->>'ce_id'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let by_id = |id: &str| rows.iter().find(|row| row.2["ce_id"] == id).unwrap_or_else(|| panic!("{id}: {rows:?}"));
    let (event_type, data, metadata, source) = by_id("ce-1");
    assert_eq!(
        (event_type.as_str(), data["total"].as_i64(), source.as_str()),
        ("com.shop.order.placed", Some(7), "external_api")
    );
    assert_eq!((metadata["ce_subject"].as_str(), metadata["ce_source"].as_str()), (Some("order-1"), Some("/shop")));
    let (event_type, data, metadata, _) = by_id("ce-2");
    assert_eq!((event_type.as_str(), data["amount"].as_i64()), ("com.shop.order.paid", Some(7)));
    assert_eq!(metadata["ce_region"], "eu", "extensions land in metadata");
    for i in 0..3 {
        assert_eq!(by_id(&format!("ce-batch-{i}")).1["item"], i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_sending_far_too_much_reads_the_413() {
    let app = spawn_app_with(Options::default()).await;
    let script = r#"
import os, httpx
answer = httpx.post(os.environ["BASE_URL"] + "/api/v1/events/create", content=b"{" + b"x" * 20_000_000 + b"}",
                    headers={"content-type": "application/json"}, timeout=60)
print(answer.status_code, answer.json()["code"])
"#;
    let answer = python(script, &[("BASE_URL", &app.base)]).await;
    assert_eq!(answer.trim(), "413 payload_too_large");
}

/// A page on its own origin that sends events the three ways browsers do, then reports what
/// each answered.
fn page(api: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const api = "{api}";
const json = (body) => ({{method: "POST", headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body)}});
(async () => {{
  const results = {{}};
  results.fetch = (await fetch(api + "/api/v1/events/frontend", json({{event_type: "browser.fetch", user_id: "chrome"}}))).status;
  results.beacon = navigator.sendBeacon(api + "/api/v1/events/frontend",
    JSON.stringify({{event_type: "browser.beacon", user_id: "chrome"}}));
  results.batch = (await fetch(api + "/api/v1/events/frontend/batch",
    json({{events: [{{event_type: "browser.batch.one", user_id: "chrome"}}, {{event_type: "browser.batch.two", user_id: "chrome"}}]}}))).status;
  results.tracking = navigator.sendBeacon(api + "/beacon/v1/batch?writeKey=wk-web",
    JSON.stringify({{batch: [{{type: "track", event: "Beacon Tracked", userId: "chrome", messageId: "web-1",
      context: {{library: {{name: "RudderLabs JavaScript SDK"}}}}}}]}}));
  await fetch("/report", {{method: "POST", body: JSON.stringify(results)}});
}})().catch((error) => fetch("/report", {{method: "POST", body: JSON.stringify({{error: String(error)}})}}));
</script></body></html>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_another_origin_sends_events_with_fetch_beacons_and_batches() {
    let chromium = installed("EVENT_TEST_CHROMIUM", "/usr/bin/chromium");
    let app = spawn_app_with(Options { write_keys: vec!["wk-web".into()], ..Options::default() }).await;
    // The page's own origin: another port, so every call to the service is cross-origin.
    let reports: Arc<Mutex<Vec<String>>> = Arc::default();
    let (html, reported) = (page(&app.base), reports.clone());
    let site =
        axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(html) })).route(
            "/report",
            axum::routing::post(move |body: String| async move {
                reported.lock().unwrap().push(body);
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, site).await });

    let profile = tempfile::tempdir().unwrap();
    let mut browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{origin}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let report = wait_until(Duration::from_secs(60), || async { reports.lock().unwrap().first().cloned() })
        .await
        .expect("the page reports back");
    let results: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(results["fetch"], 200, "{results}");
    assert_eq!(results["beacon"], true, "{results}");
    assert_eq!(results["batch"], 200, "{results}");
    assert_eq!(results["tracking"], true, "{results}");
    app.wait_for_events(5, Duration::from_secs(20)).await;
    let _ = browser.kill().await;
    let types: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM event.events WHERE user_id = 'chrome' ORDER BY event_type")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(types, ["Beacon Tracked", "browser.batch.one", "browser.batch.two", "browser.beacon", "browser.fetch"]);
    let origin_seen: Option<String> =
        sqlx::query_scalar("SELECT metadata->>'referer' FROM event.events WHERE event_type = 'browser.fetch'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(origin_seen.is_some_and(|referer| referer.starts_with(&origin)), "the page's origin sent it");
}
