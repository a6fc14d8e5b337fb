//! The batch write of the persister: new events, their entity-stream versions, the rollups and
//! the stream position, in one transaction.
//!
//! Reads and writes `event.event_ids`, `event.events`, `event.event_streams`, the
//! `event.rollup_*` tables and `event.persister_position`. Guarantees: idempotent by event id,
//! for as long as the event is retained (a redelivered event changes nothing); gapless stream versions in batch order; every rollup and the position move in the
//! same transaction as the rows they count.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::NewEvent;
use super::position::Advance;
use super::rollups;
use crate::domain::StreamId;

/// What [`insert_batch`] did.
#[derive(Debug)]
pub enum InsertOutcome {
    /// Committed; these events were written now (the others were already stored).
    Stored(Written),
    /// Another writer moved the position meanwhile; nothing was written. Read the position
    /// again and retry.
    Conflict,
}

/// The events one write stored now: their entity-stream versions (None outside a stream), and
/// the time their rows were stored at (the transaction's).
#[derive(Debug, Default)]
pub struct Written {
    pub versions: HashMap<Uuid, Option<i64>>,
    pub stored_at: Option<DateTime<Utc>>,
}

impl Written {
    pub fn contains(&self, event_id: &Uuid) -> bool {
        self.versions.contains_key(event_id)
    }
}

/// The stored ids among `$1`, from `event.event_ids` (one primary key for every partition of
/// `event.events`). A join on `unnest` rather than `= ANY($1)`: with a generic plan (a
/// prepared statement's sixth run) `ANY` can turn into a scan of the table while it is small
/// and stay a slow plan; the join always probes the primary key once per id.
pub(super) const STORED_AMONG: &str =
    "SELECT e.event_id FROM unnest($1::uuid[]) AS i(event_id) JOIN event.event_ids e USING (event_id)";

/// Claims the batch's ids in `event.event_ids`, with the `stored_at` their rows get (`now()`,
/// the transaction's time, the column's default), and returns the events whose id was free, in
/// batch order (the first of two with one id), and the `stored_at`. An id claimed by a writer that has not
/// committed yet waits for it: stored then, or free again if it rolled back.
async fn claim_ids<'a>(
    tx: &mut Transaction<'_, Postgres>,
    batch: &[NewEvent<'a>],
) -> Result<(Vec<NewEvent<'a>>, Option<DateTime<Utc>>), sqlx::Error> {
    if batch.is_empty() {
        return Ok((Vec::new(), None));
    }
    let ids: Vec<Uuid> = batch.iter().map(|new| new.incoming.event.event_id).collect();
    // Neither sorted nor deduplicated: writers of a batch take turns on the position row
    // first, and DO NOTHING skips the second of two equal ids in one statement.
    let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO event.event_ids (event_id, stored_at) SELECT unnest($1::uuid[]), now() \
         ON CONFLICT DO NOTHING RETURNING event_id, stored_at",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let stored_at = rows.first().map(|(_, stored_at)| *stored_at);
    let mut claimed: HashSet<Uuid> = rows.into_iter().map(|(id, _)| id).collect();
    Ok((batch.iter().copied().filter(|new| claimed.remove(&new.incoming.event.event_id)).collect(), stored_at))
}

