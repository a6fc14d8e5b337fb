//! The event store in PostgreSQL: batch insert with stream versions and statistics rollups,
//! lookup by id, filtered queries and statistics.
//!
//! Reads and writes `event.events`, `event.event_streams` and the `event.rollup_*` tables.
//! Guarantees: [`insert_batch`] is idempotent by event id (a redelivered event changes
//! nothing), assigns gapless stream versions in batch order, and updates every rollup and the
//! persister's stream position in the same transaction as the rows it counts.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::model::{Event, EventCategory, EventSource, EventStatus};

/// An event with where JetStream put it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub event: Event,
    pub stream_seq: u64,
    pub subject: String,
    /// The status it is stored with: `pending`, or `processed` when no processor takes it
    /// (the persister decides; see [`crate::persister`]).
    pub status: EventStatus,
}

/// What [`insert_batch`] did.
#[derive(Debug)]
pub enum InsertOutcome {
    /// Committed; these events were written now (the others were already stored).
    Stored(HashSet<Uuid>),
    /// Another writer moved the position or wrote the same events meanwhile; nothing was
    /// written. Read the position again and retry.
    Conflict,
}

/// The stream sequence up to which the persister has stored `stream`; creates the position
/// row (at 0) the first time, so the persister's first batch can move it.
pub async fn persisted_position(pool: &PgPool, stream: &str) -> Result<u64, sqlx::Error> {
    sqlx::query("INSERT INTO event.persister_position (stream, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(stream)
        .execute(pool)
        .await?;
    read_position(pool, stream).await
}

/// The stored position, read only (0 before the persister's first batch).
pub async fn read_position(pool: &PgPool, stream: &str) -> Result<u64, sqlx::Error> {
    let position: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM event.persister_position WHERE stream = $1")
        .bind(stream)
        .fetch_optional(pool)
        .await?;
    Ok(position.unwrap_or(0).max(0) as u64)
}

/// Moves the position back, for a JetStream stream that was recreated and numbers anew.
pub async fn reset_position(pool: &PgPool, stream: &str, last_seq: u64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE event.persister_position SET last_seq = $2, updated_at = now() WHERE stream = $1")
        .bind(stream)
        .bind(last_seq as i64)
        .execute(pool)
        .await?;
    Ok(())
}

/// Where a batch sits in its JetStream stream: it continues `from` and ends at `to`.
#[derive(Debug, Clone, Copy)]
pub struct Advance<'a> {
    pub stream: &'a str,
    pub from: u64,
    pub to: u64,
}

/// Stores a batch in one transaction, moving the stream position from `advance.from` to
/// `advance.to` when given. Events already stored are skipped. Versions of each entity stream
/// follow the batch order, which must be the JetStream order.
pub async fn insert_batch(
    pool: &PgPool,
    batch: &[&Incoming],
    advance: Option<Advance<'_>>,
) -> Result<InsertOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(advance) = advance {
        // Also locks the position row, so concurrent persisters take turns.
        let moved = sqlx::query(
            "UPDATE event.persister_position SET last_seq = $3, updated_at = now()
             WHERE stream = $1 AND last_seq = $2",
        )
        .bind(advance.stream)
        .bind(advance.from as i64)
        .bind(advance.to as i64)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(InsertOutcome::Conflict);
        }
    }
    let ids: Vec<Uuid> = batch.iter().map(|incoming| incoming.event.event_id).collect();
    let existing: HashSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>(STORED_AMONG).bind(&ids).fetch_all(&mut *tx).await?.into_iter().collect();
    let mut seen = HashSet::new();
    let fresh: Vec<&Incoming> = batch
        .iter()
        .copied()
        .filter(|incoming| !existing.contains(&incoming.event.event_id) && seen.insert(incoming.event.event_id))
        .collect();
    if !fresh.is_empty() {
        let versions = assign_stream_versions(&mut tx, &fresh).await?;
        let rows = insert_events(&mut tx, &fresh, &versions).await?;
        if rows != fresh.len() as u64 {
            // Someone else wrote one of these events between our check and our insert.
            tx.rollback().await?;
            return Ok(InsertOutcome::Conflict);
        }
        update_rollups(&mut tx, &fresh).await?;
    }
    tx.commit().await?;
    Ok(InsertOutcome::Stored(seen))
}

