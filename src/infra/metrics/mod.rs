//! The process's metrics, in the Prometheus text format: one [`Metrics`] per process (created
//! with its NATS connection, so every part that talks to NATS can count without another
//! argument), scraped at `/metrics`.
//!
//! Reads, at scrape time only, what [`sources`] reads: the consumers' info (backlog; every
//! consumer of STORED, a downstream team's too), EVENTS' last sequence and the persister's
//! stored position (lag), the PostgreSQL pool (usage). Writes nothing. Guarantees: names
//! follow Prometheus conventions (`event_` prefix, `_total` counters, `_seconds` histograms in
//! base units); labels have low cardinality: route templates never raw paths, no ids; a scrape
//! never blocks for more than a second per consumer.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

mod sources;

use sources::Sources;

/// `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

/// How events came in: `create`, `batch`, `frontend`, `tracking`, `cloudevents`,
/// `rudderstack`, `nats` (published straight to `events.>`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

/// A settled message: `ack`, `retry` or `dead_letter`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub stage: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub stream: String,
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub processor: String,
    /// `success`, `retry`, `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `delivered`, `retry`, `failed`, `refused`, `skipped`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub stage: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchemaLabels {
    /// `valid`, `flagged`, `refused`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `idle` or `in_use`.
    pub state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from half a millisecond to about 33 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    sources: Mutex<Sources>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub events_accepted: Family<PathLabels, Counter>,
    pub overloaded: Family<PathLabels, Counter>,
    pub inflight_events: Gauge,
    pub stage_batches: Family<StageLabels, Counter>,
    pub stage_messages: Family<OutcomeLabels, Counter>,
    pub stage_handle_duration: HistogramFamily<StageLabels>,
    pub stage_held: Family<StageLabels, Counter>,
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_takes_events: Family<ConsumerLabels, Gauge>,
    pub persister_lag: Gauge,
    pub stored_published: Counter,
    pub processor_runs: Family<RunLabels, Counter>,
    pub processor_swept: Counter,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub subscriptions_disabled: Counter,
    pub dead_letters: Family<DeadLetterLabels, Counter>,
    pub dead_letters_redriven: Family<StageLabels, Counter>,
    pub dead_letters_deleted: Family<StageLabels, Counter>,
    pub dead_letters_stored: Family<StageLabels, Gauge>,
    pub live_tails: Gauge,
    pub schema_checks: Family<SchemaLabels, Counter>,
    pub live_events_sent: Counter,
    pub live_tails_lagged: Counter,
    pub retention_partitions_dropped: Counter,
    pub retention_events_dropped: Counter,
    pub db_connections: Family<PoolLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("event"),
            sources: Mutex::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds),
            events_accepted: Family::default(),
            overloaded: Family::default(),
            inflight_events: Gauge::default(),
            stage_batches: Family::default(),
            stage_messages: Family::default(),
            stage_handle_duration: Family::new_with_constructor(seconds),
            stage_held: Family::default(),
            consumer_pending: Family::default(),
            consumer_ack_pending: Family::default(),
            consumer_takes_events: Family::default(),
            persister_lag: Gauge::default(),
            stored_published: Counter::default(),
            processor_runs: Family::default(),
            processor_swept: Counter::default(),
            deliveries: Family::default(),
            subscriptions_disabled: Counter::default(),
            dead_letters: Family::default(),
            dead_letters_redriven: Family::default(),
            dead_letters_deleted: Family::default(),
            dead_letters_stored: Family::default(),
            live_tails: Gauge::default(),
            schema_checks: Family::default(),
            live_events_sent: Counter::default(),
            live_tails_lagged: Counter::default(),
            retention_partitions_dropped: Counter::default(),
            retention_events_dropped: Counter::default(),
            db_connections: Family::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "HTTP request handling time",
            Unit::Seconds,
            self.http_duration.clone(),
        );
        r.register("events_accepted", "Events accepted, by how they came in", self.events_accepted.clone());
        r.register(
            "requests_overloaded",
            "Ingest requests refused with 503 overloaded (the in-flight bound was full), by path",
            self.overloaded.clone(),
        );
        r.register(
            "inflight_events",
            "Events the gateway handed to JetStream and has not seen acknowledged yet",
            self.inflight_events.clone(),
        );
        r.register("stage_batches", "Batches a stage handled", self.stage_batches.clone());
        r.register(
            "stage_messages",
            "Messages a stage settled, by outcome (ack, retry, dead_letter)",
            self.stage_messages.clone(),
        );
        r.register_with_unit(
            "stage_handle_duration",
            "Time a stage's handler took per batch",
            Unit::Seconds,
            self.stage_handle_duration.clone(),
        );
        r.register("stage_batches_held", "Batches a stage held because a dependency was down", self.stage_held.clone());
        r.register(
            "consumer_pending_messages",
            "Messages of a durable consumer not yet delivered",
            self.consumer_pending.clone(),
        );
        r.register(
            "consumer_ack_pending_messages",
            "Messages of a durable consumer delivered, not yet acknowledged",
            self.consumer_ack_pending.clone(),
        );
        r.register(
            "consumer_takes_events",
            "1 while a consumer that can idle (dispatcher, processor) takes every event, 0 while it takes none because nothing could take one (as this process last set it)",
            self.consumer_takes_events.clone(),
        );
        r.register(
            "persister_lag_messages",
            "EVENTS messages past the persister's stored position",
            self.persister_lag.clone(),
        );
        r.register(
            "stored_messages_published",
            "Stored events the persister published to STORED (each stored row once)",
            self.stored_published.clone(),
        );
        r.register(
            "processor_runs",
            "Processor runs, by processor and outcome (success, retry, failed)",
            self.processor_runs.clone(),
        );
        r.register(
            "processor_swept",
            "Events left pending for a processor that is gone, settled `processed` by the processor stage's sweep",
            self.processor_swept.clone(),
        );
        r.register("deliveries", "Subscription delivery attempts, by outcome", self.deliveries.clone());
        r.register(
            "subscriptions_disabled",
            "Subscriptions disabled for their failures",
            self.subscriptions_disabled.clone(),
        );
        r.register("dead_letters", "Messages dead-lettered, by stage and reason", self.dead_letters.clone());
        r.register(
            "dead_letters_redriven",
            "Dead letters put back by an operator, by the stage that refused them",
            self.dead_letters_redriven.clone(),
        );
        r.register(
            "dead_letters_deleted",
            "Dead letters deleted or purged by an operator, by the stage that refused them",
            self.dead_letters_deleted.clone(),
        );
        r.register(
            "schema_checks",
            "Events checked against their type's schema, by outcome (valid, flagged, refused)",
            self.schema_checks.clone(),
        );
        r.register(
            "dead_letters_stored",
            "Dead letters waiting in DEADLETTER now, by the stage that refused them",
            self.dead_letters_stored.clone(),
        );
        r.register("live_tails", "Live tails (GET /api/v1/events/live) open now", self.live_tails.clone());
        r.register("live_events_sent", "Events sent to live tails", self.live_events_sent.clone());
        r.register(
            "live_tails_lagged",
            "Live tails ended because they fell too far behind",
            self.live_tails_lagged.clone(),
        );
        r.register(
            "retention_partitions_dropped",
            "Day partitions of stored events dropped past EVENT_RETENTION_DAYS",
            self.retention_partitions_dropped.clone(),
        );
        r.register(
            "retention_events_dropped",
            "Stored events that left with a dropped partition",
            self.retention_events_dropped.clone(),
        );
        r.register(
            "db_pool_connections",
            "PostgreSQL pool connections, by state (idle, in_use)",
            self.db_connections.clone(),
        );
    }

    /// Counts `n` events accepted through `path`.
    pub fn accepted(&self, path: &'static str, n: usize) {
        self.events_accepted.get_or_create(&PathLabels { path }).inc_by(n as u64);
    }
}

