//! What must hold once a fault is over and the load stopped, waited for (the pipeline catches
//! up) and then asserted: every acknowledged event stored exactly once and nothing invented,
//! entity-stream versions gapless, statistics equal to the rows, every event processed, every
//! subscribed event delivered at least once, every projection caught up with its stream.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use crate::load::Sent;
use crate::topology::Topology;

/// The figures of one fault.
#[derive(Debug)]
pub struct Figures {
    pub fault: String,
    pub acked: usize,
    /// Sent without an acknowledgement, and stored anyway (once).
    pub unknown_stored: usize,
    pub stored: usize,
    pub duplicates: usize,
    pub retries: u64,
    /// Deliveries the receiver got more than once (at least once allows it).
    pub redelivered: usize,
    /// From the end of the load to every check passing.
    pub caught_up: Duration,
}

/// Longest wait for the pipeline to catch up after a fault.
const CATCH_UP: Duration = Duration::from_secs(180);

pub async fn verify(topology: &Topology, sent: Sent, fault: &str, tag: &str) -> Figures {
    let started = Instant::now();
    let pool = &topology.pool;
    let types = format!("fault.{tag}.%");

    // Every acknowledged event stored; nothing stored that was not sent.
    let stored: Vec<Uuid> = wait(topology, "every acknowledged event stored", || async {
        let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM event.events WHERE event_type LIKE $1")
            .bind(&types)
            .fetch_all(pool)
            .await
            .ok()?;
        let ids: HashSet<&Uuid> = stored.iter().collect();
        sent.acked.iter().all(|id| ids.contains(id)).then_some(stored)
    })
    .await;
    let distinct: HashSet<Uuid> = stored.iter().copied().collect();
    let invented: Vec<&Uuid> =
        distinct.iter().filter(|id| !sent.acked.contains(id) && !sent.unknown.contains(id)).collect();
    assert!(invented.is_empty(), "{fault}: events stored that no producer sent: {invented:?}");
    let duplicates = stored.len() - distinct.len();
    assert_eq!(duplicates, 0, "{fault}: events stored twice");

    // STORED, the public stream: each stored row of the round once, in EVENTS order, whatever
    // was killed (the persister's kill -9 is one of the faults).
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, stream_seq FROM event.events WHERE event_type LIKE $1 ORDER BY stream_seq")
            .bind(&types)
            .fetch_all(pool)
            .await
            .expect("rows");
    let on_stored = wait(topology, "STORED holds every stored row", || async {
        let got = read_stored(&topology.nats.url(), tag).await?;
        (got.len() >= rows.len()).then_some(got)
    })
    .await;
    assert!(
        on_stored == rows,
        "{fault}: STORED has {} messages for {} rows, or another order",
        on_stored.len(),
        rows.len()
    );

    // Entity streams: versions 1..n, no gap, no repeat.
    let streams: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT stream_id, count(*), min(stream_version), max(stream_version) FROM event.events \
         WHERE stream_id LIKE $1 GROUP BY stream_id",
    )
    .bind(format!("fault-{tag}:%"))
    .fetch_all(pool)
    .await
    .expect("streams");
    assert!(!streams.is_empty(), "{fault}: the load wrote entity streams");
    for (stream, count, first, last) in &streams {
        assert!(*first == 1 && last == count, "{fault}: stream {stream} has {count} events, versions {first}..{last}");
    }

    // Every event processed, and the statistics equal to the rows.
    wait(topology, "every event processed", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM event.events WHERE event_type LIKE $1 AND status <> 'processed'")
                .bind(&types)
                .fetch_one(pool)
                .await
                .ok()?;
        (left == 0).then_some(())
    })
    .await;
    wait(topology, "statistics equal to the rows", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM event.events").fetch_one(pool).await.ok()?;
        let statistics = topology.http.get(topology.url("gateway-2", "/api/v1/events/statistics")).send().await.ok()?;
        let statistics: Value = statistics.json().await.ok()?;
        let processed = statistics["processed_events"].as_i64();
        (statistics["total_events"].as_i64() == Some(rows) && processed == Some(rows)).then_some(())
    })
    .await;

    // Every stored event of the round delivered at least once.
    let redelivered = wait(topology, "every event delivered", || async {
        let delivered = topology.delivered.lock().ok()?;
        let missing = distinct.iter().filter(|id| !delivered.contains_key(&id.to_string())).count();
        (missing == 0)
            .then(|| distinct.iter().filter(|id| delivered.get(&id.to_string()).is_some_and(|n| *n > 1)).count())
    })
    .await;

    // The default projection of every stream caught up with its last version.
    wait(topology, "every projection caught up", || async {
        for (stream, _, _, last) in &streams {
            let (entity_type, entity_id) = stream.split_once(':')?;
            let folded: Option<i64> = sqlx::query_scalar(
                "SELECT stream_version FROM event.event_projections \
                 WHERE projection_name = 'default' AND entity_type = $1 AND entity_id = $2",
            )
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(pool)
            .await
            .ok()?;
            if folded != Some(*last) {
                return None;
            }
        }
        Some(())
    })
    .await;

    let unknown_stored = distinct.iter().filter(|id| sent.unknown.contains(id)).count();
    Figures {
        fault: fault.to_owned(),
        acked: sent.acked.len(),
        unknown_stored,
        stored: distinct.len(),
        duplicates,
        retries: sent.retries,
        redelivered,
        caught_up: started.elapsed(),
    }
}

/// The round's messages on STORED, in order: (event id, EVENTS sequence) from each payload.
async fn read_stored(url: &str, tag: &str) -> Option<Vec<(Uuid, i64)>> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    let servers: Vec<&str> = url.split(',').collect();
    let jetstream = async_nats::jetstream::new(async_nats::connect(servers.as_slice()).await.ok()?);
    let stream = jetstream.get_stream("STORED").await.ok()?;
    let filter_subject = format!("event.stored.*.*.fault.{tag}.>");
    let consumer = stream.create_consumer(OrderedConfig { filter_subject, ..Default::default() }).await.ok()?;
    let mut messages = consumer.messages().await.ok()?;
    let mut got = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
        let event: Value = serde_json::from_slice(&message.payload).ok()?;
        got.push((event["event_id"].as_str()?.parse().ok()?, event["stream_seq"].as_i64()?));
    }
    Some(got)
}

/// Polls `check` until it answers, or fails the test after [`CATCH_UP`].
async fn wait<T, F, Fut>(topology: &Topology, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + CATCH_UP;
    loop {
        if let Some(answer) = check().await {
            return answer;
        }
        assert!(Instant::now() < deadline, "not within {CATCH_UP:?}: {what}; logs in {}", topology.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The figures as a Markdown table, for the summary.
pub fn table(figures: &[Figures]) -> String {
    let mut table = String::from(
        "| fault | acked | stored | sent unanswered, stored | duplicates | retried requests | redelivered | caught up |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for f in figures {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |\n",
            f.fault,
            f.acked,
            f.stored,
            f.unknown_stored,
            f.duplicates,
            f.retries,
            f.redelivered,
            f.caught_up.as_secs_f64()
        ));
    }
    table
}