/// Bumps each touched stream's version by its number of new events and returns the version
/// of every fresh event (None for events outside any stream), in order.
async fn assign_stream_versions(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    fresh: &[&Incoming],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for incoming in fresh {
        if let Some(stream_id) = &incoming.event.stream_id {
            *counts.entry(stream_id.as_str()).or_default() += 1;
        }
    }
    if counts.is_empty() {
        return Ok(vec![None; fresh.len()]);
    }
    let (mut stream_ids, mut entity_types, mut entity_ids, mut added) = (vec![], vec![], vec![], vec![]);
    for (stream_id, count) in &counts {
        let (entity_type, entity_id) = stream_id.split_once(':').unwrap_or((stream_id, ""));
        stream_ids.push(*stream_id);
        entity_types.push(entity_type);
        entity_ids.push(entity_id);
        added.push(*count);
    }
    // Sorted stream ids keep row locks in one order across concurrent writers.
    let finals: Vec<(String, i64)> = sqlx::query_as(
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
    // next[stream] = the version the stream's next fresh event gets.
    let mut next: BTreeMap<String, i64> = finals
        .into_iter()
        .map(|(stream_id, final_version)| {
            let count = counts.get(stream_id.as_str()).copied().unwrap_or(0);
            (stream_id, final_version - count + 1)
        })
        .collect();
    Ok(fresh
        .iter()
        .map(|incoming| {
            let stream_id = incoming.event.stream_id.as_ref()?;
            let version = next.get_mut(stream_id)?;
            *version += 1;
            Some(*version - 1)
        })
        .collect())
}

async fn insert_events(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    fresh: &[&Incoming],
    versions: &[Option<i64>],
) -> Result<u64, sqlx::Error> {
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
    for incoming in fresh {
        let event = &incoming.event;
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
        stream_ids.push(event.stream_id.as_deref());
        seqs.push(incoming.stream_seq as i64);
        subjects.push(incoming.subject.as_str());
        timestamps.push(event.timestamp);
        created.push(event.created_at);
        statuses.push(incoming.status.as_str());
    }
    let result = sqlx::query(
        "INSERT INTO event.events (event_id, event_type, event_source, event_category, user_id, session_id,
             organization_id, device_id, correlation_id, data, metadata, context, properties, stream_id,
             stream_version, stream_seq, subject, \"timestamp\", created_at, status, processed_at)
         SELECT *, CASE WHEN status = 'processed' THEN now() END
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
             $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::jsonb[], $12::jsonb[], $13::jsonb[],
             $14::text[], $15::bigint[], $16::bigint[], $17::text[], $18::timestamptz[], $19::timestamptz[],
             $20::text[]) AS t(event_id, event_type, event_source, event_category, user_id, session_id,
             organization_id, device_id, correlation_id, data, metadata, context, properties, stream_id,
             stream_version, stream_seq, subject, \"timestamp\", created_at, status)
         ON CONFLICT (event_id) DO NOTHING",
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
    Ok(result.rows_affected())
}

/// Every transaction that moves rollup counts takes this lock before it touches a rollup row
/// (the persister adding events, the processor moving statuses), as late as it can: it is
/// held until the commit. The rows of a data-modifying statement are locked in no fixed
/// order, so without it two such transactions can deadlock on the shared counter rows; they
/// would wait for each other on those rows anyway. Nobody waits for another lock while
/// holding it.
pub async fn lock_rollups(tx: &mut sqlx::Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    const ROLLUPS_LOCK: i64 = 0x6576_5f72_6f6c_6c75;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ROLLUPS_LOCK).execute(&mut **tx).await?;
    Ok(())
}

/// Adds the fresh events to every rollup. Events stored `processed` count towards the
/// processing time too (from `created_at` to now).
async fn update_rollups(tx: &mut sqlx::Transaction<'_, Postgres>, fresh: &[&Incoming]) -> Result<(), sqlx::Error> {
    lock_rollups(tx).await?;
    type DayKey<'a> = (NaiveDate, &'a str, &'a str, &'a str);
    let now = Utc::now();
    let mut daily: BTreeMap<DayKey, i64> = BTreeMap::new();
    let mut user_daily: BTreeMap<(&str, DayKey), i64> = BTreeMap::new();
    let mut counts = StatusCounts::default();
    for incoming in fresh {
        let event = &incoming.event;
        let user = event.user_id.as_deref();
        let key = (
            event.timestamp.date_naive(),
            event.event_source.as_str(),
            event.event_category.as_str(),
            event.event_type.as_str(),
        );
        *daily.entry(key).or_default() += 1;
        if let Some(user) = user {
            *user_daily.entry((user, key)).or_default() += 1;
            counts.event(user);
        }
        counts.add(user, incoming.status, 1);
        if incoming.status == EventStatus::Processed {
            counts.processed(user, (now - event.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    let (d_days, d_sources, d_categories, d_types, d_counts) = unzip_days(daily.iter().map(|(k, v)| (*k, *v)));
    let mut u_users = Vec::with_capacity(user_daily.len());
    let (u_days, u_sources, u_categories, u_types, u_counts) = unzip_days(user_daily.iter().map(|((user, k), v)| {
        u_users.push(*user);
        (*k, *v)
    }));
    sqlx::query(
        "WITH daily AS (
             INSERT INTO event.rollup_daily AS r (day, event_source, event_category, event_type, events)
             SELECT * FROM UNNEST($1::date[], $2::text[], $3::text[], $4::text[], $5::bigint[])
             ON CONFLICT (day, event_source, event_category, event_type) DO UPDATE SET events = r.events + EXCLUDED.events
         )
         INSERT INTO event.rollup_user_daily AS r (user_id, day, event_source, event_category, event_type, events)
         SELECT * FROM UNNEST($6::text[], $7::date[], $8::text[], $9::text[], $10::text[], $11::bigint[])
         ON CONFLICT (user_id, day, event_source, event_category, event_type) DO UPDATE SET events = r.events + EXCLUDED.events",
    )
    .bind(&d_days)
    .bind(&d_sources)
    .bind(&d_categories)
    .bind(&d_types)
    .bind(&d_counts)
    .bind(&u_users)
    .bind(&u_days)
    .bind(&u_sources)
    .bind(&u_categories)
    .bind(&u_types)
    .bind(&u_counts)
    .execute(&mut **tx)
    .await?;
    add_status_counts(tx, &counts).await
}

/// What to add to the status and processing-time rollups: events per status (a move from
/// one status to another is -1 and +1), all and per user, new events per user, and newly
/// processed events with their time from `created_at` to `processed`.
#[derive(Debug, Default)]
pub struct StatusCounts<'a> {
    statuses: BTreeMap<&'a str, i64>,
    /// `rollup_processing`'s one row: processed events and their total milliseconds.
    processing: (i64, f64),
    users: BTreeMap<&'a str, UserCounts>,
}

/// One user's row of `rollup_users`, as deltas.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct UserCounts {
    events: i64,
    /// In the order of [`EventStatus::ALL`].
    statuses: [i64; 5],
    timed: i64,
    total_ms: f64,
}

impl<'a> StatusCounts<'a> {
    /// `delta` events (1 new, or -1 and +1 for a move) in `status`.
    pub fn add(&mut self, user: Option<&'a str>, status: EventStatus, delta: i64) {
        *self.statuses.entry(status.as_str()).or_default() += delta;
        if let Some(user) = user {
            self.users.entry(user).or_default().statuses[status_column(status)] += delta;
        }
    }

    /// A user's new event.
    pub fn event(&mut self, user: &'a str) {
        self.users.entry(user).or_default().events += 1;
    }

    pub fn processed(&mut self, user: Option<&'a str>, ms: f64) {
        let ms = ms.max(0.0);
        self.processing.0 += 1;
        self.processing.1 += ms;
        if let Some(user) = user {
            let counts = self.users.entry(user).or_default();
            counts.timed += 1;
            counts.total_ms += ms;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.statuses.values().all(|delta| *delta == 0)
            && self.processing.0 == 0
            && self.users.values().all(|counts| *counts == UserCounts::default())
    }
}

fn status_column(status: EventStatus) -> usize {
    EventStatus::ALL.iter().position(|known| *known == status).unwrap_or(0)
}

/// Adds [`StatusCounts`] to the rollups, in one statement. The caller holds [`lock_rollups`].
pub async fn add_status_counts(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    counts: &StatusCounts<'_>,
) -> Result<(), sqlx::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let (statuses, status_deltas): (Vec<&str>, Vec<i64>) =
        counts.statuses.iter().filter(|(_, delta)| **delta != 0).map(|(status, delta)| (*status, *delta)).unzip();
    let n = counts.users.len();
    let mut users = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut by_status: [Vec<i64>; 5] = Default::default();
    let (mut timed, mut total_ms) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (user, row) in counts.users.iter().filter(|(_, row)| **row != UserCounts::default()) {
        users.push(*user);
        events.push(row.events);
        for (column, delta) in by_status.iter_mut().zip(row.statuses) {
            column.push(delta);
        }
        timed.push(row.timed);
        total_ms.push(row.total_ms);
    }
    let [pending, processing, processed, failed, archived] = by_status;
    sqlx::query(
        "WITH by_status AS (
             INSERT INTO event.rollup_status AS r (status, events) SELECT * FROM UNNEST($1::text[], $2::bigint[])
             ON CONFLICT (status) DO UPDATE SET events = r.events + EXCLUDED.events
         ), timing AS (
             INSERT INTO event.rollup_processing AS r (user_id, processed, total_ms)
             SELECT '', $3, $4 WHERE $3 > 0
             ON CONFLICT (user_id) DO UPDATE SET processed = r.processed + EXCLUDED.processed,
                 total_ms = r.total_ms + EXCLUDED.total_ms
         )
         INSERT INTO event.rollup_users AS r
             (user_id, events, pending, processing, processed, failed, archived, timed, total_ms)
         SELECT * FROM UNNEST($5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
             $11::bigint[], $12::bigint[], $13::float8[])
         ON CONFLICT (user_id) DO UPDATE SET events = r.events + EXCLUDED.events,
             pending = r.pending + EXCLUDED.pending, processing = r.processing + EXCLUDED.processing,
             processed = r.processed + EXCLUDED.processed, failed = r.failed + EXCLUDED.failed,
             archived = r.archived + EXCLUDED.archived, timed = r.timed + EXCLUDED.timed,
             total_ms = r.total_ms + EXCLUDED.total_ms",
    )
    .bind(&statuses)
    .bind(&status_deltas)
    .bind(counts.processing.0)
    .bind(counts.processing.1)
    .bind(&users)
    .bind(&events)
    .bind(&pending)
    .bind(&processing)
    .bind(&processed)
    .bind(&failed)
    .bind(&archived)
    .bind(&timed)
    .bind(&total_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

type DayColumns<'a> = (Vec<NaiveDate>, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<i64>);

fn unzip_days<'a>(rows: impl Iterator<Item = ((NaiveDate, &'a str, &'a str, &'a str), i64)>) -> DayColumns<'a> {
    let mut columns: DayColumns<'a> = Default::default();
    for ((day, source, category, event_type), count) in rows {
        columns.0.push(day);
        columns.1.push(source);
        columns.2.push(category);
        columns.3.push(event_type);
        columns.4.push(count);
    }
    columns
}

