//! The raw limits, measured in the same run on the same machine: JetStream async publish of
//! the events the gateway would publish (same stream settings as EVENTS, `Nats-Msg-Id` set,
//! PubAcks pipelined) and PostgreSQL COPY of the rows the persister would write (a table like
//! `event.events`, indexes included). Creates and removes `BENCH_RAW` and `public.bench_raw`.

use std::fmt::Write as _;
use std::future::IntoFuture;
use std::time::Instant;

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use event_service::domain::Event;
use event_service::domain::parse::{self, Defaults};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolCopyExt;

use crate::Bench;
use crate::cpu::CpuTimes;
use crate::report::{Limit, Limits};

/// PubAcks awaited at once by the raw publisher.
const PUBACKS_IN_FLIGHT: usize = 4_096;

impl Bench {
    pub async fn baselines(&self) -> anyhow::Result<()> {
        let count = self.size(50_000, 300_000);
        let run = run_tag();
        let events: Vec<Event> =
            (0..count).map(|i| stored_event(&sample(&run, "bench.raw", i))).collect::<Result<_, _>>()?;
        let jetstream = self.raw_jetstream(&events).await?;
        let copy = match self.pool("raw COPY baseline") {
            Some(_) => Some(self.raw_copy(&events).await?),
            None => None,
        };
        self.report.set_limits(Limits { jetstream: Some(jetstream), copy });
        Ok(())
    }

    async fn raw_jetstream(&self, events: &[Event]) -> anyhow::Result<f64> {
        let js = jetstream::new(self.nats.clone());
        let mut config = js.get_stream("EVENTS").await.context("no EVENTS stream")?.info().await?.config.clone();
        config.name = "BENCH_RAW".to_owned();
        config.subjects = vec!["benchraw.>".to_owned()];
        let _ = js.delete_stream("BENCH_RAW").await;
        js.create_stream(config).await?;
        let payloads: Vec<(String, Bytes)> = events
            .iter()
            .map(|event| Ok((event.event_id.to_string(), Bytes::from(serde_json::to_vec(event)?))))
            .collect::<Result<_, serde_json::Error>>()?;
        let bar = crate::report::progress(payloads.len() as u64, "raw JetStream publish");
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let mut pending = FuturesUnordered::new();
        for (id, payload) in payloads {
            if pending.len() >= PUBACKS_IN_FLIGHT
                && let Some(ack) = pending.next().await
            {
                let _: jetstream::publish::PublishAck = ack?;
                bar.inc(1);
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            pending
                .push(js.publish_with_headers("benchraw.backend.order.bench", headers, payload).await?.into_future());
        }
        while let Some(ack) = pending.next().await {
            ack?;
            bar.inc(1);
        }
        let elapsed = started.elapsed();
        bar.finish_and_clear();
        let rate = events.len() as f64 / elapsed.as_secs_f64();
        self.report.rate("raw JetStream async publish (limit)", rate, "msg", "", Limit::None);
        self.report.cpu("raw JetStream async publish", &CpuTimes::now().per_thousand_since(&cpu, events.len()));
        js.delete_stream("BENCH_RAW").await?;
        Ok(rate)
    }

    async fn raw_copy(&self, events: &[Event]) -> anyhow::Result<f64> {
        let Some(pool) = &self.pool else { anyhow::bail!("no database") };
        sqlx::query("DROP TABLE IF EXISTS public.bench_raw").execute(pool).await?;
        sqlx::query("CREATE TABLE public.bench_raw (LIKE event.events INCLUDING ALL)").execute(pool).await?;
        let mut rows = String::new();
        for (i, event) in events.iter().enumerate() {
            let subject = event_service::wire::subjects::event_subject(
                event.event_source.as_str(),
                event.event_category.as_str(),
                &event.event_type,
            );
            copy_row(&mut rows, event, "pending", i as i64 + 1, (i / 1000) as i64 + 1, &subject);
        }
        let bar = crate::report::progress(events.len() as u64, "raw PostgreSQL COPY");
        let cpu = CpuTimes::now();
        let started = Instant::now();
        let mut copy = pool.copy_in_raw(&format!("COPY public.bench_raw ({COPY_COLUMNS}) FROM STDIN")).await?;
        for chunk in rows.as_bytes().chunks(1 << 20) {
            copy.send(chunk).await?;
        }
        copy.finish().await?;
        let elapsed = started.elapsed();
        bar.finish_and_clear();
        let rate = events.len() as f64 / elapsed.as_secs_f64();
        self.report.rate("raw PostgreSQL COPY, same rows and indexes (limit)", rate, "row", "", Limit::None);
        self.report.cpu("raw PostgreSQL COPY", &CpuTimes::now().per_thousand_since(&cpu, events.len()));
        sqlx::query("DROP TABLE public.bench_raw").execute(pool).await?;
        Ok(rate)
    }
}

/// A short tag that keeps this run's events apart from earlier runs'.
pub fn run_tag() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// A create request shaped like a real business event (about 300 bytes stored).
pub fn sample(run: &str, event_type: &str, i: usize) -> Value {
    json!({
        "event_type": event_type,
        "event_source": "backend",
        "event_category": "order",
        "user_id": format!("bench-user-{}", i % 1_000),
        "session_id": format!("bench-session-{}", i % 5_000),
        "correlation_id": run,
        "data": {"order_id": format!("o-{i}"), "amount": (i % 997) as f64 * 1.25, "currency": "EUR",
                 "items": i % 7 + 1, "plan": if i.is_multiple_of(3) { "premium" } else { "basic" }},
        "metadata": {"bench": run}
    })
}

/// The event the gateway would build from a create request.
pub fn stored_event(request: &Value) -> anyhow::Result<Event> {
    parse::parse_event(request.clone(), &Defaults::http(Utc::now()))
        .map_err(|errors| anyhow::anyhow!("the bench built an invalid event: {errors:?}"))
}

pub const COPY_COLUMNS: &str = "event_id, event_type, event_source, event_category, user_id, session_id, \
     organization_id, device_id, correlation_id, data, metadata, context, properties, status, stream_id, \
     stream_version, stream_seq, subject, \"timestamp\", created_at";

/// One row of `COPY ... FROM STDIN` (text format) for [`COPY_COLUMNS`].
pub fn copy_row(out: &mut String, event: &Event, status: &str, seq: i64, stream_version: i64, subject: &str) {
    let text = |value: &Option<String>| value.as_deref().map(escape).unwrap_or_else(|| "\\N".to_owned());
    let json = |value: &serde_json::Map<String, Value>| escape(&Value::Object(value.clone()).to_string());
    let _ = writeln!(
        out,
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        event.event_id,
        escape(&event.event_type),
        event.event_source.as_str(),
        event.event_category.as_str(),
        text(&event.user_id),
        text(&event.session_id),
        text(&event.organization_id),
        text(&event.device_id),
        text(&event.correlation_id),
        json(&event.data),
        json(&event.metadata),
        json(&event.context),
        json(&event.properties),
        status,
        text(&event.stream_id.as_ref().map(ToString::to_string)),
        if event.stream_id.is_some() { stream_version.to_string() } else { "\\N".to_owned() },
        seq,
        escape(subject),
        event.timestamp.to_rfc3339(),
        event.created_at.to_rfc3339(),
    );
}

/// Escapes what COPY's text format treats specially.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r")
}