/// Stores a batch in one transaction, moving the stream position from `advance.from` to
/// `advance.to` when given. Events already stored are skipped. Versions of each entity stream
/// follow the batch order, which must be the JetStream order.
pub async fn insert_batch(
    pool: &PgPool,
    batch: &[NewEvent<'_>],
    advance: Option<Advance<'_>>,
) -> Result<InsertOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(advance) = advance {
        // Also locks the position row, so concurrent persisters take turns.
        let moved = sqlx::query(
            "UPDATE event.persister_position
             SET last_seq = $3, announced_seq = GREATEST(announced_seq, $4), updated_at = now()
             WHERE stream = $1 AND last_seq = $2",
        )
        .bind(advance.stream)
        .bind(advance.from as i64)
        .bind(advance.to as i64)
        .bind(advance.announced as i64)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(InsertOutcome::Conflict);
        }
    }
    let (fresh, stored_at) = claim_ids(&mut tx, batch).await?;
    let mut written = Written { versions: HashMap::with_capacity(fresh.len()), stored_at };
    if !fresh.is_empty() {
        let versions = assign_stream_versions(&mut tx, &fresh).await?;
        insert_events(&mut tx, &fresh, &versions).await?;
        rollups::add_events(&mut tx, &fresh).await?;
        written.versions = fresh.iter().map(|new| new.incoming.event.event_id).zip(versions).collect();
    }
    tx.commit().await?;
    Ok(InsertOutcome::Stored(written))
}

/// How many new events each touched stream gets, in stream id order.
fn stream_counts<'a>(fresh: &[NewEvent<'a>]) -> BTreeMap<&'a StreamId, i64> {
    let mut counts = BTreeMap::new();
    for new in fresh {
        if let Some(stream_id) = &new.incoming.event.stream_id {
            *counts.entry(stream_id).or_default() += 1;
        }
    }
    counts
}

