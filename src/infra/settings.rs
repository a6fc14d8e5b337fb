//! Command-line settings shared by the binaries. Every flag is also an environment variable,
//! so the same binary runs from a shell, a container or a test.
//!
//! Reads the process arguments and environment (through clap), writes nothing. Secrets (API
//! keys, the RudderStack secret, the database URL with its password) are [`Secret`]s, so a
//! settings struct printed with `{:?}` shows none of them.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::domain::Secret;

/// What every binary takes: where NATS and PostgreSQL are, and how to log.
#[derive(Debug, Clone, Args)]
pub struct Common {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Where `/metrics`, `/health/live` and `/health/ready` are served, e.g. `0.0.0.0:9090`.
    /// Off when unset; the gateway serves them on its HTTP port anyway.
    #[arg(long = "metrics-addr", env = "EVENT_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How to reach NATS and how to shape the JetStream topology.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL. `event-service` starts a private nats-server when it is unset.
    #[arg(long = "nats-url", env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<Secret>,
    /// Replicas of every stream: 1 on a laptop, 3 on a cluster.
    #[arg(long = "stream-replicas", env = "EVENT_STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// How long a publish waits for JetStream's acknowledgement, in milliseconds.
    #[arg(long = "nats-ack-timeout-ms", env = "EVENT_NATS_ACK_TIMEOUT_MS", default_value_t = 5000)]
    pub ack_timeout_ms: u64,
    /// How long EVENTS keeps messages, in seconds (default 7 days).
    #[arg(long = "events-max-age-secs", env = "EVENT_EVENTS_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub events_max_age_secs: u64,
    /// How long STORED (the public stream of stored events) keeps messages, in seconds
    /// (default 7 days).
    #[arg(long = "stored-max-age-secs", env = "EVENT_STORED_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub stored_max_age_secs: u64,
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL. `event-service` starts a private PostgreSQL when it is unset.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Largest number of pooled connections.
    #[arg(long = "db-max-connections", env = "EVENT_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
}

/// The HTTP gateway.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address the HTTP server listens on.
    #[arg(long = "http-addr", env = "EVENT_HTTP_ADDR", default_value = "127.0.0.1:8230")]
    pub http_addr: SocketAddr,
    /// Comma-separated admin API keys (every endpoint); none means no authentication, which
    /// a gateway listening beyond loopback refuses unless `EVENT_ALLOW_UNAUTHENTICATED=true`.
    #[arg(long = "api-keys", env = "EVENT_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<Secret>,
    /// Comma-separated ingest-only API keys: create, batch, CloudEvents and the tracking API.
    #[arg(long = "ingest-keys", env = "EVENT_INGEST_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub ingest_keys: Vec<Secret>,
    /// Serve without API keys on a non-loopback address (anyone who reaches it may do
    /// everything).
    #[arg(long = "allow-unauthenticated", env = "EVENT_ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,
    /// Shared secret for `POST /webhooks/rudderstack` (`X-Signature`); none means unsigned.
    #[arg(long = "rudderstack-secret", env = "EVENT_RUDDERSTACK_SECRET", hide_env_values = true)]
    pub rudderstack_secret: Option<Secret>,
    /// Most events in one `POST /api/v1/events/batch` (JetStream allows at most 1000 per
    /// atomic batch).
    #[arg(long = "max-batch-events", env = "EVENT_MAX_BATCH_EVENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_batch_events: u16,
    /// Largest request body of single-event endpoints, in bytes.
    #[arg(long = "max-body-bytes", env = "EVENT_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest request body of batch endpoints and the RudderStack webhook, in bytes.
    #[arg(long = "max-batch-body-bytes", env = "EVENT_MAX_BATCH_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_batch_body_bytes: usize,
    /// Most events the gateway has in flight to JetStream (published, not yet acknowledged);
    /// past it, ingest answers 503 `overloaded` with `Retry-After`.
    #[arg(long = "max-inflight-events", env = "EVENT_MAX_INFLIGHT_EVENTS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_events: u32,
    /// Most live tails (`GET /api/v1/events/live`) one gateway serves at once; past it, 503
    /// `too_many_tails`.
    #[arg(long = "live-max-tails", env = "EVENT_LIVE_MAX_TAILS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub live_max_tails: u32,
    /// How long create and batch wait for PostgreSQL before answering 202, in milliseconds.
    #[arg(long = "store-timeout-ms", env = "EVENT_STORE_TIMEOUT_MS", default_value_t = 5000)]
    pub store_timeout_ms: u64,
    /// Snapshot spacing for projection rebuilds asked for over HTTP (the projector's
    /// `EVENT_PROJECTION_SNAPSHOT_EVERY`; keep them equal).
    #[arg(
        id = "gateway_snapshot_every",
        long = "gateway-projection-snapshot-every",
        env = "EVENT_PROJECTION_SNAPSHOT_EVERY",
        default_value_t = 100
    )]
    pub snapshot_every: u64,
    #[command(flatten)]
    pub public: PublicArgs,
}

