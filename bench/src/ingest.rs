//! Ingest scenarios: HTTP batches answered by JetStream, HTTP batches answered once stored,
//! JetStream publish by a NATS-native producer until stored, and single-event latency of
//! `create` (stored) and `frontend` (in JetStream). Throughput is compared with the raw limits.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::Bench;
use crate::baseline::{run_tag, sample};
use crate::cpu::CpuTimes;
use crate::report::{Limit, new_histogram, progress, record};

impl Bench {
    /// HTTP batches with `Prefer: respond-async`: answered once JetStream acknowledged them.
    pub async fn batch_ingest(&self, batch: usize) -> anyhow::Result<()> {
        let total = self.size(20_000, 200_000).max(batch);
        let run = run_tag();
        let event_type = format!("bench.batch{batch}");
        let bodies: Vec<Vec<Value>> = (0..total / batch)
            .map(|b| (0..batch).map(|i| sample(&run, &event_type, b * batch + i)).collect())
            .collect();
        let cpu = CpuTimes::now();
        let elapsed = self.send_batches(&bodies, true, &format!("batches of {batch}, answered by JetStream")).await?;
        let sent = total / batch * batch;
        self.report.rate(
            &format!("HTTP batch ingest, batches of {batch} (`Prefer: respond-async`)"),
            sent as f64 / elapsed.as_secs_f64(),
            "ev",
            "≥ 50 000 ev/s",
            Limit::JetStream,
        );
        // Accepting them and everything the stages do with them once accepted.
        self.cpu_cost(&format!("HTTP batch ingest, batches of {batch}, until every stage handled them"), &cpu, sent)
            .await?;
        self.note_rss("batch ingest");
        Ok(())
    }

    /// HTTP batches of 1 000 answered once stored; the rate counts rows in PostgreSQL.
    pub async fn persisted(&self) -> anyhow::Result<()> {
        let Some(pool) = self.pool("persisted throughput") else { return Ok(()) };
        let batch = 1_000;
        let total = self.size(30_000, 300_000);
        let run = run_tag();
        let event_type = format!("bench.persisted.{run}");
        let bodies: Vec<Vec<Value>> = (0..total / batch)
            .map(|b| (0..batch).map(|i| sample(&run, &event_type, b * batch + i)).collect())
            .collect();
        let cpu = CpuTimes::now();
        let started = Instant::now();
        self.send_batches(&bodies, false, "batches of 1000, answered once stored").await?;
        let stored =
            self.wait_for_count(total as i64, Duration::from_secs(600), || count_type(pool, &event_type)).await?;
        let elapsed = started.elapsed();
        if stored < total as i64 {
            bail!("only {stored} of {total} events were stored within 10 minutes");
        }
        self.report.rate(
            "End-to-end persisted, HTTP batches of 1 000 → rows in PostgreSQL",
            total as f64 / elapsed.as_secs_f64(),
            "ev",
            "≥ 30 000 ev/s and ≥ 50 % of raw COPY",
            Limit::Copy,
        );
        self.cpu_cost("End-to-end persisted", &cpu, total).await?;
        check_rows(pool, &event_type, stored).await?;
        self.note_rss("persisted");
        Ok(())
    }

    /// A NATS-native producer: JetStream publish to `events.>` (PubAcks pipelined) until
    /// PostgreSQL holds every event.
    pub async fn nats_ingest(&self) -> anyhow::Result<()> {
        let Some(pool) = self.pool("NATS ingest") else { return Ok(()) };
        let total = self.size(30_000, 300_000);
        let run = run_tag();
        let event_type = format!("bench.nats.{run}");
        let js = jetstream::new(self.nats.clone());
        let subject = format!("events.backend.order.{event_type}");
        let bar = progress(total as u64, "NATS publish");
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let mut pending = FuturesUnordered::new();
        for i in 0..total {
            if pending.len() >= 4_096
                && let Some(ack) = pending.next().await
            {
                let _: jetstream::publish::PublishAck = ack?;
                bar.inc(1);
            }
            let mut request = sample(&run, &event_type, i);
            let id = uuid::Uuid::now_v7();
            request["event_id"] = json!(id);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.to_string().as_str());
            pending.push(
                js.publish_with_headers(subject.clone(), headers, serde_json::to_vec(&request)?.into())
                    .await?
                    .into_future(),
            );
        }
        while let Some(ack) = pending.next().await {
            ack?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let published = started.elapsed();
        let stored =
            self.wait_for_count(total as i64, Duration::from_secs(600), || count_type(pool, &event_type)).await?;
        let elapsed = started.elapsed();
        if stored < total as i64 {
            bail!("only {stored} of {total} NATS events were stored within 10 minutes");
        }
        println!("  (published in {:.2} s, all stored after {:.2} s)", published.as_secs_f64(), elapsed.as_secs_f64());
        self.report.rate(
            "NATS publish → stored in PostgreSQL",
            total as f64 / elapsed.as_secs_f64(),
            "ev",
            "",
            Limit::Copy,
        );
        self.cpu_cost("NATS publish → stored", &cpu, total).await?;
        check_rows(pool, &event_type, stored).await?;
        self.note_rss("NATS ingest");
        Ok(())
    }