/// A stored event, every column, as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_source: String,
    pub event_category: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub organization_id: Option<String>,
    pub device_id: Option<String>,
    pub correlation_id: Option<String>,
    pub data: Value,
    pub metadata: Value,
    pub context: Value,
    pub properties: Value,
    pub status: String,
    pub processors: Vec<String>,
    pub retry_count: i32,
    pub error_message: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    pub stream_id: Option<String>,
    pub stream_version: Option<i64>,
    pub stream_seq: i64,
    pub subject: String,
    pub timestamp: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub stored_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl StoredEvent {
    /// The event as it travels on `events.>` (what processors receive).
    pub fn to_event(&self) -> Event {
        let object = |value: &Value| value.as_object().cloned().unwrap_or_default();
        Event {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            event_source: EventSource::parse(&self.event_source).unwrap_or(EventSource::Backend),
            event_category: EventCategory::parse(&self.event_category).unwrap_or(EventCategory::UserAction),
            user_id: self.user_id.clone(),
            session_id: self.session_id.clone(),
            organization_id: self.organization_id.clone(),
            device_id: self.device_id.clone(),
            correlation_id: self.correlation_id.clone(),
            data: object(&self.data),
            metadata: object(&self.metadata),
            context: object(&self.context),
            properties: object(&self.properties),
            stream_id: self.stream_id.clone(),
            timestamp: self.timestamp,
            created_at: self.created_at,
        }
    }
}

