//! Retention of stored events: `event.events` is partitioned by the day (UTC) of `stored_at`
//! (migration 0010). This module keeps partitions ready two days ahead and, with a retention
//! set, drops the partitions whose every event is older than it.
//!
//! Reads the catalog and the expiring partitions; creates and drops partitions; writes
//! `event.event_ids`, `event.event_streams.first_version`, the `event.rollup_*` tables,
//! `event.processing_results` and `event.delivery_attempts`. Guarantees:
//! - Events leave only by dropping a whole partition, never by deleting rows.
//! - A dropped partition takes its ids out of `event.event_ids` and its counts out of every
//!   rollup in one transaction: statistics and idempotency describe exactly the retained events.
//! - A partition's streams move their `first_version` past it in the transaction that detaches
//!   it: no reader sees its events gone while their stream still claims them.
//! - One maintainer at a time (an advisory lock); a partition detached but not yet dropped (a
//!   crash in between) is finished by the next run. Until then its ids and counts are still
//!   in the guard and the rollups (milliseconds, or an hour after a crash).
//! - Entity streams keep their versions (a stream goes on numbering after its early events
//!   leave) and record the oldest one retained (`first_version`); projections keep their
//!   folded state.

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::rollups;

/// Days of partitions kept ready after today. Few: every partition, empty or not, costs the
/// planner of every query that cannot prune by `stored_at`; the hourly run and the persister's
/// own fallback keep two days ahead more than enough.
pub const AHEAD_DAYS: u64 = 2;
/// Most log rows (processing results, delivery attempts) deleted in one statement.
const LOG_BATCH: i64 = 10_000;
const MAINTENANCE_LOCK: i64 = 0x6576_5f72_6574_656e;

/// A partition of `event.events`, known by its name: `events_pYYYYMMDD` holds that day,
/// `events_to_YYYYMMDD` (a store converted in place) everything before that day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// The first day it holds; `None` for everything before `upper`.
    pub lower: Option<NaiveDate>,
    /// The first day it no longer holds.
    pub upper: NaiveDate,
}

impl Partition {
    pub fn day(day: NaiveDate) -> Self {
        Self { name: format!("events_p{}", day.format("%Y%m%d")), lower: Some(day), upper: day + Days::new(1) }
    }

    /// The partition a name stands for; `None` for any other table.
    pub fn parse(name: &str) -> Option<Self> {
        let date = |digits: &str| NaiveDate::parse_from_str(digits, "%Y%m%d").ok().filter(|_| digits.len() == 8);
        if let Some(digits) = name.strip_prefix("events_to_") {
            return Some(Self { name: name.to_owned(), lower: None, upper: date(digits)? });
        }
        let day = date(name.strip_prefix("events_p")?)?;
        Some(Self::day(day))
    }

    fn holds(&self, day: NaiveDate) -> bool {
        self.lower.is_none_or(|lower| lower <= day) && day < self.upper
    }

    /// Whether every event it can hold was stored before `cutoff`.
    fn expired(&self, cutoff: DateTime<Utc>) -> bool {
        self.upper.and_time(NaiveTime::MIN).and_utc() <= cutoff
    }
}

/// What one maintenance run does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Days from today on that have no partition yet.
    pub create: Vec<NaiveDate>,
    /// Partitions whose events are all past the retention, oldest first.
    pub drop: Vec<Partition>,
}

/// Decides the run: partitions from `today` to `AHEAD_DAYS` after it, and, with a `cutoff`
/// (now minus the retention), the partitions entirely before it.
pub fn plan(existing: &[Partition], today: NaiveDate, cutoff: Option<DateTime<Utc>>) -> Plan {
    let create = (0..=AHEAD_DAYS)
        .map(|ahead| today + Days::new(ahead))
        .filter(|day| !existing.iter().any(|partition| partition.holds(*day)))
        .collect();
    let mut drop: Vec<Partition> = match cutoff {
        Some(cutoff) => existing.iter().filter(|partition| partition.expired(cutoff)).cloned().collect(),
        None => Vec::new(),
    };
    drop.sort_by_key(|partition| partition.upper);
    Plan { create, drop }
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub created: usize,
    pub dropped: Vec<String>,
    pub events_dropped: i64,
    pub log_rows_deleted: u64,
}

