//! Overload: offer twice the rate the pipeline can store, open loop (requests go out on a
//! clock, whatever the answers), and watch the service's memory, its answers, and how long it
//! takes to store everything it accepted once the load stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::Bench;
use crate::baseline::{run_tag, sample};
use crate::ingest::count_type;
use crate::report::Limit;
use crate::service;

/// Events per request of the offered load.
const BATCH: usize = 100;
/// Requests the load generator keeps open at most; past it, a tick is skipped (and counted).
const MAX_OPEN: u64 = 4_000;

/// What the answers of the offered load came to.
#[derive(Default)]
struct Answers {
    accepted_events: AtomicU64,
    overloaded: AtomicU64,
    other: AtomicU64,
    open: AtomicU64,
    skipped: AtomicU64,
}

impl Bench {
    pub async fn overload(&self) -> anyhow::Result<()> {
        let Some(pool) = self.pool("overload") else { return Ok(()) };
        let sustainable = self.sustainable_rate(pool).await?;
        let offered = 2.0 * sustainable;
        let seconds = self.size(15, 60) as u64;
        println!("  offering {offered:.0} ev/s (2 × {sustainable:.0}) for {seconds} s");
        let run = run_tag();
        let event_type = format!("bench.overload.{run}");
        let answers = Arc::new(Answers::default());
        let interval = Duration::from_secs_f64(BATCH as f64 / offered);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (mut peak_rss, mut rss_at) = (0.0_f64, Instant::now());
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(seconds) {
            ticks.tick().await;
            if answers.open.load(Ordering::Relaxed) >= MAX_OPEN {
                answers.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let body: Vec<Value> = (0..BATCH).map(|i| sample(&run, &event_type, sent * BATCH + i)).collect();
            sent += 1;
            let request = self.post("/api/v1/events/batch").json(&body).send();
            let answers = answers.clone();
            answers.open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                match request.await.map(|response| response.status().as_u16()) {
                    Ok(200 | 202) => answers.accepted_events.fetch_add(BATCH as u64, Ordering::Relaxed),
                    Ok(503) => answers.overloaded.fetch_add(1, Ordering::Relaxed),
                    _ => answers.other.fetch_add(1, Ordering::Relaxed),
                };
                answers.open.fetch_sub(1, Ordering::Relaxed);
            });
            if rss_at.elapsed() >= Duration::from_millis(250) {
                rss_at = Instant::now();
                if let Some(memory) = self.service_pid.and_then(service::memory) {
                    peak_rss = peak_rss.max(memory.now_mib);
                }
            }
        }
        let offered_for = started.elapsed();
        while answers.open.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let accepted = answers.accepted_events.load(Ordering::Relaxed) as i64;
        let load_ended = Instant::now();
        let stored = self.wait_for_count(accepted, Duration::from_secs(900), || count_type(pool, &event_type)).await?;
        let caught_up = load_ended.elapsed();
        if stored != accepted {
            bail!("{accepted} events accepted, {stored} stored");
        }
        let (overloaded, other, skipped) = (
            answers.overloaded.load(Ordering::Relaxed),
            answers.other.load(Ordering::Relaxed),
            answers.skipped.load(Ordering::Relaxed),
        );
        println!(
            "  {sent} requests in {:.1} s: {accepted} events accepted and all stored, {overloaded} answered 503, \
             {other} other answers, {skipped} ticks skipped; stored {:.1} s after the load stopped",
            offered_for.as_secs_f64(),
            caught_up.as_secs_f64()
        );
        if other > 0 {
            bail!("{other} requests had an answer other than 200, 202 or 503");
        }
        self.report.rate(
            &format!("Overload: {offered:.0} ev/s offered (2 × sustainable) for {seconds} s, accepted"),
            accepted as f64 / offered_for.as_secs_f64(),
            "ev",
            &format!("{overloaded} answered 503; all stored {:.0} s after the load", caught_up.as_secs_f64()),
            Limit::None,
        );
        if peak_rss > 0.0 {
            println!("  service RSS during the overload: peak {peak_rss:.0} MiB");
            self.report.push(
                "Overload: service RSS, peak while offered",
                format!("{peak_rss:.0} MiB"),
                "bounded",
                String::new(),
            );
        }
        Ok(())
    }

    /// What the pipeline stores per second, end to end: batches of 1 000, answered once stored.
    async fn sustainable_rate(&self, pool: &sqlx::PgPool) -> anyhow::Result<f64> {
        let total = self.size(20_000, 60_000);
        let run = run_tag();
        let event_type = format!("bench.sustainable.{run}");
        let bodies: Vec<Vec<Value>> = (0..total / 1_000)
            .map(|b| (0..1_000).map(|i| sample(&run, &event_type, b * 1_000 + i)).collect())
            .collect();
        let started = Instant::now();
        self.send_batches(&bodies, false, "measuring the sustainable rate").await?;
        self.wait_for_count(total as i64, Duration::from_secs(600), || count_type(pool, &event_type)).await?;
        Ok(total as f64 / started.elapsed().as_secs_f64())
    }
}