/// One process's metrics, shared.
pub type Shared = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics.accepted("frontend", 3);
        metrics.stage_messages.get_or_create(&OutcomeLabels { stage: "persister", outcome: "ack" }).inc();
        metrics
            .http_duration
            .get_or_create(&RouteLabels { route: "/health".into(), method: "GET".into() })
            .observe(0.002);
        let text = metrics.scrape().await;
        assert!(text.contains("event_events_accepted_total{path=\"frontend\"} 3"), "{text}");
        assert!(text.contains("event_stage_messages_total{stage=\"persister\",outcome=\"ack\"} 1"), "{text}");
        assert!(text.contains("# TYPE event_http_request_duration_seconds histogram"), "{text}");
        assert!(
            text.contains("event_http_request_duration_seconds_count{route=\"/health\",method=\"GET\"} 1"),
            "{text}"
        );
    }

    /// Every family with one sample, so that a scrape declares them all.
    async fn every_family() -> String {
        let metrics = Metrics::new();
        let route = || RouteLabels { route: "/health".into(), method: "GET".into() };
        metrics
            .http_requests
            .get_or_create(&HttpLabels { route: "/health".into(), method: "GET".into(), status: 200 })
            .inc();
        metrics.http_duration.get_or_create(&route()).observe(0.001);
        metrics.accepted("create", 1);
        metrics.overloaded.get_or_create(&PathLabels { path: "create" }).inc();
        let stage = StageLabels { stage: "persister" };
        metrics.stage_batches.get_or_create(&stage).inc();
        metrics.stage_messages.get_or_create(&OutcomeLabels { stage: "persister", outcome: "ack" }).inc();
        metrics.stage_handle_duration.get_or_create(&stage).observe(0.001);
        metrics.stage_held.get_or_create(&stage).inc();
        let consumer = ConsumerLabels { stream: "EVENTS".into(), consumer: "persister".into() };
        metrics.consumer_pending.get_or_create(&consumer).set(0);
        metrics.consumer_ack_pending.get_or_create(&consumer).set(0);
        metrics.consumer_takes_events.get_or_create(&consumer).set(1);
        metrics.processor_runs.get_or_create(&RunLabels { processor: "p".into(), outcome: "success" }).inc();
        metrics.deliveries.get_or_create(&DeliveryLabels { outcome: "delivered" }).inc();
        metrics.dead_letters.get_or_create(&DeadLetterLabels { stage: "persister", reason: "invalid_json" }).inc();
        metrics.dead_letters_redriven.get_or_create(&stage).inc();
        metrics.dead_letters_deleted.get_or_create(&stage).inc();
        metrics.dead_letters_stored.get_or_create(&stage).set(0);
        metrics.live_tails.set(0);
        metrics.schema_checks.get_or_create(&SchemaLabels { outcome: "valid" }).inc();
        metrics.live_events_sent.inc();
        metrics.live_tails_lagged.inc();
        metrics.retention_partitions_dropped.inc();
        metrics.retention_events_dropped.inc();
        metrics.db_connections.get_or_create(&PoolLabels { state: "idle" }).set(1);
        metrics.scrape().await
    }

    /// The sample names a scrape's `# TYPE` lines promise.
    fn sample_names(scrape: &str) -> Vec<String> {
        let mut names = Vec::new();
        for line in scrape.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["#", "TYPE", family, kind] = words.as_slice() {
                let suffixes: &[&str] = match *kind {
                    "counter" if !family.ends_with("_total") => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
            }
        }
        names
    }

    #[tokio::test]
    async fn the_readme_documents_every_metric_and_nothing_else() {
        let names = sample_names(&every_family().await);
        let readme = include_str!("../../../README.md");
        let section = readme.split("### Metrics").nth(1).and_then(|rest| rest.split("\n#").next()).unwrap_or("");
        let mut documented: Vec<String> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `event_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|name| format!("event_{name}"))
            .collect();
        let mut exposed: Vec<String> = names
            .into_iter()
            .filter(|name| !name.ends_with("_bucket") && !name.ends_with("_sum"))
            .map(|name| name.trim_end_matches("_count").to_owned())
            .collect();
        documented.sort();
        exposed.sort();
        assert_eq!(documented, exposed);
    }

    #[tokio::test]
    async fn the_dashboard_asks_for_metrics_that_exist() {
        let names = sample_names(&every_family().await);
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/dashboards/event-service.json")).unwrap();
        let mut asked = 0;
        for target in
            dashboard["panels"].as_array().unwrap().iter().flat_map(|panel| panel["targets"].as_array().unwrap())
        {
            let expr = target["expr"].as_str().unwrap();
            for word in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("event_"))
            {
                asked += 1;
                assert!(names.iter().any(|name| name == word), "the dashboard asks for {word}: {expr}");
            }
        }
        assert!(asked >= 10, "{asked}");
    }
}