/// The public ingest endpoints (frontend, the tracking API): what browsers and SDKs may do.
#[derive(Debug, Clone, Args)]
pub struct PublicArgs {
    /// Origins that browsers may send events from (CORS), comma-separated; `*` for any.
    #[arg(long = "cors-origins", env = "EVENT_CORS_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_origins: Vec<String>,
    /// Write keys of the tracking API (`/v1/*`), comma-separated; none: any caller is accepted.
    #[arg(long = "write-keys", env = "EVENT_WRITE_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub write_keys: Vec<Secret>,
    /// Largest tracking API message (one event), in bytes.
    #[arg(long = "tracking-max-event-bytes", env = "EVENT_TRACKING_MAX_EVENT_BYTES", default_value_t = 32 * 1024)]
    pub max_event_bytes: usize,
    /// Largest tracking API batch body, in bytes (after `Content-Encoding` is undone).
    #[arg(long = "tracking-max-batch-bytes", env = "EVENT_TRACKING_MAX_BATCH_BYTES",
          default_value_t = 4 * 1024 * 1024)]
    pub max_batch_bytes: usize,
    /// Requests per second that one client address may make to the public ingest endpoints
    /// (bursts of the same size); 0: no limit.
    #[arg(long = "public-rate-limit", env = "EVENT_PUBLIC_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,
}

impl Default for PublicArgs {
    fn default() -> Self {
        Self {
            cors_origins: vec!["*".to_owned()],
            write_keys: Vec::new(),
            max_event_bytes: 32 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            rate_limit: 0,
        }
    }
}

impl GatewayArgs {
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }
}

/// The persister stage.
#[derive(Debug, Clone, Args)]
pub struct PersisterArgs {
    /// Most events written in one PostgreSQL statement.
    #[arg(long = "persister-batch", env = "EVENT_PERSISTER_BATCH", default_value_t = 1000)]
    pub batch_size: usize,
    /// Days stored events are kept (by `stored_at`, in whole UTC days: an event leaves between
    /// this many days and one more); unset keeps them forever. Separate from the age of EVENTS.
    #[arg(long = "retention-days", env = "EVENT_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_days: Option<u32>,
    /// Publish every stored event to STORED, the public stream for downstream JetStream
    /// consumers. `false` when nothing reads STORED saves about 15 % of the CPU per stored
    /// event; the events stored while it is off are never published, also not once it is on
    /// again. Events stored before, while it was on, are published first.
    #[arg(
        long = "stored-stream",
        env = "EVENT_STORED_STREAM",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub stored_stream: bool,
}

