//! The statistics rollups: counts by day, source, category and type (all and per user), by
//! status (all and per user), and processing time. Statistics and query totals read these,
//! never a scan of `event.events`.
//!
//! Writes the `event.rollup_*` tables, always inside the caller's transaction that writes the
//! rows being counted. Guarantees: every writer takes [`lock_rollups`] before touching a
//! counter row, so concurrent writers never deadlock on them.

use std::collections::BTreeMap;

use chrono::{NaiveDate, Utc};
use sqlx::{Postgres, Transaction};

use super::NewEvent;
use crate::domain::EventStatus;

/// Every transaction that moves rollup counts takes this lock before it touches a rollup row
/// (the persister adding events, the processor moving statuses), as late as it can: it is
/// held until the commit. The rows of a data-modifying statement are locked in no fixed
/// order, so without it two such transactions can deadlock on the shared counter rows; they
/// would wait for each other on those rows anyway. Nobody waits for another lock while
/// holding it.
pub async fn lock_rollups(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    const ROLLUPS_LOCK: i64 = 0x6576_5f72_6f6c_6c75;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(ROLLUPS_LOCK).execute(&mut **tx).await?;
    Ok(())
}

type DayKey<'a> = (NaiveDate, &'a str, &'a str, &'a str);

/// What new events add to the day rollups, all and per user.
#[derive(Debug, Default)]
struct DayCounts<'a> {
    daily: BTreeMap<DayKey<'a>, i64>,
    user_daily: BTreeMap<(&'a str, DayKey<'a>), i64>,
}

