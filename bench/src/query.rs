//! Reads at scale: seeds the store to 1 M and 10 M events (`--quick`: 200 k) with COPY, then
//! measures `POST /query` for 1 000 rows under several filters and `GET /statistics`.
//!
//! Seeded rows (types `seed.*`, 10 000 users, 30 days, mostly processed) go through an
//! unlogged staging table, then into `event.events` (their ids into `event.event_ids`) together
//! with the statistics rollups, in one transaction per chunk that holds the rollups lock as the
//! persister does: the counts stay exact and the service keeps running meanwhile.

use std::time::Instant;

use anyhow::bail;
use chrono::{Duration as Days, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::Bench;
use crate::baseline::{COPY_COLUMNS, copy_row, stored_event};
use crate::report::{new_histogram, progress, record};

const CHUNK: usize = 250_000;
const USERS: usize = 10_000;
const TYPES: usize = 20;

impl Bench {
    pub async fn query_at_scale(&self) -> anyhow::Result<()> {
        let Some(pool) = self.pool("query at scale") else { return Ok(()) };
        let sizes: &[usize] = if self.args.quick { &[200_000] } else { &[1_000_000, 10_000_000] };
        for &size in sizes {
            let seeded: i64 =
                sqlx::query_scalar("SELECT count(*) FROM event.events WHERE subject = 'seed'").fetch_one(pool).await?;
            let started = Instant::now();
            let added = seed(pool, seeded as usize, size.saturating_sub(seeded as usize)).await?;
            if added > 0 {
                println!(
                    "  seeded {added} events in {:.1} s ({:.0} rows/s with indexes and rollups)",
                    started.elapsed().as_secs_f64(),
                    added as f64 / started.elapsed().as_secs_f64()
                );
            }
            sqlx::query("ANALYZE event.events").execute(pool).await?;
            let total: i64 = sqlx::query_scalar("SELECT count(*) FROM event.events").fetch_one(pool).await?;
            let label = millions(total);
            self.measure_queries(&label).await?;
            self.note_rss(&format!("queries at {label}"));
        }
        Ok(())
    }

    async fn measure_queries(&self, label: &str) -> anyhow::Result<()> {
        let rounds = self.size(30, 100);
        let day = Utc::now() - Days::days(3);
        let queries = [
            ("newest 1 000", json!({"limit": 1000})),
            ("1 000 of one event type", json!({"event_type": "seed.type7", "limit": 1000})),
            ("1 000 of one user", json!({"user_id": "seed-user-4242", "limit": 1000})),
            (
                "1 000 in one day",
                json!({"start_time": (day - Days::days(1)).to_rfc3339(), "end_time": day.to_rfc3339(), "limit": 1000}),
            ),
            ("1 000 by data containment", json!({"data": {"plan": "premium"}, "limit": 1000})),
        ];
        for (name, body) in queries {
            let mut histogram = new_histogram();
            let started = Instant::now();
            let mut rows = 0;
            for _ in 0..rounds {
                let sent = Instant::now();
                let response = self.post("/api/v1/events/query").json(&body).send().await?;
                if !response.status().is_success() {
                    bail!("query {name} answered {}: {}", response.status(), response.text().await?);
                }
                let answer: Value = response.json().await?;
                record(&mut histogram, sent.elapsed());
                rows = answer["events"].as_array().map(Vec::len).unwrap_or(0);
            }
            self.report.latency(
                &format!("query {name} ({rows} rows) at {label}"),
                &histogram,
                started.elapsed(),
                "p95 < 200 ms (spec), < 50 ms at 10 M",
            );
        }
        for (name, path) in [
            ("statistics", "/api/v1/events/statistics".to_owned()),
            ("statistics of one user", "/api/v1/events/statistics?user_id=seed-user-4242".to_owned()),
        ] {
            let mut histogram = new_histogram();
            let started = Instant::now();
            for _ in 0..rounds {
                let sent = Instant::now();
                let response = self.get(&path).send().await?;
                if !response.status().is_success() {
                    bail!("{name} answered {}", response.status());
                }
                let _ = response.bytes().await?;
                record(&mut histogram, sent.elapsed());
            }
            self.report.latency(
                &format!("{name} at {label}"),
                &histogram,
                started.elapsed(),
                "< 500 ms (spec), < 20 ms at 10 M",
            );
        }
        Ok(())
    }
}

fn millions(total: i64) -> String {
    if total >= 1_000_000 {
        format!("{:.1} M events", total as f64 / 1e6)
    } else {
        format!("{} k events", total / 1000)
    }
}

/// Adds `count` seeded events after the `from` already there; answers how many it added.
async fn seed(pool: &PgPool, from: usize, count: usize) -> anyhow::Result<usize> {
    if count == 0 {
        return Ok(0);
    }
    sqlx::query("CREATE UNLOGGED TABLE IF NOT EXISTS public.bench_seed (LIKE event.events INCLUDING DEFAULTS)")
        .execute(pool)
        .await?;
    let bar = progress(count as u64, "seeding with COPY");
    let now = Utc::now();
    let statuses = ["processed", "processed", "processed", "processed", "processed", "processed", "pending", "failed"];
    let sources = ["backend", "frontend", "system", "external_api"];
    let categories = ["order", "payment", "page_view", "click", "user_lifecycle"];
    let mut done = 0;
    while done < count {
        let size = CHUNK.min(count - done);
        let mut rows = String::with_capacity(size * 400);
        for k in 0..size {
            let n = from + done + k;
            let user = (n * 7_919) % USERS;
            let request = json!({
                "event_id": uuid::Uuid::now_v7(),
                "event_type": format!("seed.type{}", n % TYPES),
                "event_source": sources[n % sources.len()],
                "event_category": categories[n % categories.len()],
                "user_id": format!("seed-user-{user}"),
                "session_id": format!("seed-session-{}", n / 20),
                // Spread over the last 30 days whatever the count (7 919 is prime to 30 days in
                // seconds), so the one-day query finds events in `--quick` runs too.
                "timestamp": (now - Days::seconds(((n * 7_919) % (30 * 86_400)) as i64)).to_rfc3339(),
                "data": {"order_id": format!("o-{n}"), "amount": (n % 997) as f64 * 1.25, "currency": "EUR",
                         "items": n % 7 + 1, "plan": if n.is_multiple_of(3) { "premium" } else { "basic" }},
                "metadata": {"seed": true}
            });
            let mut event = stored_event(&request)?;
            // Seeded events belong to no entity stream: versions are the persister's business.
            event.stream_id = None;
            copy_row(&mut rows, &event, statuses[n % statuses.len()], 0, 0, "seed");
        }
        let mut tx = pool.begin().await?;
        sqlx::query("TRUNCATE public.bench_seed").execute(&mut *tx).await?;
        let mut copy = tx.copy_in_raw(&format!("COPY public.bench_seed ({COPY_COLUMNS}) FROM STDIN")).await?;
        for part in rows.as_bytes().chunks(1 << 20) {
            copy.send(part).await?;
        }
        copy.finish().await?;
        sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
        sqlx::query("INSERT INTO event.event_ids SELECT event_id, stored_at FROM public.bench_seed")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO event.events SELECT * FROM public.bench_seed").execute(&mut *tx).await?;
        event_service::store::rollups::lock_rollups(&mut tx).await?;
        for statement in ROLLUPS {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        done += size;
        bar.inc(size as u64);
    }
    bar.finish_and_clear();
    sqlx::query("DROP TABLE public.bench_seed").execute(pool).await?;
    Ok(done)
}

/// Adds the staged rows to every statistics rollup.
const ROLLUPS: [&str; 4] = [
    "INSERT INTO event.rollup_daily (day, event_source, event_category, event_type, events)
     SELECT (\"timestamp\" AT TIME ZONE 'UTC')::date, event_source, event_category, event_type, count(*)
     FROM public.bench_seed GROUP BY 1, 2, 3, 4
     ON CONFLICT (day, event_source, event_category, event_type)
     DO UPDATE SET events = event.rollup_daily.events + excluded.events",
    "INSERT INTO event.rollup_status (status, events)
     SELECT status, count(*) FROM public.bench_seed GROUP BY 1
     ON CONFLICT (status) DO UPDATE SET events = event.rollup_status.events + excluded.events",
    "INSERT INTO event.rollup_user_daily (user_id, day, event_source, event_category, event_type, events)
     SELECT user_id, (\"timestamp\" AT TIME ZONE 'UTC')::date, event_source, event_category, event_type, count(*)
     FROM public.bench_seed WHERE user_id IS NOT NULL GROUP BY 1, 2, 3, 4, 5
     ON CONFLICT (user_id, day, event_source, event_category, event_type)
     DO UPDATE SET events = event.rollup_user_daily.events + excluded.events",
    "INSERT INTO event.rollup_users AS r (user_id, events, pending, processed, failed)
     SELECT user_id, count(*), count(*) FILTER (WHERE status = 'pending'),
         count(*) FILTER (WHERE status = 'processed'), count(*) FILTER (WHERE status = 'failed')
     FROM public.bench_seed WHERE user_id IS NOT NULL GROUP BY 1
     ON CONFLICT (user_id) DO UPDATE SET events = r.events + excluded.events, pending = r.pending + excluded.pending,
         processed = r.processed + excluded.processed, failed = r.failed + excluded.failed",
];