/// Outgoing callbacks (webhook processors, subscriptions): which addresses they may reach.
#[derive(Debug, Clone, Default, Args)]
pub struct CallbackArgs {
    /// Refuse callbacks to private addresses (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    /// Loopback, link-local, metadata and multicast addresses are always refused.
    #[arg(long = "callback-deny-private", env = "EVENT_CALLBACK_DENY_PRIVATE", default_value_t = false)]
    pub deny_private: bool,
    /// Comma-separated CIDRs callbacks may reach anyway (e.g. `127.0.0.0/8` for a local run).
    #[arg(long = "callback-allowed-nets", env = "EVENT_CALLBACK_ALLOWED_NETS", value_delimiter = ',')]
    pub allowed_nets: Vec<ipnet::IpNet>,
}

/// The processor stage.
#[derive(Debug, Clone, Args)]
pub struct ProcessorArgs {
    /// Most events handled in one batch.
    #[arg(id = "processor_batch", long = "processor-batch", env = "EVENT_PROCESSOR_BATCH", default_value_t = 256)]
    pub batch_size: usize,
    /// Most events whose processors run at the same time (events of one entity stream run
    /// one after another).
    #[arg(long = "processor-concurrency", env = "EVENT_PROCESSOR_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Delay before the first retry of a failed processor, in milliseconds; it doubles with
    /// each attempt.
    #[arg(long = "processor-retry-delay-ms", env = "EVENT_PROCESSOR_RETRY_DELAY_MS", default_value_t = 1000)]
    pub retry_delay_ms: u64,
    /// Longest delay between retries, in milliseconds.
    #[arg(long = "processor-retry-max-delay-ms", env = "EVENT_PROCESSOR_RETRY_MAX_DELAY_MS", default_value_t = 60_000)]
    pub retry_max_delay_ms: u64,
}

impl ProcessorArgs {
    /// The delay before retry number `attempt` (1 = the first retry).
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 2u64.saturating_pow(attempt.saturating_sub(1).min(32));
        Duration::from_millis(self.retry_delay_ms.saturating_mul(factor).min(self.retry_max_delay_ms))
    }
}

/// The dispatcher stage (EVENTS → DELIVERIES) and the senders (DELIVERIES → webhooks).
#[derive(Debug, Clone, Args)]
pub struct DispatcherArgs {
    /// Most deliveries a sender works on at once.
    #[arg(long = "sender-concurrency", env = "EVENT_SENDER_CONCURRENCY", default_value_t = 64)]
    pub sender_concurrency: usize,
    /// Most deliveries to one subscription a sender works on at once: a slow endpoint holds
    /// no more of the sender's slots than this.
    #[arg(long = "sender-subscription-concurrency", env = "EVENT_SENDER_SUBSCRIPTION_CONCURRENCY",
          default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub sender_subscription_concurrency: u16,
    /// How long a subscriber has to answer a delivery, in milliseconds.
    #[arg(long = "delivery-timeout-ms", env = "EVENT_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,
    /// A subscription whose deliveries have all failed for this long is disabled, in seconds
    /// (default 5 days).
    #[arg(long = "subscription-disable-after-secs", env = "EVENT_SUBSCRIPTION_DISABLE_AFTER_SECS",
          default_value_t = 5 * 24 * 3600)]
    pub disable_after_secs: u64,
}

/// The projector stage.
#[derive(Debug, Clone, Args)]
pub struct ProjectorArgs {
    /// A snapshot of each projection every this many applied events (time travel folds from
    /// the nearest one).
    #[arg(long = "projection-snapshot-every", env = "EVENT_PROJECTION_SNAPSHOT_EVERY", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `json`, `pretty`, or `auto` (pretty in a terminal, JSON otherwise). Levels come from
    /// `RUST_LOG` (default `info`).
    #[arg(long = "log-format", env = "EVENT_LOG_FORMAT", default_value = "auto")]
    pub format: String,
}

/// A setting this binary cannot run without was not given.
#[derive(Debug, thiserror::Error)]
#[error("{0} is required (flag or environment variable)")]
pub struct Missing(pub &'static str);

/// The value of a setting that this binary cannot run without.
pub fn required<'a, T>(value: &'a Option<T>, name: &'static str) -> Result<&'a T, Missing> {
    value.as_ref().ok_or(Missing(name))
}