pub(crate) const EVENT_COLUMNS: &str = "event_id, event_type, event_source, event_category, user_id, session_id, \
    organization_id, device_id, correlation_id, data, metadata, context, properties, status, processors, \
    retry_count, error_message, processed_at, stream_id, stream_version, stream_seq, subject, \"timestamp\", \
    created_at, stored_at, updated_at";

pub async fn get_event(pool: &PgPool, event_id: Uuid) -> Result<Option<StoredEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {EVENT_COLUMNS} FROM event.events WHERE event_id = $1")))
        .bind(event_id)
        .fetch_optional(pool)
        .await
}

/// The stored events among `ids`, oldest (in stream order) first.
pub async fn events_by_ids(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM event.events JOIN (SELECT DISTINCT unnest($1::uuid[])) AS i(event_id) USING (event_id) \
         ORDER BY stream_seq"
    )))
    .bind(ids)
    .fetch_all(pool)
    .await
}

pub async fn event_exists(pool: &PgPool, event_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event.events WHERE event_id = $1)")
        .bind(event_id)
        .fetch_one(pool)
        .await
}

/// The stored ids among `$1`. A join on `unnest` rather than `= ANY($1)`: with a generic plan
/// (a prepared statement's sixth run) `ANY` can turn into a scan of the table while it is
/// small and stay a slow plan; the join always probes the primary key once per id.
const STORED_AMONG: &str =
    "SELECT e.event_id FROM unnest($1::uuid[]) AS i(event_id) JOIN event.events e USING (event_id)";

