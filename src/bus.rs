//! Everything that talks to NATS: connecting, applying the JetStream topology in
//! `jetstream/`, publishing events (PubAck awaited, `Nats-Msg-Id` = event id), atomic batch
//! publish, and dead-lettering.
//!
//! Writes to the EVENTS, EVENT_SERVICE and DEADLETTER streams. Guarantees: a publish returns
//! `Ok` only once JetStream has acknowledged it, so a caller that answers its client after
//! `Ok` never acknowledges an event that could be lost.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use serde::Deserialize;
use uuid::Uuid;

use crate::settings::NatsArgs;

/// Header naming the core-NATS subject on which the persister reports the event stored.
pub const NOTIFY_HEADER: &str = "Event-Service-Notify";
/// Headers a dead-lettered message carries.
pub const REASON_CODE_HEADER: &str = "Event-Service-Reason-Code";
pub const REASON_HEADER: &str = "Event-Service-Reason";
pub const STAGE_HEADER: &str = "Event-Service-Stage";
pub const ORIGINAL_SUBJECT_HEADER: &str = "Event-Service-Original-Subject";
pub const ORIGINAL_SEQUENCE_HEADER: &str = "Event-Service-Original-Sequence";

/// The largest atomic batch the server accepts.
pub const MAX_ATOMIC_BATCH: usize = 1000;

