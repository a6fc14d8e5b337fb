//! The JetStream topology declared in `jetstream/`: every stream and durable consumer, applied
//! idempotently (create or update) at start-up by every binary and by `event-service setup`.
//!
//! Reads the JSON files built into the binary and each consumer's configuration; writes stream
//! and consumer configurations. Guarantees: replicas come from the settings (1 on a laptop, 3
//! on a cluster) and EVENTS and STORED keep messages for their configured max ages; nothing
//! else differs from the files. A consumer carries the stamp of what was applied to it (its
//! file and replicas, in its metadata) and is written only when that changed, so a restart
//! leaves alone the filter an idle stage set ([`crate::stages::interest`]). A consumer update
//! that collides with a stage's own (an idle consumer opening or closing) is tried again.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use serde::Deserialize;

use super::bus::{Bus, BusError};
use super::settings::NatsArgs;
use crate::wire::subjects::streams;

const STREAM_FILES: &[(&str, &str)] = &[
    (streams::EVENTS, include_str!("../../jetstream/streams/EVENTS.json")),
    (streams::EVENT_SERVICE, include_str!("../../jetstream/streams/EVENT_SERVICE.json")),
    (streams::DEADLETTER, include_str!("../../jetstream/streams/DEADLETTER.json")),
    (streams::JOBS, include_str!("../../jetstream/streams/JOBS.json")),
    (streams::DELIVERIES, include_str!("../../jetstream/streams/DELIVERIES.json")),
    // After EVENT_SERVICE: a store from before STORED has EVENT_SERVICE on `event.>`, which
    // must narrow before `event.stored.>` can belong to another stream.
    (streams::STORED, include_str!("../../jetstream/streams/STORED.json")),
];

/// Durable consumers, named after the stage that reads them.
const CONSUMER_FILES: &[(&str, &str)] = &[
    ("persister", include_str!("../../jetstream/consumers/persister.json")),
    ("processor", include_str!("../../jetstream/consumers/processor.json")),
    ("replayer", include_str!("../../jetstream/consumers/replayer.json")),
    ("dispatcher", include_str!("../../jetstream/consumers/dispatcher.json")),
    ("sender", include_str!("../../jetstream/consumers/sender.json")),
    ("projector", include_str!("../../jetstream/consumers/projector.json")),
];

/// The consumer metadata key that holds the stamp of what was applied.
const STAMP_KEY: &str = "event_service_applied";

/// How often a consumer is applied before start-up fails, and the pause between attempts.
const CONSUMER_ATTEMPTS: u32 = 5;
const CONSUMER_RETRY: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct ConsumerFile {
    stream: String,
    config: consumer::pull::Config,
}

/// Creates or updates every stream and consumer declared in `jetstream/`.
pub async fn apply(bus: &Bus, settings: &NatsArgs) -> Result<(), BusError> {
    for (file, text) in STREAM_FILES {
        let mut config: stream::Config =
            serde_json::from_str(text).map_err(|source| BusError::TopologyFile { file, source })?;
        config.num_replicas = settings.replicas;
        if config.name == streams::EVENTS {
            config.max_age = Duration::from_secs(settings.events_max_age_secs);
        }
        if config.name == streams::STORED {
            config.max_age = Duration::from_secs(settings.stored_max_age_secs);
        }
        let name = config.name.clone();
        bus.jetstream().create_or_update_stream(config).await.map_err(|source| BusError::Stream { name, source })?;
    }
    for (file, text) in CONSUMER_FILES {
        let declared: ConsumerFile =
            serde_json::from_str(text).map_err(|source| BusError::TopologyFile { file, source })?;
        let mut config = declared.config;
        config.num_replicas = settings.replicas;
        let name = config.durable_name.clone().unwrap_or_default();
        let stamp = stamp(text, settings.replicas);
        let current = bus.consumer_info(&declared.stream, &name).await.ok();
        if current.is_some_and(|info| applied_already(&info.config, &stamp)) {
            tracing::debug!(consumer = %name, stream = %declared.stream, "consumer already as declared");
            continue;
        }
        config.metadata.insert(STAMP_KEY.to_owned(), stamp);
        let mut attempt = 1;
        // A stage may be changing this consumer's filter at the same moment
        // (`crate::stages::interest`); on a cluster the two updates can collide.
        while let Err(cause) = bus.jetstream().create_consumer_on_stream(config.clone(), &declared.stream).await {
            if attempt >= CONSUMER_ATTEMPTS {
                return Err(BusError::Consumer { name, cause: cause.into() });
            }
            tracing::warn!(consumer = %name, attempt, error = %cause, "cannot apply the consumer; trying again");
            tokio::time::sleep(CONSUMER_RETRY).await;
            attempt += 1;
        }
        tracing::debug!(consumer = %name, stream = %declared.stream, "consumer applied");
    }
    tracing::info!("jetstream topology applied");
    Ok(())
}