/// The ids among `ids` that are stored.
pub async fn stored_ids(pool: &PgPool, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let found: Vec<Uuid> = sqlx::query_scalar(STORED_AMONG).bind(ids).fetch_all(pool).await?;
    Ok(found.into_iter().collect())
}

/// Where a stored event sits: its entity stream and version, and the EVENTS message it was
/// stored from.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredPosition {
    pub event_id: Uuid,
    pub stream_id: Option<String>,
    pub stream_version: Option<i64>,
    pub stream_seq: i64,
}

/// The stored events among `ids`, by id.
pub async fn stored_positions(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, StoredPosition>, sqlx::Error> {
    let rows: Vec<StoredPosition> = sqlx::query_as(
        "SELECT event_id, stream_id, stream_version, stream_seq FROM event.events WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|row| (row.event_id, row)).collect())
}

/// Filters of `POST /api/v1/events/query`, already validated.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub user_id: Option<String>,
    pub event_type: Option<String>,
    pub event_source: Option<EventSource>,
    pub event_category: Option<EventCategory>,
    pub status: Option<EventStatus>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub data: Option<Value>,
    pub limit: i64,
    pub offset: i64,
}

impl EventFilter {
    fn push_where(&self, sql: &mut QueryBuilder<Postgres>) {
        sql.push(" WHERE TRUE");
        if let Some(user_id) = &self.user_id {
            sql.push(" AND user_id = ").push_bind(user_id.clone());
        }
        if let Some(event_type) = &self.event_type {
            sql.push(" AND event_type = ").push_bind(event_type.clone());
        }
        if let Some(source) = self.event_source {
            sql.push(" AND event_source = ").push_bind(source.as_str());
        }
        if let Some(category) = self.event_category {
            sql.push(" AND event_category = ").push_bind(category.as_str());
        }
        if let Some(status) = self.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(start) = self.start_time {
            sql.push(" AND \"timestamp\" >= ").push_bind(start);
        }
        if let Some(end) = self.end_time {
            sql.push(" AND \"timestamp\" <= ").push_bind(end);
        }
        if let Some(data) = &self.data {
            sql.push(" AND data @> ").push_bind(data.clone()).push("::jsonb");
        }
    }
}

/// How many events a query matches: exact, or a lower bound when counting would mean reading
/// more than [`COUNT_BEYOND_PAGE`] rows past the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Total {
    pub count: i64,
    pub exact: bool,
}

