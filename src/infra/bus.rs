//! Everything that talks to NATS: connecting, publishing (PubAck awaited), many publishes with
//! their acks in flight together, atomic batch publish, domain-event announcements and core-NATS
//! notifications.
//!
//! Writes to whatever subject it is given. Guarantees: a JetStream publish returns `Ok` only
//! once JetStream has acknowledged it, so a caller that answers its client after `Ok` never
//! acknowledges an event that could be lost.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderValue, connection::State};
use bytes::Bytes;
use serde::Deserialize;
use uuid::Uuid;

use super::metrics::{Metrics, Shared};
use crate::wire::Outgoing;

/// The largest atomic batch the server accepts.
pub const MAX_ATOMIC_BATCH: usize = 1000;
/// Most PubAcks [`Bus::publish_all`] waits for at once (the client allows 5 000).
pub const PUBLISH_WINDOW: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Not connected when asked to publish: nothing was sent (the client would have queued
    /// it and sent it on reconnecting, after the caller had been told it failed).
    #[error("NATS is not connected; nothing was sent")]
    Disconnected,
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
    #[error("cannot read message {sequence} of {stream}")]
    Read { stream: String, sequence: u64, source: jetstream::stream::DirectGetError },
    #[error("cannot read message {sequence} of {stream}")]
    ReadRaw { stream: String, sequence: u64, source: jetstream::stream::RawMessageError },
    #[error("cannot delete message {sequence} of {stream}")]
    Delete { stream: String, sequence: u64, source: jetstream::stream::DeleteMessageError },
    #[error("cannot encode a message")]
    Encode(#[from] serde_json::Error),
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

    /// True when the message went out but no answer came back (the acknowledgement timed out,
    /// or the connection broke after sending): JetStream may have stored it or not. Retrying
    /// with the same `Nats-Msg-Id` settles it without a duplicate.
    pub fn is_outcome_unknown(&self) -> bool {
        use async_nats::RequestErrorKind;
        use jetstream::context::PublishErrorKind;
        match self {
            BusError::Publish(error) => {
                matches!(error.kind(), PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe)
            }
            BusError::Request(error) => matches!(error.kind(), RequestErrorKind::TimedOut),
            _ => false,
        }
    }

    /// True when an atomic batch was refused because JetStream already holds one of its
    /// message ids (inside the duplicate window): nothing of the batch was stored.
    pub fn is_duplicate_in_batch(&self) -> bool {
        matches!(self, BusError::BatchRejected { code, .. } if *code == BATCH_DUPLICATE_MSG_ID)
    }
}

/// What JetStream said about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    /// JetStream had the same `Nats-Msg-Id` inside the duplicate window and stored nothing.
    pub duplicate: bool,
}

/// The committed batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchStored {
    pub last_sequence: u64,
    pub count: usize,
}

/// The NATS connection and its JetStream context, and the process's metrics (one of each per
/// process: everything that talks to NATS can count without another argument).
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    metrics: Shared,
}