    /// Sends every body to `/batch`, `in_flight` at a time. Without `respond_async` a 202 (not
    /// stored within the store timeout) is fine too: the rows are counted afterwards.
    pub(crate) async fn send_batches(
        &self,
        bodies: &[Vec<Value>],
        respond_async: bool,
        what: &str,
    ) -> anyhow::Result<Duration> {
        let bar = progress(bodies.iter().map(Vec::len).sum::<usize>() as u64, what);
        let started = Instant::now();
        let mut sends = futures::stream::iter(bodies.iter().map(|body| {
            let mut request = self.post("/api/v1/events/batch").json(body);
            if respond_async {
                request = request.header("Prefer", "respond-async");
            }
            async move { (request.send().await, body.len()) }
        }))
        .buffer_unordered(self.args.in_flight.max(1));
        while let Some((response, count)) = sends.next().await {
            let response = response?;
            let status = response.status();
            let _ = response.bytes().await;
            if status != StatusCode::ACCEPTED && (respond_async || status != StatusCode::OK) {
                bail!("a batch was answered {status}");
            }
            bar.inc(count as u64);
        }
        bar.finish_and_clear();
        Ok(started.elapsed())
    }

    /// Single-event create, answered once PostgreSQL has the event.
    pub async fn create_latency(&self, clients: usize) -> anyhow::Result<()> {
        let total = self.size(2_000, 20_000);
        let run = run_tag();
        let bodies = move |i| sample(&run, "bench.create", i);
        let (histogram, elapsed) =
            self.latency(clients, total, "/api/v1/events/create", StatusCode::OK, bodies).await?;
        self.report.latency(
            &format!("`POST /create`, stored, {clients} client(s)"),
            &histogram,
            elapsed,
            "p95 < 50 ms (spec), p99 < 10 ms",
        );
        Ok(())
    }

    /// Single frontend event, answered once JetStream has it.
    pub async fn frontend_latency(&self, clients: usize) -> anyhow::Result<()> {
        let total = self.size(2_000, 20_000);
        let bodies = |i: usize| {
            json!({"event_type": "bench.frontend", "category": "click", "user_id": format!("bench-user-{}", i % 1000),
                   "session_id": format!("bench-session-{}", i % 5000), "page_url": "https://shop.example/cart",
                   "data": {"button": "checkout", "i": i}})
        };
        let (histogram, elapsed) =
            self.latency(clients, total, "/api/v1/events/frontend", StatusCode::OK, bodies).await?;
        self.report.latency(
            &format!("`POST /frontend`, {clients} client(s)"),
            &histogram,
            elapsed,
            "p95 < 20 ms (spec), p99 < 3 ms",
        );
        Ok(())
    }

    /// `total` requests to `path` from `clients` concurrent clients; the latency of each.
    async fn latency<F>(
        &self,
        clients: usize,
        total: usize,
        path: &str,
        expected: StatusCode,
        body: F,
    ) -> anyhow::Result<(hdrhistogram::Histogram<u64>, Duration)>
    where
        F: Fn(usize) -> Value + Clone + Send + 'static,
    {
        let clients = clients.max(1);
        let per_client = total / clients;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let request = self.post(path);
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let mut histogram = new_histogram();
                let mut failures = 0;
                for i in 0..per_client {
                    let Some(request) = request.try_clone() else { break };
                    let payload = body(client * per_client + i);
                    let sent = Instant::now();
                    match request.json(&payload).send().await {
                        Ok(response) if response.status() == expected => {
                            let _ = response.bytes().await;
                            record(&mut histogram, sent.elapsed());
                        }
                        _ => failures += 1,
                    }
                }
                (histogram, failures)
            }));
        }
        let mut histogram = new_histogram();
        let mut failures = 0;
        for task in tasks {
            let (part, failed) = task.await?;
            histogram.add(part)?;
            failures += failed;
        }
        if failures > 0 {
            println!("  {failures} requests to {path} were not answered {expected}");
        }
        Ok((histogram, started.elapsed()))
    }
}

/// Stored events of one type.
/// Stored events of one type, from the daily rollup the persister writes in the same
/// transaction as the rows: as exact as counting the rows, and cheap enough to ask every 10 ms
/// without taking CPU from the pipeline being measured.
pub(crate) async fn count_type(pool: &sqlx::PgPool, event_type: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_daily WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(pool)
        .await?)
}

/// Counts the rows themselves, once, to confirm the count the rollup gave.
async fn check_rows(pool: &sqlx::PgPool, event_type: &str, counted: i64) -> anyhow::Result<()> {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM event.events WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(pool)
        .await?;
    if rows != counted {
        bail!("the rollups counted {counted} events of {event_type} but the table holds {rows}");
    }
    Ok(())
}