/// Rows counted past the end of the requested page before a total is given as "at least".
/// Counting is the costly part of a broad query (a data filter matching a third of 10 M events:
/// 126 ms to count 100 000 matches, 3 ms for the page), so the bound stays small.
pub const COUNT_BEYOND_PAGE: i64 = 10_000;

/// Matching events, newest first, and how many match in all.
///
/// The total comes from the statistics rollups when the filter is one they count (any of user,
/// type, source, category; or status, with or without user), which is exact and independent
/// of the table's size. Other filters count matching rows up to [`COUNT_BEYOND_PAGE`] past
/// the page, so a broad filter over millions of events still answers in milliseconds.
pub async fn query_events(pool: &PgPool, filter: &EventFilter) -> Result<(Vec<StoredEvent>, Total), sqlx::Error> {
    let mut select = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM event.events"));
    filter.push_where(&mut select);
    select
        .push(" ORDER BY \"timestamp\" DESC, event_id DESC LIMIT ")
        .push_bind(filter.limit)
        .push(" OFFSET ")
        .push_bind(filter.offset);
    let events: Vec<StoredEvent> = select.build_query_as().fetch_all(pool).await?;
    if filter.offset == 0 && (events.len() as i64) < filter.limit {
        let count = events.len() as i64;
        return Ok((events, Total { count, exact: true }));
    }
    if let Some(count) = count_from_rollups(pool, filter).await? {
        return Ok((events, Total { count, exact: true }));
    }
    let cap = filter.offset.saturating_add(filter.limit).saturating_add(COUNT_BEYOND_PAGE);
    let mut count = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM event.events");
    filter.push_where(&mut count);
    count.push(" LIMIT ").push_bind(cap).push(") AS matching");
    let counted: i64 = count.build_query_scalar().fetch_one(pool).await?;
    Ok((events, Total { count: counted, exact: counted < cap }))
}