const STREAM_FILES: &[(&str, &str)] = &[
    ("EVENTS", include_str!("../jetstream/streams/EVENTS.json")),
    ("EVENT_SERVICE", include_str!("../jetstream/streams/EVENT_SERVICE.json")),
    ("DEADLETTER", include_str!("../jetstream/streams/DEADLETTER.json")),
    ("JOBS", include_str!("../jetstream/streams/JOBS.json")),
    ("DELIVERIES", include_str!("../jetstream/streams/DELIVERIES.json")),
];
const CONSUMER_FILES: &[(&str, &str)] = &[
    ("persister", include_str!("../jetstream/consumers/persister.json")),
    ("processor", include_str!("../jetstream/consumers/processor.json")),
    ("replayer", include_str!("../jetstream/consumers/replayer.json")),
    ("dispatcher", include_str!("../jetstream/consumers/dispatcher.json")),
    ("sender", include_str!("../jetstream/consumers/sender.json")),
    ("projector", include_str!("../jetstream/consumers/projector.json")),
];

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS")]
    Connect(#[from] async_nats::ConnectError),
    #[error("JetStream did not acknowledge the publish")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("cannot publish to NATS")]
    CorePublish(#[from] async_nats::PublishError),
    #[error("cannot subscribe")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("NATS request failed")]
    Request(#[from] async_nats::RequestError),
    #[error("JetStream refused the atomic batch: {description} (code {code})")]
    BatchRejected { code: u64, description: String },
    #[error("the topology file {file} is invalid")]
    TopologyFile { file: &'static str, source: serde_json::Error },
    #[error("cannot create or update stream {name}")]
    Stream { name: String, source: jetstream::context::CreateStreamError },
    #[error("cannot create or update consumer {name}: {cause}")]
    Consumer { name: String, cause: async_nats::Error },
    #[error("cannot look up consumer {name} on {stream} (apply the topology first): {cause}")]
    ConsumerLookup { stream: String, name: String, cause: async_nats::Error },
    #[error("cannot look up stream {name}")]
    StreamLookup { name: String, source: jetstream::context::GetStreamError },
}

/// JetStream's error code for an atomic batch holding a `Nats-Msg-Id` it has already stored.
const BATCH_DUPLICATE_MSG_ID: u64 = 10201;
/// JetStream's error code for an atomic batch over the server's size limit.
const BATCH_TOO_LARGE: u64 = 10199;

impl BusError {
    /// True when the message itself is the problem (too large), so retrying cannot help.
    pub fn is_payload_too_large(&self) -> bool {
        match self {
            BusError::Publish(error) => error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded,
            BusError::BatchRejected { code, .. } => *code == BATCH_TOO_LARGE,
            _ => false,
        }
    }

    /// True when an atomic batch was refused because JetStream already holds one of its
    /// message ids (inside the duplicate window): nothing of the batch was stored.
    pub fn is_duplicate_in_batch(&self) -> bool {
        matches!(self, BusError::BatchRejected { code, .. } if *code == BATCH_DUPLICATE_MSG_ID)
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Outgoing {
    /// An event message: `Nats-Msg-Id` is the event id, so a retried publish is stored once.
    pub fn event(subject: String, event_id: Uuid, payload: Bytes) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event_id.to_string().as_str());
        Self { subject, headers, payload }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }
}

/// What JetStream said about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    /// JetStream had the same `Nats-Msg-Id` inside the duplicate window and stored nothing.
    pub duplicate: bool,
}

/// The NATS connection and its JetStream context.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl Bus {
    /// Connects, retrying in the background if the server goes away later.
    pub async fn connect(url: &str, name: &str, ack_timeout: Duration) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // The commit of an atomic batch is a plain request: give it the publish timeout.
            .request_timeout(Some(ack_timeout))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::info!(event = %other, "nats event"),
                }
            })
            .connect(url)
            .await?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(ack_timeout);
        // Make sure we are really connected before answering: retry_on_initial_connect
        // returns at once otherwise.
        tokio::time::timeout(Duration::from_secs(30), async {
            while client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .ok();
        Ok(Self { client, jetstream })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Flushes what is still buffered (the last acks and publishes) before the process exits,
    /// waiting at most 5 s: with NATS unreachable a plain flush would wait for a reconnection
    /// forever and SIGTERM would never end the process.
    pub async fn flush_at_exit(&self) {
        match tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "nats flush failed at shutdown"),
            Err(_) => tracing::warn!("nats unreachable at shutdown: unflushed acks will be redelivered"),
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates or updates every stream and consumer declared in `jetstream/`.
    pub async fn apply_topology(&self, settings: &NatsArgs) -> Result<(), BusError> {
        for (file, text) in STREAM_FILES {
            let mut config: stream::Config =
                serde_json::from_str(text).map_err(|source| BusError::TopologyFile { file, source })?;
            config.num_replicas = settings.replicas;
            if config.name == "EVENTS" {
                config.max_age = Duration::from_secs(settings.events_max_age_secs);
            }
            let name = config.name.clone();
            self.jetstream.create_or_update_stream(config).await.map_err(|source| BusError::Stream { name, source })?;
        }
        for (file, text) in CONSUMER_FILES {
            let declared: ConsumerFile =
                serde_json::from_str(text).map_err(|source| BusError::TopologyFile { file, source })?;
            let mut config = declared.config;
            config.num_replicas = settings.replicas;
            let name = config.durable_name.clone().unwrap_or_default();
            self.jetstream
                .create_consumer_on_stream(config, &declared.stream)
                .await
                .map_err(|cause| BusError::Consumer { name: name.clone(), cause: cause.into() })?;
            tracing::debug!(consumer = %name, stream = %declared.stream, "consumer applied");
        }
        tracing::info!("jetstream topology applied");
        Ok(())
    }

    /// The durable pull consumer of a stage, which must already exist (fail loudly if not).
    pub async fn consumer(&self, stream: &str, name: &str) -> Result<consumer::PullConsumer, BusError> {
        let handle = self
            .jetstream
            .get_stream_no_info(stream)
            .await
            .map_err(|source| BusError::StreamLookup { name: stream.to_owned(), source })?;
        handle.get_consumer(name).await.map_err(|cause| BusError::ConsumerLookup {
            stream: stream.to_owned(),
            name: name.to_owned(),
            cause,
        })
    }

    /// Publishes one message and waits for its PubAck.
    pub async fn publish(&self, message: Outgoing) -> Result<Stored, BusError> {
        let ack = self.jetstream.publish_with_headers(message.subject, message.headers, message.payload).await?.await?;
        Ok(Stored { sequence: ack.sequence, duplicate: ack.duplicate })
    }

    /// Publishes many messages with their PubAcks in flight together (not atomic: each one
    /// is stored or not on its own). Results are in input order. At most
    /// [`PUBLISH_WINDOW`] acks are awaited at once: the client holds a limited number of
    /// in-flight acks, and a caller that sent more before awaiting any would wait forever.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Vec<Result<Stored, BusError>> {
        let mut results = Vec::with_capacity(messages.len());
        let mut pending = std::collections::VecDeque::with_capacity(PUBLISH_WINDOW.min(messages.len()));
        for message in messages {
            if pending.len() >= PUBLISH_WINDOW
                && let Some(sent) = pending.pop_front()
            {
                results.push(settle(sent).await);
            }
            pending.push_back(
                self.jetstream.publish_with_headers(message.subject, message.headers, message.payload).await,
            );
        }
        for sent in pending {
            results.push(settle(sent).await);
        }
        results
    }

    /// Publishes up to [`MAX_ATOMIC_BATCH`] messages as one JetStream atomic batch (ADR-50):
    /// all of them are stored, or none. async-nats has no API for it, so this speaks the
    /// header protocol: every message carries `Nats-Batch-Id` and `Nats-Batch-Sequence`, the
    /// last one `Nats-Batch-Commit: 1` and is sent as a request whose reply is the PubAck of
    /// the whole batch (or the reason it was refused).
    pub async fn publish_atomic(&self, messages: Vec<Outgoing>) -> Result<BatchStored, BusError> {
        let count = messages.len();
        if count == 0 {
            return Ok(BatchStored { last_sequence: 0, count: 0 });
        }
        let batch_id = Uuid::now_v7().simple().to_string();
        for (index, mut message) in messages.into_iter().enumerate() {
            message.headers.insert("Nats-Batch-Id", batch_id.as_str());
            message.headers.insert("Nats-Batch-Sequence", HeaderValue::from(index as u64 + 1));
            if index + 1 < count {
                self.client.publish_with_headers(message.subject, message.headers, message.payload).await?;
            } else {
                message.headers.insert("Nats-Batch-Commit", "1");
                let reply = self.client.request_with_headers(message.subject, message.headers, message.payload).await?;
                let answer: BatchAnswer = serde_json::from_slice(&reply.payload).map_err(|_| {
                    BusError::BatchRejected { code: 0, description: "unreadable batch acknowledgement".into() }
                })?;
                return match answer {
                    BatchAnswer { error: Some(error), .. } => {
                        Err(BusError::BatchRejected { code: error.err_code, description: error.description })
                    }
                    BatchAnswer { seq: Some(seq), .. } => Ok(BatchStored { last_sequence: seq, count }),
                    _ => Err(BusError::BatchRejected { code: 0, description: "empty batch acknowledgement".into() }),
                };
            }
        }
        unreachable!("the loop returns on the last message")
    }

    /// A core-NATS publish (no stream, no ack): notifications that are allowed to get lost.
    pub async fn notify(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        self.client.publish(subject, payload).await?;
        Ok(())
    }
}

