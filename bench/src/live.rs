//! Live tails: 100 SSE clients follow `GET /api/v1/events/live` while events arrive at a
//! steady rate over HTTP. Reports what every tail received, how late (event timestamp →
//! received by the tail), and what the tails cost the pipeline: CPU per 1 000 events beside
//! the same load with no tail open, and the service's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use crate::Bench;
use crate::baseline::{run_tag, sample};
use crate::cpu::CpuTimes;
use crate::report::{new_histogram, record};

/// Tails open at once.
const TAILS: usize = 100;
/// Events per request.
const BATCH: usize = 50;

/// What the tails received.
#[derive(Default)]
struct Received {
    events: AtomicU64,
    opened: AtomicU64,
    lagged: AtomicU64,
}

impl Bench {
    pub async fn live_tails(&self) -> anyhow::Result<()> {
        let rate = self.size(500, 1_000);
        let total = rate * self.size(10, 30);
        println!("  {total} events at {rate} ev/s, first with no tail, then with {TAILS} tails");
        let without = CpuTimes::now();
        self.steady_load(&format!("bench.live.none.{}", run_tag()), total, rate).await?;
        self.cpu_cost("Live tails: the same load with no tail open", &without, total).await?;

        let event_type = format!("bench.live.{}", run_tag());
        let received = Arc::new(Received::default());
        let latency = Arc::new(Mutex::new(new_histogram()));
        let mut tails = Vec::with_capacity(TAILS);
        for _ in 0..TAILS {
            let response = self.get(&format!("/api/v1/events/live?event_type={event_type}")).send().await?;
            if !response.status().is_success() {
                bail!("a live tail was answered {}", response.status());
            }
            tails.push(tokio::spawn(follow(response, received.clone(), latency.clone())));
        }
        while received.opened.load(Ordering::Relaxed) < TAILS as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = CpuTimes::now();
        let started = Instant::now();
        self.steady_load(&event_type, total, rate).await?;
        let expected = (TAILS * total) as u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while received.events.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            if received.lagged.load(Ordering::Relaxed) > 0 {
                bail!("{} tails fell behind and were ended", received.lagged.load(Ordering::Relaxed));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let got = received.events.load(Ordering::Relaxed);
        for tail in tails {
            tail.abort();
        }
        if got < expected {
            bail!("the tails received {got} of {expected} events");
        }
        println!("  every tail received all {total} events; {:.0} deliveries/s", got as f64 / elapsed.as_secs_f64());
        let scenario = format!("Live tails: {TAILS} tails, {rate} ev/s, event time → received by a tail");
        self.report.latency(&scenario, &*latency.lock().await, elapsed, "");
        self.cpu_cost(&format!("Live tails: the same load with {TAILS} tails open"), &before, total).await?;
        self.note_rss("the live tails");
        Ok(())
    }

    /// Sends `total` events of `event_type` at `rate` per second, each stamped when sent.
    async fn steady_load(&self, event_type: &str, total: usize, rate: usize) -> anyhow::Result<()> {
        let run = run_tag();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(BATCH as f64 / rate as f64));
        let mut sent = 0;
        while sent < total {
            ticks.tick().await;
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let body: Vec<_> = (sent..(sent + BATCH).min(total))
                .map(|i| {
                    let mut event = sample(&run, event_type, i);
                    event["timestamp"] = now.clone().into();
                    event
                })
                .collect();
            sent += body.len();
            let response =
                self.post("/api/v1/events/batch").header("Prefer", "respond-async").json(&body).send().await?;
            if !response.status().is_success() {
                bail!("a batch was answered {}", response.status());
            }
        }
        Ok(())
    }
}

/// Reads one tail: counts its events and how late each arrived.
async fn follow(mut response: reqwest::Response, received: Arc<Received>, latency: Arc<Mutex<Histogram<u64>>>) {
    let mut pending = String::new();
    let mut opened = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        if !opened {
            opened = true;
            received.opened.fetch_add(1, Ordering::Relaxed);
        }
        pending.push_str(&String::from_utf8_lossy(&chunk));
        let Some(end) = pending.rfind('\n') else { continue };
        let complete: String = pending.drain(..=end).collect();
        let now = chrono::Utc::now();
        let mut lates = Vec::new();
        for line in complete.lines() {
            if line == "event: lagged" {
                received.lagged.fetch_add(1, Ordering::Relaxed);
            }
            let Some(data) = line.strip_prefix("data: ") else { continue };
            received.events.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = timestamp(data) {
                lates.push((now - sent).to_std().unwrap_or_default());
            }
        }
        if !lates.is_empty() {
            let mut histogram = latency.lock().await;
            for late in lates {
                record(&mut histogram, late);
            }
        }
    }
}

/// The event's `timestamp`, found without decoding the whole event.
fn timestamp(data: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let start = data.find("\"timestamp\":\"")? + "\"timestamp\":\"".len();
    let end = start + data[start..].find('"')?;
    chrono::DateTime::parse_from_rfc3339(&data[start..end]).ok().map(|time| time.with_timezone(&chrono::Utc))
}