/// The exact number of matching events from the rollups, when the filter is one they count.
async fn count_from_rollups(pool: &PgPool, filter: &EventFilter) -> Result<Option<i64>, sqlx::Error> {
    if filter.start_time.is_some() || filter.end_time.is_some() || filter.data.is_some() {
        return Ok(None);
    }
    let by_kind = filter.event_type.is_some() || filter.event_source.is_some() || filter.event_category.is_some();
    let mut sql = match (filter.status, by_kind, &filter.user_id) {
        (Some(status), false, None) => {
            let mut sql =
                QueryBuilder::new("SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_status WHERE status = ");
            sql.push_bind(status.as_str());
            sql
        }
        (Some(status), false, Some(user_id)) => {
            // The column is one of the fixed status names, never user input.
            let mut sql = QueryBuilder::new(format!(
                "SELECT COALESCE(sum({}), 0)::bigint FROM event.rollup_users WHERE user_id = ",
                status.as_str()
            ));
            sql.push_bind(user_id.clone());
            sql
        }
        (Some(_), true, _) => return Ok(None),
        (None, false, None) => {
            QueryBuilder::new("SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_status WHERE TRUE")
        }
        (None, false, Some(user_id)) => {
            let mut sql =
                QueryBuilder::new("SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_users WHERE user_id = ");
            sql.push_bind(user_id.clone());
            sql
        }
        (None, true, user_id) => {
            let mut sql = match user_id {
                Some(user_id) => {
                    let mut sql = QueryBuilder::new(
                        "SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_user_daily WHERE user_id = ",
                    );
                    sql.push_bind(user_id.clone());
                    sql
                }
                None => QueryBuilder::new("SELECT COALESCE(sum(events), 0)::bigint FROM event.rollup_daily WHERE TRUE"),
            };
            if let Some(event_type) = &filter.event_type {
                sql.push(" AND event_type = ").push_bind(event_type.clone());
            }
            if let Some(source) = filter.event_source {
                sql.push(" AND event_source = ").push_bind(source.as_str());
            }
            if let Some(category) = filter.event_category {
                sql.push(" AND event_category = ").push_bind(category.as_str());
            }
            sql
        }
    };
    Ok(Some(sql.build_query_scalar().fetch_one(pool).await?))
}

/// The spec's EventStatistics.
#[derive(Debug, Clone, Serialize)]
pub struct Statistics {
    pub total_events: i64,
    pub pending_events: i64,
    pub processing_events: i64,
    pub processed_events: i64,
    pub failed_events: i64,
    pub events_by_source: BTreeMap<String, i64>,
    pub events_by_category: BTreeMap<String, i64>,
    pub events_by_type: BTreeMap<String, i64>,
    pub events_today: i64,
    pub events_this_week: i64,
    pub events_this_month: i64,
    /// Milliseconds.
    pub average_processing_time: f64,
    /// Percent of all events that are processed.
    pub processing_rate: f64,
    /// Percent of all events that failed.
    pub error_rate: f64,
    pub top_users: Vec<UserCount>,
    pub top_event_types: Vec<TypeCount>,
    pub calculated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserCount {
    pub user_id: String,
    pub event_count: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TypeCount {
    pub event_type: String,
    pub event_count: i64,
}

const TOP: usize = 10;

/// Statistics from the rollups only (never a scan of `event.events`); for one user when
/// `user_id` is given.
pub async fn statistics(pool: &PgPool, user_id: Option<&str>, now: DateTime<Utc>) -> Result<Statistics, sqlx::Error> {
    let today = now.date_naive();
    let week_start = today - Duration::days(i64::from(today.weekday().num_days_from_monday()));
    let month_start = today.with_day(1).unwrap_or(today);
    let user = user_id.unwrap_or("");

    let statuses: Vec<(String, i64)> = if user_id.is_some() {
        sqlx::query_as(
            "SELECT s.status, s.events FROM event.rollup_users u, LATERAL (VALUES ('pending', u.pending), \
                 ('processing', u.processing), ('processed', u.processed), ('failed', u.failed), \
                 ('archived', u.archived)) AS s(status, events) \
             WHERE u.user_id = $1",
        )
        .bind(user)
        .fetch_all(pool)
        .await?
    } else {
        sqlx::query_as("SELECT status, events FROM event.rollup_status").fetch_all(pool).await?
    };
    let table = if user_id.is_some() { "event.rollup_user_daily" } else { "event.rollup_daily" };
    let filter = if user_id.is_some() { "WHERE user_id = $4" } else { "WHERE $4::text IS NOT NULL" };
    let groups: Vec<(String, String, String, i64, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT event_source, event_category, event_type, sum(events)::bigint,
                COALESCE(sum(events) FILTER (WHERE day >= $1), 0)::bigint,
                COALESCE(sum(events) FILTER (WHERE day >= $2), 0)::bigint,
                COALESCE(sum(events) FILTER (WHERE day >= $3), 0)::bigint
         FROM {table} {filter} GROUP BY 1, 2, 3"
    )))
    .bind(today)
    .bind(week_start)
    .bind(month_start)
    .bind(user)
    .fetch_all(pool)
    .await?;
    let top_users: Vec<(String, i64)> = if user_id.is_some() {
        sqlx::query_as("SELECT user_id, events FROM event.rollup_users WHERE user_id = $1")
            .bind(user)
            .fetch_all(pool)
            .await?
    } else {
        sqlx::query_as("SELECT user_id, events FROM event.rollup_users ORDER BY events DESC, user_id LIMIT $1")
            .bind(TOP as i64)
            .fetch_all(pool)
            .await?
    };
    let processing: Option<(i64, f64)> = if user_id.is_some() {
        sqlx::query_as("SELECT timed, total_ms FROM event.rollup_users WHERE user_id = $1")
    } else {
        sqlx::query_as("SELECT processed, total_ms FROM event.rollup_processing WHERE user_id = $1")
    }
    .bind(user)
    .fetch_optional(pool)
    .await?;