impl Bus {
    /// Connects to one server or a comma-separated list of them (the NATS convention; the
    /// client fails over between them), retrying in the background if the server goes away.
    pub async fn connect(url: &str, name: &str, ack_timeout: Duration) -> Result<Self, BusError> {
        let servers = server_list(url);
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
            .connect(servers.as_slice())
            .await?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(ack_timeout);
        // Make sure we are really connected before answering: retry_on_initial_connect
        // returns at once otherwise.
        tokio::time::timeout(Duration::from_secs(30), async {
            while client.connection_state() != State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .ok();
        Ok(Self { client, jetstream, metrics: Arc::new(Metrics::new()) })
    }

    /// The metrics, for a task that outlives this handle.
    pub fn shared_metrics(&self) -> Shared {
        self.metrics.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
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

    /// A handle on `stream`, without asking for its state.
    async fn stream(&self, stream: &str) -> Result<jetstream::stream::Stream<()>, BusError> {
        self.jetstream
            .get_stream_no_info(stream)
            .await
            .map_err(|source| BusError::StreamLookup { name: stream.to_owned(), source })
    }

    /// The durable pull consumer `name` of `stream`, which must already exist (fail loudly if
    /// not).
    pub async fn consumer(&self, stream: &str, name: &str) -> Result<consumer::PullConsumer, BusError> {
        self.stream(stream).await?.get_consumer(name).await.map_err(|cause| BusError::ConsumerLookup {
            stream: stream.to_owned(),
            name: name.to_owned(),
            cause,
        })
    }

    /// What JetStream says of the durable consumer `name` of `stream` now: its configuration,
    /// what it delivered and its ack floor.
    pub async fn consumer_info(&self, stream: &str, name: &str) -> Result<consumer::Info, BusError> {
        self.stream(stream).await?.consumer_info(name).await.map_err(|cause| BusError::ConsumerLookup {
            stream: stream.to_owned(),
            name: name.to_owned(),
            cause: cause.into(),
        })
    }

    /// Changes the configuration of a durable consumer of `stream` (named in `config`); it
    /// keeps its position.
    pub async fn update_consumer(&self, stream: &str, config: consumer::Config) -> Result<(), BusError> {
        let name = config.durable_name.clone().unwrap_or_default();
        self.stream(stream)
            .await?
            .update_consumer(config)
            .await
            .map_err(|cause| BusError::Consumer { name, cause: cause.into() })?;
        Ok(())
    }

    /// Moves the durable consumer `name` of `stream` to the stream's head: it forgets what it
    /// was delivering and takes only messages stored from now on (nats-server 2.14 or newer;
    /// an older server refuses, and the consumer stays where it was).
    pub async fn move_consumer_to_head(&self, stream: &str, name: &str) -> Result<(), BusError> {
        let refused = |cause: String| BusError::Consumer { name: name.to_owned(), cause: cause.into() };
        // Looked up now, so its last sequence is current.
        let handle = self
            .jetstream
            .get_stream(stream)
            .await
            .map_err(|source| BusError::StreamLookup { name: stream.to_owned(), source })?;
        let last = handle.cached_info().state.last_sequence;
        let reply: jetstream::response::Response<serde::de::IgnoredAny> = self
            .jetstream
            .request(format!("CONSUMER.RESET.{stream}.{name}"), &serde_json::json!({ "seq": last + 1 }))
            .await
            .map_err(|error| refused(error.to_string()))?;
        match reply {
            jetstream::response::Response::Ok(_) => Ok(()),
            jetstream::response::Response::Err { error } => Err(refused(format!("reset refused: {error}"))),
        }
    }

    /// Refuses to publish while disconnected: a message the client queued then would be
    /// stored on reconnecting, after its publisher was told it failed.
    fn connected(&self) -> Result<(), BusError> {
        if self.is_connected() { Ok(()) } else { Err(BusError::Disconnected) }
    }

    /// Publishes one message and waits for its PubAck.
    pub async fn publish(&self, message: Outgoing) -> Result<Stored, BusError> {
        self.connected()?;
        let ack = self.jetstream.publish_with_headers(message.subject, message.headers, message.payload).await?.await?;
        Ok(Stored { sequence: ack.sequence, duplicate: ack.duplicate })
    }

    /// Publishes many messages with their PubAcks in flight together (not atomic: each one
    /// is stored or not on its own). Results are in input order. At most
    /// [`PUBLISH_WINDOW`] acks are awaited at once: the client holds a limited number of
    /// in-flight acks, and a caller that sent more before awaiting any would wait forever.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Vec<Result<Stored, BusError>> {
        if !self.is_connected() {
            return messages.iter().map(|_| Err(BusError::Disconnected)).collect();
        }
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

    /// Publishes domain events (built with [`crate::wire::domain_events`]) and logs the ones
    /// JetStream did not acknowledge: an announcement of an effect that is already durable is
    /// never a reason to undo or hold that effect. Returns how many were lost.
    pub async fn announce(&self, messages: Vec<Outgoing>) -> usize {
        let mut lost = 0;
        let subjects: Vec<String> = messages.iter().map(|message| message.subject.clone()).collect();
        for (subject, result) in subjects.iter().zip(self.publish_all(messages).await) {
            if let Err(error) = result {
                lost += 1;
                tracing::warn!(subject = %subject, error = %error, "cannot announce a domain event");
            }
        }
        lost
    }

    /// Publishes up to [`MAX_ATOMIC_BATCH`] messages as one JetStream atomic batch (ADR-50):
    /// all of them are stored, or none. async-nats has no API for it, so this speaks the
    /// header protocol: every message carries `Nats-Batch-Id` and `Nats-Batch-Sequence`, the
    /// last one `Nats-Batch-Commit: 1` and is sent as a request whose reply is the PubAck of
    /// the whole batch (or the reason it was refused).
    pub async fn publish_atomic(&self, messages: Vec<Outgoing>) -> Result<BatchStored, BusError> {
        self.connected()?;
        let count = messages.len();
        let batch_id = Uuid::now_v7().simple().to_string();
        let mut messages = messages.into_iter().enumerate();
        let Some((_, mut last)) = messages.next_back() else {
            return Ok(BatchStored { last_sequence: 0, count: 0 });
        };
        for (index, mut message) in messages {
            message.headers.insert(BATCH_ID, batch_id.as_str());
            message.headers.insert(BATCH_SEQUENCE, HeaderValue::from(index as u64 + 1));
            self.client.publish_with_headers(message.subject, message.headers, message.payload).await?;
        }
        last.headers.insert(BATCH_ID, batch_id.as_str());
        last.headers.insert(BATCH_SEQUENCE, HeaderValue::from(count as u64));
        last.headers.insert(BATCH_COMMIT, "1");
        let reply = self.client.request_with_headers(last.subject, last.headers, last.payload).await?;
        let answer: BatchAnswer = serde_json::from_slice(&reply.payload)
            .map_err(|_| BusError::BatchRejected { code: 0, description: "unreadable batch acknowledgement".into() })?;
        match answer {
            BatchAnswer { error: Some(error), .. } => {
                Err(BusError::BatchRejected { code: error.err_code, description: error.description })
            }
            BatchAnswer { seq: Some(seq), .. } => Ok(BatchStored { last_sequence: seq, count }),
            _ => Err(BusError::BatchRejected { code: 0, description: "empty batch acknowledgement".into() }),
        }
    }

    /// A core-NATS publish (no stream, no ack): notifications that are allowed to get lost.
    pub async fn notify(&self, subject: String, payload: Bytes) -> Result<(), BusError> {
        self.client.publish(subject, payload).await?;
        Ok(())
    }

    /// [`Bus::notify`] with headers.
    pub async fn notify_message(&self, message: Outgoing) -> Result<(), BusError> {
        self.client.publish_with_headers(message.subject, message.headers, message.payload).await?;
        Ok(())
    }
}

/// The servers of a `NATS_URL`: comma-separated, blanks ignored.
pub fn server_list(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|server| !server.is_empty()).collect()
}

async fn settle(
    sent: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
) -> Result<Stored, BusError> {
    let ack = sent?.await?;
    Ok(Stored { sequence: ack.sequence, duplicate: ack.duplicate })
}

/// The headers of JetStream's atomic batch publish.
const BATCH_ID: HeaderName = HeaderName::from_static("Nats-Batch-Id");
const BATCH_SEQUENCE: HeaderName = HeaderName::from_static("Nats-Batch-Sequence");
const BATCH_COMMIT: HeaderName = HeaderName::from_static("Nats-Batch-Commit");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_may_list_servers() {
        assert_eq!(server_list("nats://a:4222"), ["nats://a:4222"]);
        assert_eq!(
            server_list("nats://a:4222, nats://b:4222,,nats://c:4222 "),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
    }
}