/// What a batch of new events adds to every rollup. Events stored `processed` count towards
/// the processing time too (from `created_at` to `now`).
fn count_new<'a>(fresh: &[NewEvent<'a>], now: chrono::DateTime<Utc>) -> (DayCounts<'a>, StatusCounts<'a>) {
    let mut days = DayCounts::default();
    let mut counts = StatusCounts::default();
    for new in fresh {
        let event = &new.incoming.event;
        let user = event.user_id.as_deref();
        let key = (
            event.timestamp.date_naive(),
            event.event_source.as_str(),
            event.event_category.as_str(),
            event.event_type.as_str(),
        );
        *days.daily.entry(key).or_default() += 1;
        if let Some(user) = user {
            *days.user_daily.entry((user, key)).or_default() += 1;
            counts.event(user);
        }
        counts.add(user, new.status, 1);
        if new.status == EventStatus::Processed {
            counts.processed(user, (now - event.created_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    (days, counts)
}

/// Adds new events to every rollup.
pub(super) async fn add_events(tx: &mut Transaction<'_, Postgres>, fresh: &[NewEvent<'_>]) -> Result<(), sqlx::Error> {
    lock_rollups(tx).await?;
    let (days, counts) = count_new(fresh, Utc::now());
    let (d_days, d_sources, d_categories, d_types, d_counts) = unzip_days(days.daily.iter().map(|(k, v)| (*k, *v)));
    let mut u_users = Vec::with_capacity(days.user_daily.len());
    let (u_days, u_sources, u_categories, u_types, u_counts) =
        unzip_days(days.user_daily.iter().map(|((user, k), v)| {
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
    statuses: BTreeMap<EventStatus, i64>,
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
        *self.statuses.entry(status).or_default() += delta;
        if let Some(user) = user {
            self.users.entry(user).or_default().statuses[status_column(status)] += delta;
        }
    }

    /// An event moved from one status to another.
    pub fn moved(&mut self, user: Option<&'a str>, from: EventStatus, to: EventStatus) {
        if from != to {
            self.add(user, from, -1);
            self.add(user, to, 1);
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
    tx: &mut Transaction<'_, Postgres>,
    counts: &StatusCounts<'_>,
) -> Result<(), sqlx::Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let (statuses, status_deltas): (Vec<EventStatus>, Vec<i64>) =
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

/// Takes a dropped partition's events out of every rollup, read from the temporary table
/// `retired` (its counts by day, source, category, type, user and status; see
/// [`super::retention`]); a counter row left at zero goes. The caller holds [`lock_rollups`].
pub(super) const SUBTRACT_RETIRED: [&str; 8] = [
    "UPDATE event.rollup_daily r SET events = r.events - g.events
     FROM (SELECT day, event_source, event_category, event_type, sum(events) AS events FROM retired GROUP BY 1, 2, 3, 4) g
     WHERE (r.day, r.event_source, r.event_category, r.event_type) = (g.day, g.event_source, g.event_category, g.event_type)",
    "DELETE FROM event.rollup_daily r USING (SELECT DISTINCT day, event_source, event_category, event_type FROM retired) g
     WHERE (r.day, r.event_source, r.event_category, r.event_type) = (g.day, g.event_source, g.event_category, g.event_type)
         AND r.events <= 0",
    "UPDATE event.rollup_user_daily r SET events = r.events - g.events
     FROM (SELECT user_id, day, event_source, event_category, event_type, sum(events) AS events FROM retired
           WHERE user_id IS NOT NULL GROUP BY 1, 2, 3, 4, 5) g
     WHERE (r.user_id, r.day, r.event_source, r.event_category, r.event_type)
         = (g.user_id, g.day, g.event_source, g.event_category, g.event_type)",
    "DELETE FROM event.rollup_user_daily r
     USING (SELECT DISTINCT user_id, day, event_source, event_category, event_type FROM retired WHERE user_id IS NOT NULL) g
     WHERE (r.user_id, r.day, r.event_source, r.event_category, r.event_type)
         = (g.user_id, g.day, g.event_source, g.event_category, g.event_type) AND r.events <= 0",
    "UPDATE event.rollup_status r SET events = r.events - g.events
     FROM (SELECT status, sum(events) AS events FROM retired GROUP BY 1) g WHERE r.status = g.status",
    "UPDATE event.rollup_processing r SET processed = r.processed - g.timed, total_ms = greatest(r.total_ms - g.total_ms, 0)
     FROM (SELECT sum(timed) AS timed, sum(total_ms) AS total_ms FROM retired) g WHERE r.user_id = '' AND g.timed > 0",
    "UPDATE event.rollup_users r SET events = r.events - g.events,
         pending = r.pending - g.pending, processing = r.processing - g.processing, processed = r.processed - g.processed,
         failed = r.failed - g.failed, archived = r.archived - g.archived,
         timed = r.timed - g.timed, total_ms = greatest(r.total_ms - g.total_ms, 0)
     FROM (SELECT user_id, sum(events) AS events,
               COALESCE(sum(events) FILTER (WHERE status = 'pending'), 0) AS pending,
               COALESCE(sum(events) FILTER (WHERE status = 'processing'), 0) AS processing,
               COALESCE(sum(events) FILTER (WHERE status = 'processed'), 0) AS processed,
               COALESCE(sum(events) FILTER (WHERE status = 'failed'), 0) AS failed,
               COALESCE(sum(events) FILTER (WHERE status = 'archived'), 0) AS archived,
               sum(timed) AS timed, sum(total_ms) AS total_ms
           FROM retired WHERE user_id IS NOT NULL GROUP BY 1) g
     WHERE r.user_id = g.user_id",
    "DELETE FROM event.rollup_users r USING (SELECT DISTINCT user_id FROM retired WHERE user_id IS NOT NULL) g
     WHERE r.user_id = g.user_id AND r.events <= 0",
];

type DayColumns<'a> = (Vec<NaiveDate>, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<i64>);

fn unzip_days<'a>(rows: impl Iterator<Item = (DayKey<'a>, i64)>) -> DayColumns<'a> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_counts_minus_one_and_plus_one() {
        let mut counts = StatusCounts::default();
        counts.moved(Some("u1"), EventStatus::Pending, EventStatus::Processed);
        counts.moved(Some("u1"), EventStatus::Failed, EventStatus::Failed);
        assert_eq!(counts.statuses.get(&EventStatus::Pending), Some(&-1));
        assert_eq!(counts.statuses.get(&EventStatus::Processed), Some(&1));
        assert!(!counts.statuses.contains_key(&EventStatus::Failed), "no move, no count");
        let user = counts.users["u1"];
        assert_eq!(user.statuses[status_column(EventStatus::Processed)], 1);
        assert!(!counts.is_empty());
        assert!(StatusCounts::default().is_empty());
    }
}