/// What applying a consumer file with these replicas writes, as a short digest.
fn stamp(file: &str, replicas: usize) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(file.as_bytes()).chain_update(replicas.to_be_bytes()).finalize();
    digest[..8].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Whether the consumer as JetStream has it was written from this stamp (by this or another
/// process), so writing it again would change nothing but a filter a stage set since.
fn applied_already(current: &consumer::Config, stamp: &str) -> bool {
    current.metadata.get(STAMP_KEY).is_some_and(|applied| applied == stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_written_again_only_when_its_file_or_replicas_changed() {
        let (file, other) = (CONSUMER_FILES[0].1, CONSUMER_FILES[1].1);
        assert_eq!(stamp(file, 1), stamp(file, 1));
        assert_ne!(stamp(file, 1), stamp(file, 3));
        assert_ne!(stamp(file, 1), stamp(other, 1));
        let mut current = consumer::Config::default();
        assert!(!applied_already(&current, &stamp(file, 1)), "a consumer from before stamps");
        current.metadata.insert(STAMP_KEY.to_owned(), stamp(file, 1));
        assert!(applied_already(&current, &stamp(file, 1)));
        assert!(!applied_already(&current, &stamp(file, 3)));
    }

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

    /// JetStream refuses two streams whose subjects overlap; each domain event has its stream.
    #[test]
    fn streams_do_not_overlap_and_cover_the_domain_events() {
        use crate::wire::subjects::*;
        let configs: Vec<stream::Config> =
            STREAM_FILES.iter().map(|(_, text)| serde_json::from_str(text).unwrap()).collect();
        let owner = |subject: &str| -> Vec<String> {
            configs
                .iter()
                .filter(|config| config.subjects.iter().any(|filter| matches(filter, subject)))
                .map(|config| config.name.clone())
                .collect()
        };
        for subject in [
            EVENT_PROCESSED_SUCCESS,
            EVENT_PROCESSED_FAILED,
            EVENT_REPLAY_STARTED,
            EVENT_REPLAY_COMPLETED,
            EVENT_SUBSCRIPTION_CREATED,
            EVENT_SUBSCRIPTION_DISABLED,
            EVENT_PROJECTION_CREATED,
        ] {
            assert_eq!(owner(subject), [streams::EVENT_SERVICE], "{subject}");
        }
        assert_eq!(owner(&stored_subject("backend", "order", "order.placed")), [streams::STORED]);
        assert_eq!(owner(&event_subject("backend", "order", "order.placed")), [streams::EVENTS]);
        let position = |name: &str| STREAM_FILES.iter().position(|(file, _)| *file == name);
        assert!(position(streams::EVENT_SERVICE) < position(streams::STORED));
    }

    /// Whether a subject filter (with `*` and `>`) matches a literal subject.
    fn matches(filter: &str, subject: &str) -> bool {
        let mut tokens = subject.split('.');
        for part in filter.split('.') {
            match (part, tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (part, Some(token)) if part == token => {}
                _ => return false,
            }
        }
        tokens.next().is_none()
    }
}