/// Keeps partitions ready and, with `retention`, drops what is past it as of `now`. `None`
/// when another maintainer is at it.
pub async fn maintain(
    pool: &PgPool,
    retention: Option<chrono::Duration>,
    now: DateTime<Utc>,
) -> Result<Option<Report>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(MAINTENANCE_LOCK).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(None);
    }
    let result = run(&mut conn, retention, now).await;
    if sqlx::query("SELECT pg_advisory_unlock($1)").bind(MAINTENANCE_LOCK).execute(&mut *conn).await.is_err() {
        // Closing the session is what releases the lock then.
        conn.close_on_drop();
    }
    result.map(Some)
}

async fn run(
    conn: &mut PgConnection,
    retention: Option<chrono::Duration>,
    now: DateTime<Utc>,
) -> Result<Report, sqlx::Error> {
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relispartition FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'event' AND c.relkind = 'r' AND c.relname LIKE 'events\\_%'",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut report = Report::default();
    // A partition detached by a run that stopped before dropping it.
    for (name, _) in tables.iter().filter(|(name, attached)| !attached && Partition::parse(name).is_some()) {
        report.events_dropped += retire(conn, name).await?;
        report.dropped.push(name.clone());
    }
    let attached: Vec<Partition> =
        tables.iter().filter(|(_, attached)| *attached).filter_map(|(name, _)| Partition::parse(name)).collect();
    let cutoff = retention.map(|retention| now - retention);
    let plan = plan(&attached, now.date_naive(), cutoff);
    for day in &plan.create {
        create(conn, Partition::day(*day)).await?;
        report.created += 1;
    }
    for partition in &plan.drop {
        detach(conn, &partition.name).await?;
        report.events_dropped += retire(conn, &partition.name).await?;
        report.dropped.push(partition.name.clone());
    }
    if let Some(cutoff) = cutoff {
        report.log_rows_deleted = delete_logs(conn, cutoff).await?;
    }
    Ok(report)
}

async fn create(conn: &mut PgConnection, partition: Partition) -> Result<(), sqlx::Error> {
    let lower = partition.lower.unwrap_or(partition.upper).and_time(NaiveTime::MIN).and_utc();
    let upper = partition.upper.and_time(NaiveTime::MIN).and_utc();
    // A lock on the parent like a detach's: bounded the same way (the next run tries again).
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    // DDL takes no parameters; the bounds are dates this module formats itself.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS event.\"{}\" PARTITION OF event.events FOR VALUES FROM ('{}') TO ('{}')",
        partition.name,
        lower.to_rfc3339(),
        upper.to_rfc3339()
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(partition = partition.name, "events partition created");
    Ok(())
}

/// Takes the partition out of `event.events` (a short exclusive lock on the parent; it gives
/// up after 10 s rather than queue every reader behind it, and the next run tries again).
///
/// Its streams' `first_version` moves past it in the same transaction, so no reader ever sees
/// the events gone while their streams still claim them (a fold would skip them unawares).
async fn detach(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'").execute(&mut *tx).await?;
    // Streams in id order, as the persister locks them. Nothing new lands in an expired day.
    sqlx::query(AssertSqlSafe(format!(
        "WITH gone AS (SELECT stream_id, max(stream_version) AS last FROM event.\"{name}\" \
                       WHERE stream_id IS NOT NULL GROUP BY 1), \
              locked AS (SELECT s.stream_id, g.last FROM event.event_streams s JOIN gone g USING (stream_id) \
                         ORDER BY s.stream_id FOR UPDATE OF s) \
         UPDATE event.event_streams s SET first_version = greatest(s.first_version, l.last + 1) \
         FROM locked l WHERE s.stream_id = l.stream_id"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!("ALTER TABLE event.events DETACH PARTITION event.\"{name}\"")))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Drops a detached partition, taking its ids out of `event.event_ids` and its counts out of
/// the rollups in the same transaction. Returns how many events it held.
async fn retire(conn: &mut PgConnection, name: &str) -> Result<i64, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    // The table first, or not at all: waiting for it later would hold the rollups lock while
    // waiting (another session reading the detached table; the next run tries again).
    sqlx::query(AssertSqlSafe(format!("LOCK TABLE event.\"{name}\" IN ACCESS EXCLUSIVE MODE NOWAIT")))
        .execute(&mut *tx)
        .await?;
    // Counted before the rollups lock: nothing writes a detached partition.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TEMP TABLE retired ON COMMIT DROP AS \
         SELECT (\"timestamp\" AT TIME ZONE 'UTC')::date AS day, event_source, event_category, event_type, \
             user_id, status, count(*) AS events, \
             count(*) FILTER (WHERE status = 'processed' AND processed_at IS NOT NULL) AS timed, \
             COALESCE(sum(extract(epoch FROM processed_at - created_at) * 1000) \
                 FILTER (WHERE status = 'processed' AND processed_at IS NOT NULL), 0)::float8 AS total_ms \
         FROM event.\"{name}\" GROUP BY 1, 2, 3, 4, 5, 6"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM event.event_ids i USING event.\"{name}\" p WHERE i.event_id = p.event_id"
    )))
    .execute(&mut *tx)
    .await?;
    rollups::lock_rollups(&mut tx).await?;
    for statement in rollups::SUBTRACT_RETIRED {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    let events: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(events), 0)::bigint FROM retired").fetch_one(&mut *tx).await?;
    sqlx::query(AssertSqlSafe(format!("DROP TABLE event.\"{name}\""))).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::info!(partition = name, events, "events partition dropped");
    Ok(events)
}