/// Most PubAcks [`Bus::publish_all`] waits for at once (the client allows 5 000).
pub const PUBLISH_WINDOW: usize = 1000;

async fn settle(
    sent: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
) -> Result<Stored, BusError> {
    let ack = sent?.await?;
    Ok(Stored { sequence: ack.sequence, duplicate: ack.duplicate })
}

/// The committed batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchStored {
    pub last_sequence: u64,
    pub count: usize,
}

#[derive(Deserialize)]
struct BatchAnswer {
    seq: Option<u64>,
    error: Option<ApiErrorBody>,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct ConsumerFile {
    stream: String,
    config: consumer::pull::Config,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_files_parse() {
        for (file, text) in STREAM_FILES {
            let config: stream::Config = serde_json::from_str(text).unwrap();
            assert_eq!(&config.name, file);
            assert!(!config.subjects.is_empty());
        }
        let events: stream::Config = serde_json::from_str(STREAM_FILES[0].1).unwrap();
        assert!(events.allow_atomic_publish, "batch create needs atomic publish");
        assert_eq!(events.duplicate_window, Duration::from_secs(120));
        for (file, text) in CONSUMER_FILES {
            let declared: ConsumerFile = serde_json::from_str(text).unwrap();
            assert_eq!(declared.config.durable_name.as_deref(), Some(*file));
        }
    }
}