    let count = |status: EventStatus| {
        statuses.iter().find(|(name, _)| name == status.as_str()).map_or(0, |(_, events)| *events)
    };
    let total_events: i64 = statuses.iter().map(|(_, events)| events).sum();
    let mut stats = Statistics {
        total_events,
        pending_events: count(EventStatus::Pending),
        processing_events: count(EventStatus::Processing),
        processed_events: count(EventStatus::Processed),
        failed_events: count(EventStatus::Failed),
        events_by_source: BTreeMap::new(),
        events_by_category: BTreeMap::new(),
        events_by_type: BTreeMap::new(),
        events_today: 0,
        events_this_week: 0,
        events_this_month: 0,
        average_processing_time: match processing {
            Some((processed, total_ms)) if processed > 0 => total_ms / processed as f64,
            _ => 0.0,
        },
        processing_rate: 0.0,
        error_rate: 0.0,
        top_users: top_users.into_iter().map(|(user_id, event_count)| UserCount { user_id, event_count }).collect(),
        top_event_types: Vec::new(),
        calculated_at: now,
    };
    if total_events > 0 {
        stats.processing_rate = percent(stats.processed_events, total_events);
        stats.error_rate = percent(stats.failed_events, total_events);
    }
    for (source, category, event_type, all, today, week, month) in groups {
        *stats.events_by_source.entry(source).or_default() += all;
        *stats.events_by_category.entry(category).or_default() += all;
        *stats.events_by_type.entry(event_type).or_default() += all;
        stats.events_today += today;
        stats.events_this_week += week;
        stats.events_this_month += month;
    }
    let mut types: Vec<TypeCount> = stats
        .events_by_type
        .iter()
        .map(|(event_type, event_count)| TypeCount { event_type: event_type.clone(), event_count: *event_count })
        .collect();
    types.sort_by(|a, b| b.event_count.cmp(&a.event_count).then_with(|| a.event_type.cmp(&b.event_type)));
    types.truncate(TOP);
    stats.top_event_types = types;
    Ok(stats)
}

fn percent(part: i64, whole: i64) -> f64 {
    (part as f64 * 10_000.0 / whole as f64).round() / 100.0
}