/// Deletes processing results and delivery attempts recorded before `cutoff`, in batches.
async fn delete_logs(conn: &mut PgConnection, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    const LOGS: [&str; 2] = [
        "DELETE FROM event.processing_results WHERE result_id = ANY(ARRAY( \
             SELECT result_id FROM event.processing_results WHERE processed_at < $1 LIMIT $2))",
        "DELETE FROM event.delivery_attempts WHERE attempt_id = ANY(ARRAY( \
             SELECT attempt_id FROM event.delivery_attempts WHERE attempted_at < $1 LIMIT $2))",
    ];
    let mut deleted = 0;
    for statement in LOGS {
        loop {
            let rows = sqlx::query(statement).bind(cutoff).bind(LOG_BATCH).execute(&mut *conn).await?.rows_affected();
            deleted += rows;
            if rows < LOG_BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn names_say_which_days_a_partition_holds() {
        let day = Partition::parse("events_p20261203").unwrap();
        assert_eq!((day.lower, day.upper), (Some(date("2026-12-03")), date("2026-12-04")));
        assert_eq!(day, Partition::day(date("2026-12-03")));
        let old = Partition::parse("events_to_20261204").unwrap();
        assert_eq!((old.lower, old.upper), (None, date("2026-12-04")));
        assert!(old.holds(date("1999-01-01")) && !old.holds(date("2026-12-04")));
        for other in ["events", "events_p2026120", "events_p20261332", "events_ids", "events_to_x", "events_p202612033"]
        {
            assert_eq!(Partition::parse(other), None, "{other}");
        }
    }

    #[test]
    fn days_ahead_are_kept_ready_and_nothing_is_dropped_without_a_retention() {
        let existing = [Partition::day(date("2026-12-03")), Partition::day(date("2026-12-05"))];
        let planned = plan(&existing, date("2026-12-03"), None);
        let expected = [date("2026-12-04")];
        assert_eq!(planned.create, expected);
        assert!(planned.drop.is_empty());
        // A converted store's first partition holds today already.
        let converted = [Partition::parse("events_to_20261204").unwrap()];
        assert_eq!(plan(&converted, date("2026-12-03"), None).create[0], date("2026-12-04"));
    }

    #[test]
    fn a_partition_goes_once_its_newest_possible_event_is_past_the_retention() {
        let existing = [
            Partition::day(date("2026-11-03")),
            Partition::day(date("2026-11-02")),
            Partition::parse("events_to_20261102").unwrap(),
            Partition::day(date("2026-12-03")),
        ];
        // 30 days before 2026-12-03 10:00 is 2026-11-03 10:00: the day of 11-02 has ended by
        // then, the day of 11-03 has not.
        let planned = plan(&existing, date("2026-12-03"), Some(at("2026-11-03T10:00:00Z")));
        let names: Vec<&str> = planned.drop.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["events_to_20261102", "events_p20261102"]);
        // Exactly at midnight the day before is past.
        assert_eq!(plan(&existing, date("2026-12-03"), Some(at("2026-11-03T00:00:00Z"))).drop.len(), 2);
        assert_eq!(plan(&existing, date("2026-12-03"), Some(at("2026-11-02T23:59:59Z"))).drop.len(), 1);
    }
}
