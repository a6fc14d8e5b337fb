//! What a scrape reads besides the counters: the consumers' backlogs, the persister's lag,
//! the PostgreSQL pool, the dead letters waiting, and every consumer of STORED.
//!
//! Reads, at scrape time only, JetStream consumer and stream info and the persister's stored
//! position; writes the gauges of [`Metrics`]. Guarantees: a scrape never blocks for more than
//! a second per source it reads.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream::Stream;
use sqlx::PgPool;

use super::{ConsumerLabels, Metrics, PoolLabels, StageLabels};
use crate::wire::subjects::streams::STORED;

/// What a scrape reads besides the counters.
#[derive(Default)]
pub(super) struct Sources {
    consumers: Vec<(String, String, PullConsumer)>,
    /// EVENTS and the pool holding the persister's position, when a persister runs here.
    persister: Option<(Stream, PgPool)>,
    pool: Option<PgPool>,
    /// DEADLETTER, when this process serves the dead-letter endpoints (a gateway).
    dead_letters: Option<Stream>,
    /// STORED, when a persister runs here: its consumers (everyone's) are reported, and the
    /// names last reported, to drop the gauges of a deleted one.
    stored: Option<Stream>,
    stored_consumers: Vec<String>,
}

impl Metrics {
    /// Reports this consumer's backlog at every scrape.
    pub fn watch_consumer(&self, stream: &str, consumer: &str, handle: PullConsumer) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.consumers.push((stream.to_owned(), consumer.to_owned(), handle));
        }
    }

    /// Reports the persister's lag at every scrape.
    pub fn watch_persister(&self, events: Stream, pool: PgPool) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.persister = Some((events, pool));
        }
    }

    /// Reports the backlog of every consumer of STORED (downstream teams' too) at every
    /// scrape, as `event_consumer_pending_messages{stream="STORED",consumer=...}`.
    pub fn watch_stored(&self, stream: Stream) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.stored = Some(stream);
        }
    }

    /// Reports how many dead letters wait, per stage, at every scrape.
    pub fn watch_dead_letters(&self, stream: Stream) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.dead_letters = Some(stream);
        }
    }

    /// Reports this pool's usage at every scrape.
    pub fn watch_pool(&self, pool: PgPool) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.pool = Some(pool);
        }
    }

    /// Reads the gauges' sources, then encodes everything.
    pub async fn scrape(&self) -> String {
        self.refresh().await;
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %error, "cannot encode the metrics");
        }
        text
    }

    async fn refresh(&self) {
        let (consumers, persister, pool, dead_letters, stored) = match self.sources.lock() {
            Ok(sources) => (
                sources.consumers.clone(),
                sources.persister.clone(),
                sources.pool.clone(),
                sources.dead_letters.clone(),
                sources.stored.clone(),
            ),
            Err(_) => return,
        };
        if let Some(stream) = dead_letters {
            self.count_dead_letters(&stream).await;
        }
        if let Some(stream) = stored {
            self.report_stored_consumers(&stream).await;
        }
        for (stream, name, mut consumer) in consumers {
            let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(1), consumer.info()).await else { continue };
            let labels = ConsumerLabels { stream, consumer: name };
            self.consumer_pending.get_or_create(&labels).set(info.num_pending as i64);
            self.consumer_ack_pending.get_or_create(&labels).set(info.num_ack_pending as i64);
        }
        if let Some((mut events, pool)) = persister {
            let stream = events.info().await.ok().map(|info| info.state.last_sequence);
            let stored = crate::store::position::read_position(&pool, crate::wire::subjects::streams::EVENTS).await;
            if let (Some(last), Ok(stored)) = (stream, stored) {
                self.persister_lag.set(last.saturating_sub(stored) as i64);
            }
        }
        if let Some(pool) = pool {
            let (size, idle) = (pool.size() as i64, pool.num_idle() as i64);
            self.db_connections.get_or_create(&PoolLabels { state: "idle" }).set(idle);
            self.db_connections.get_or_create(&PoolLabels { state: "in_use" }).set((size - idle).max(0));
        }
    }

    /// Sets the backlog of every consumer of STORED, and drops the gauges of one deleted since
    /// the last scrape.
    async fn report_stored_consumers(&self, stream: &Stream) {
        let read = async {
            let mut seen = Vec::new();
            let mut infos = stream.consumers();
            while let Some(Ok(info)) = futures::StreamExt::next(&mut infos).await {
                let labels = ConsumerLabels { stream: STORED.to_owned(), consumer: info.name.clone() };
                self.consumer_pending.get_or_create(&labels).set(info.num_pending as i64);
                self.consumer_ack_pending.get_or_create(&labels).set(info.num_ack_pending as i64);
                seen.push(info.name);
            }
            seen
        };
        let Ok(seen) = tokio::time::timeout(Duration::from_secs(1), read).await else { return };
        let Ok(mut sources) = self.sources.lock() else { return };
        for gone in sources.stored_consumers.iter().filter(|name| !seen.contains(name)) {
            let labels = ConsumerLabels { stream: STORED.to_owned(), consumer: gone.clone() };
            self.consumer_pending.remove(&labels);
            self.consumer_ack_pending.remove(&labels);
        }
        sources.stored_consumers = seen;
    }

    /// Sets the stored dead letters per stage from DEADLETTER's per-subject counts (every known
    /// stage gets a sample, 0 when it has none).
    async fn count_dead_letters(&self, stream: &Stream) {
        let read = async {
            let mut counts = std::collections::HashMap::new();
            let mut subjects = stream.info_with_subjects(crate::wire::subjects::DEADLETTER_WILDCARD).await.ok()?;
            while let Some(Ok((subject, count))) = futures::StreamExt::next(&mut subjects).await {
                let stage =
                    subject.strip_prefix("deadletter.").map_or("other", crate::wire::subjects::deadletter_stage);
                *counts.entry(stage).or_insert(0_i64) += count as i64;
            }
            Some(counts)
        };
        let Ok(Some(counts)) = tokio::time::timeout(Duration::from_secs(1), read).await else { return };
        for stage in crate::wire::subjects::DEADLETTER_STAGES {
            let stored = counts.get(stage).copied().unwrap_or(0);
            self.dead_letters_stored.get_or_create(&StageLabels { stage }).set(stored);
        }
    }
}
