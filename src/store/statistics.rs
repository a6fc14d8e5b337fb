//! `GET /api/v1/events/statistics`: the spec's EventStatistics, for everyone or one user.
//!
//! Reads the rollups only, never `event.events`; writes nothing. The reads are four small
//! queries; [`assemble`] turns their rows into the answer and is tested without a database.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::domain::EventStatus;

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

/// Most users and event types listed.
const TOP: usize = 10;

/// One group of the day rollups: source, category, type, and its events in total, today, this
/// week and this month.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Group {
    pub event_source: String,
    pub event_category: String,
    pub event_type: String,
    pub total: i64,
    pub today: i64,
    pub week: i64,
    pub month: i64,
}

/// What the rollups say, before it is shaped into [`Statistics`].
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub statuses: Vec<(EventStatus, i64)>,
    pub groups: Vec<Group>,
    pub top_users: Vec<(String, i64)>,
    /// Processed events with a processing time, and their total milliseconds.
    pub processing: Option<(i64, f64)>,
}

/// Statistics from the rollups only; for one user when `user_id` is given.
pub async fn statistics(pool: &PgPool, user_id: Option<&str>, now: DateTime<Utc>) -> Result<Statistics, sqlx::Error> {
    let rows = read(pool, user_id, now.date_naive()).await?;
    Ok(assemble(rows, now))
}

/// The first days of this week (Monday) and this month.
fn period_starts(today: NaiveDate) -> (NaiveDate, NaiveDate) {
    let week_start = today - Duration::days(i64::from(today.weekday().num_days_from_monday()));
    let month_start = today.with_day(1).unwrap_or(today);
    (week_start, month_start)
}

async fn read(pool: &PgPool, user_id: Option<&str>, today: NaiveDate) -> Result<Rows, sqlx::Error> {
    let (week_start, month_start) = period_starts(today);
    let user = user_id.unwrap_or("");
    let per_user = user_id.is_some();
    let statuses: Vec<(EventStatus, i64)> = if per_user {
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
    let (table, filter) = match per_user {
        true => ("event.rollup_user_daily", "WHERE user_id = $4"),
        false => ("event.rollup_daily", "WHERE $4::text IS NOT NULL"),
    };
    let groups: Vec<Group> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT event_source, event_category, event_type, sum(events)::bigint AS total,
                COALESCE(sum(events) FILTER (WHERE day >= $1), 0)::bigint AS today,
                COALESCE(sum(events) FILTER (WHERE day >= $2), 0)::bigint AS week,
                COALESCE(sum(events) FILTER (WHERE day >= $3), 0)::bigint AS month
         FROM {table} {filter} GROUP BY 1, 2, 3"
    )))
    .bind(today)
    .bind(week_start)
    .bind(month_start)
    .bind(user)
    .fetch_all(pool)
    .await?;
    let top_users: Vec<(String, i64)> = if per_user {
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
    let processing: Option<(i64, f64)> = if per_user {
        sqlx::query_as("SELECT timed, total_ms FROM event.rollup_users WHERE user_id = $1")
    } else {
        sqlx::query_as("SELECT processed, total_ms FROM event.rollup_processing WHERE user_id = $1")
    }
    .bind(user)
    .fetch_optional(pool)
    .await?;
    Ok(Rows { statuses, groups, top_users, processing })
}

/// Shapes the rollups' rows into the answer.
pub fn assemble(rows: Rows, now: DateTime<Utc>) -> Statistics {
    let count = |status: EventStatus| rows.statuses.iter().filter(|(name, _)| *name == status).map(|(_, n)| n).sum();
    let total_events: i64 = rows.statuses.iter().map(|(_, events)| events).sum();
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
        average_processing_time: match rows.processing {
            Some((processed, total_ms)) if processed > 0 => total_ms / processed as f64,
            _ => 0.0,
        },
        processing_rate: 0.0,
        error_rate: 0.0,
        top_users: rows
            .top_users
            .into_iter()
            .map(|(user_id, event_count)| UserCount { user_id, event_count })
            .collect(),
        top_event_types: Vec::new(),
        calculated_at: now,
    };
    if total_events > 0 {
        stats.processing_rate = percent(stats.processed_events, total_events);
        stats.error_rate = percent(stats.failed_events, total_events);
    }
    for group in rows.groups {
        *stats.events_by_source.entry(group.event_source).or_default() += group.total;
        *stats.events_by_category.entry(group.event_category).or_default() += group.total;
        *stats.events_by_type.entry(group.event_type).or_default() += group.total;
        stats.events_today += group.today;
        stats.events_this_week += group.week;
        stats.events_this_month += group.month;
    }
    let mut types: Vec<TypeCount> = stats
        .events_by_type
        .iter()
        .map(|(event_type, event_count)| TypeCount { event_type: event_type.clone(), event_count: *event_count })
        .collect();
    types.sort_by(|a, b| b.event_count.cmp(&a.event_count).then_with(|| a.event_type.cmp(&b.event_type)));
    types.truncate(TOP);
    stats.top_event_types = types;
    stats
}

fn percent(part: i64, whole: i64) -> f64 {
    (part as f64 * 10_000.0 / whole as f64).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(source: &str, event_type: &str, total: i64, today: i64) -> Group {
        Group {
            event_source: source.into(),
            event_category: "order".into(),
            event_type: event_type.into(),
            total,
            today,
            week: today,
            month: total,
        }
    }

    #[test]
    fn rows_become_the_spec_statistics() {
        let rows = Rows {
            statuses: vec![(EventStatus::Pending, 1), (EventStatus::Processed, 6), (EventStatus::Failed, 1)],
            groups: vec![
                group("backend", "order.placed", 5, 2),
                group("frontend", "order.placed", 1, 1),
                group("backend", "order.paid", 2, 0),
            ],
            top_users: vec![("u1".into(), 8)],
            processing: Some((4, 10.0)),
        };
        let stats = assemble(rows, Utc::now());
        assert_eq!(stats.total_events, 8);
        assert_eq!((stats.processed_events, stats.failed_events, stats.processing_events), (6, 1, 0));
        assert_eq!(stats.processing_rate, 75.0);
        assert_eq!(stats.error_rate, 12.5);
        assert_eq!(stats.average_processing_time, 2.5);
        assert_eq!(stats.events_by_source["backend"], 7);
        assert_eq!(stats.events_by_type["order.placed"], 6);
        assert_eq!((stats.events_today, stats.events_this_month), (3, 8));
        assert_eq!(stats.top_event_types[0].event_type, "order.placed");
        assert_eq!(stats.top_users[0].event_count, 8);
    }

    #[test]
    fn an_empty_store_has_no_rates() {
        let stats = assemble(Rows::default(), Utc::now());
        assert_eq!((stats.total_events, stats.processing_rate, stats.average_processing_time), (0, 0.0, 0.0));
    }

    #[test]
    fn weeks_start_on_monday() {
        let thursday = NaiveDate::from_ymd_opt(2026, 12, 3).unwrap();
        let (week, month) = period_starts(thursday);
        assert_eq!(week, NaiveDate::from_ymd_opt(2026, 11, 30).unwrap());
        assert_eq!(month, NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
    }
}