/// The version of every fresh event (None outside any stream), in order, from each stream's
/// version after this batch (`finals`) and the batch's own counts.
fn versions_in_order(
    fresh: &[NewEvent<'_>],
    counts: &BTreeMap<&StreamId, i64>,
    finals: Vec<(StreamId, i64)>,
) -> Vec<Option<i64>> {
    // next[stream] = the version the stream's next fresh event gets.
    let mut next: BTreeMap<StreamId, i64> = finals
        .into_iter()
        .map(|(stream_id, final_version)| {
            let count = counts.get(&stream_id).copied().unwrap_or(0);
            (stream_id, final_version - count + 1)
        })
        .collect();
    fresh
        .iter()
        .map(|new| {
            let version = next.get_mut(new.incoming.event.stream_id.as_ref()?)?;
            *version += 1;
            Some(*version - 1)
        })
        .collect()
}

/// Bumps each touched stream's version by its number of new events and returns the version
/// of every fresh event (None for events outside any stream), in order.
async fn assign_stream_versions(
    tx: &mut Transaction<'_, Postgres>,
    fresh: &[NewEvent<'_>],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let counts = stream_counts(fresh);
    if counts.is_empty() {
        return Ok(vec![None; fresh.len()]);
    }
    let (mut stream_ids, mut entity_types, mut entity_ids, mut added) = (vec![], vec![], vec![], vec![]);
    for (stream_id, count) in &counts {
        let text = stream_id.as_str();
        let (entity_type, entity_id) = text.split_once(':').unwrap_or((text, ""));
        stream_ids.push(text);
        entity_types.push(entity_type);
        entity_ids.push(entity_id);
        added.push(*count);
    }
    // Sorted stream ids keep row locks in one order across concurrent writers.
    let finals: Vec<(StreamId, i64)> = sqlx::query_as(
        "INSERT INTO event.event_streams AS s (stream_id, stream_type, entity_type, entity_id, version)
         SELECT t.stream_id, t.entity_type, t.entity_type, t.entity_id, t.added
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(stream_id, entity_type, entity_id, added)
         ORDER BY t.stream_id
         ON CONFLICT (stream_id) DO UPDATE SET version = s.version + EXCLUDED.version, updated_at = now()
         RETURNING stream_id, version",
    )
    .bind(&stream_ids)
    .bind(&entity_types)
    .bind(&entity_ids)
    .bind(&added)
    .fetch_all(&mut **tx)
    .await?;
    Ok(versions_in_order(fresh, &counts, finals))
}

async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    fresh: &[NewEvent<'_>],
    versions: &[Option<i64>],
) -> Result<(), sqlx::Error> {
    let n = fresh.len();
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut categories = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut sessions = Vec::with_capacity(n);
    let mut organizations = Vec::with_capacity(n);
    let mut devices = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut context = Vec::with_capacity(n);
    let mut properties = Vec::with_capacity(n);
    let mut stream_ids = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    let mut timestamps = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    for new in fresh {
        let event = &new.incoming.event;
        ids.push(event.event_id);
        types.push(event.event_type.as_str());
        sources.push(event.event_source.as_str());
        categories.push(event.event_category.as_str());
        users.push(event.user_id.as_deref());
        sessions.push(event.session_id.as_deref());
        organizations.push(event.organization_id.as_deref());
        devices.push(event.device_id.as_deref());
        correlations.push(event.correlation_id.as_deref());
        data.push(sqlx::types::Json(&event.data));
        metadata.push(sqlx::types::Json(&event.metadata));
        context.push(sqlx::types::Json(&event.context));
        properties.push(sqlx::types::Json(&event.properties));
        stream_ids.push(event.stream_id.as_ref().map(StreamId::as_str));
        seqs.push(new.incoming.stream_seq as i64);
        subjects.push(new.incoming.subject.as_str());
        timestamps.push(event.timestamp);
        created.push(event.created_at);
        statuses.push(new.status.as_str());
    }
    sqlx::query(
        "INSERT INTO event.events (event_id, event_type, event_source, event_category, user_id, session_id,
             organization_id, device_id, correlation_id, data, metadata, context, properties, stream_id,
             stream_version, stream_seq, subject, \"timestamp\", created_at, status, processed_at)
         SELECT *, CASE WHEN status = 'processed' THEN now() END
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
             $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::jsonb[], $12::jsonb[], $13::jsonb[],
             $14::text[], $15::bigint[], $16::bigint[], $17::text[], $18::timestamptz[], $19::timestamptz[],
             $20::text[]) AS t(event_id, event_type, event_source, event_category, user_id, session_id,
             organization_id, device_id, correlation_id, data, metadata, context, properties, stream_id,
             stream_version, stream_seq, subject, \"timestamp\", created_at, status)",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&sources)
    .bind(&categories)
    .bind(&users)
    .bind(&sessions)
    .bind(&organizations)
    .bind(&devices)
    .bind(&correlations)
    .bind(&data)
    .bind(&metadata)
    .bind(&context)
    .bind(&properties)
    .bind(&stream_ids)
    .bind(versions)
    .bind(&seqs)
    .bind(&subjects)
    .bind(&timestamps)
    .bind(&created)
    .bind(&statuses)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventStatus;
    use crate::domain::parse::{Defaults, parse_event};
    use crate::wire::Incoming;
    use serde_json::json;

    fn incoming(stream: Option<&str>, seq: u64) -> Incoming {
        let mut request = json!({"event_type": "t"});
        if let Some(stream) = stream {
            request["stream_id"] = json!(stream);
        }
        let event = parse_event(request, &Defaults::http(chrono::Utc::now())).unwrap();
        let trace = crate::wire::trace::TraceContext::for_event(event.event_id);
        Incoming { event, stream_seq: seq, subject: "events.backend.user_action.t".into(), trace }
    }

    #[test]
    fn versions_follow_the_batch_order_within_each_stream() {
        let batch = [incoming(Some("a:1"), 1), incoming(None, 2), incoming(Some("b:1"), 3), incoming(Some("a:1"), 4)];
        let fresh: Vec<NewEvent> =
            batch.iter().map(|incoming| NewEvent { incoming, status: EventStatus::Pending }).collect();
        let counts = stream_counts(&fresh);
        let a = StreamId::parse("a:1").unwrap();
        let b = StreamId::parse("b:1").unwrap();
        assert_eq!(counts.get(&a), Some(&2));
        // Stream a had 5 events before this batch, b none.
        let versions = versions_in_order(&fresh, &counts, vec![(a, 7), (b, 1)]);
        assert_eq!(versions, [Some(6), None, Some(1), Some(7)]);
    }
}
