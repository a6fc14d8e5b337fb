//! The delivery log of subscriptions (`event.delivery_attempts`) and the failure record each
//! subscription keeps (`failing_since`, `disabled_reason`).
//!
//! Reads and writes `event.delivery_attempts` and `event.event_subscriptions`. Guarantees: a
//! batch of attempts, the failure records and any disabling are written in one transaction,
//! so the log and the subscription never disagree; an attempt is keyed by (subscription,
//! event, attempt), so a redelivered attempt overwrites its own row.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::DeliveryStatus;

/// One row of the delivery log.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Attempt {
    pub subscription_id: String,
    pub event_id: Uuid,
    pub webhook_id: String,
    pub attempt: i32,
    pub status: DeliveryStatus,
    pub status_code: Option<i32>,
    pub duration_ms: f64,
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempted_at: DateTime<Utc>,
}

/// An attempt to record.
#[derive(Debug, Clone)]
pub struct NewAttempt {
    pub subscription_id: String,
    pub event_id: Uuid,
    pub webhook_id: String,
    pub attempt: i32,
    pub status: DeliveryStatus,
    pub status_code: Option<u16>,
    pub duration_ms: f64,
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// A batch of attempts and what they mean for their subscriptions.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub attempts: Vec<NewAttempt>,
    /// Subscriptions that had a delivery go through: no longer failing.
    pub delivered: HashSet<String>,
    /// Subscriptions that had a delivery fail (and none go through).
    pub failed: HashSet<String>,
    /// Subscriptions to disable now, and why (410 Gone).
    pub disable: Vec<(String, String)>,
}

/// The highest attempt number recorded for each (subscription, event) among `keys`.
pub async fn latest_attempts(
    pool: &PgPool,
    keys: &[(String, Uuid)],
) -> Result<HashMap<(String, Uuid), i32>, sqlx::Error> {
    let (subscription_ids, event_ids): (Vec<&str>, Vec<Uuid>) = keys.iter().map(|(s, e)| (s.as_str(), *e)).unzip();
    let rows: Vec<(String, Uuid, i32)> = sqlx::query_as(
        "SELECT subscription_id, event_id, max(attempt) FROM event.delivery_attempts \
         WHERE (subscription_id, event_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[])) GROUP BY 1, 2",
    )
    .bind(&subscription_ids)
    .bind(&event_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(s, e, attempt)| ((s, e), attempt)).collect())
}

/// Records a batch of attempts, keeps the failure record of each subscription, and disables
/// the ones that asked for it (`outcomes.disable`) or whose deliveries have all failed for
/// longer than `disable_after_secs`; one transaction. Returns the subscriptions disabled now,
/// with the reason.
pub async fn record(
    pool: &PgPool,
    outcomes: &Outcomes,
    disable_after_secs: u64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    if outcomes.attempts.is_empty() {
        return Ok(Vec::new());
    }
    let delivered: Vec<&str> = outcomes.delivered.iter().map(String::as_str).collect();
    let failed: Vec<&str> =
        outcomes.failed.iter().filter(|id| !outcomes.delivered.contains(*id)).map(String::as_str).collect();
    if failed.is_empty() && outcomes.disable.is_empty() {
        // The usual batch: one statement, a transaction of its own.
        record_attempts(pool, &outcomes.attempts, &delivered).await?;
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    record_attempts(&mut *tx, &outcomes.attempts, &delivered).await?;
    let mut disable = outcomes.disable.clone();
    if !failed.is_empty() {
        sqlx::query(
            "UPDATE event.event_subscriptions SET failing_since = now() \
             WHERE subscription_id = ANY($1) AND failing_since IS NULL",
        )
        .bind(&failed)
        .execute(&mut *tx)
        .await?;
        let stale: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT subscription_id, failing_since FROM event.event_subscriptions \
             WHERE subscription_id = ANY($1) AND enabled AND failing_since < now() - make_interval(secs => $2)",
        )
        .bind(&failed)
        .bind(disable_after_secs as f64)
        .fetch_all(&mut *tx)
        .await?;
        disable.extend(
            stale
                .into_iter()
                .map(|(id, since)| (id, format!("every delivery has failed since {}", since.to_rfc3339()))),
        );
    }
    let mut disabled = Vec::new();
    for (id, reason) in disable {
        let changed = sqlx::query(
            "UPDATE event.event_subscriptions SET enabled = false, disabled_reason = $2, updated_at = now() \
             WHERE subscription_id = $1 AND enabled",
        )
        .bind(&id)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() == 1 {
            disabled.push((id, reason));
        }
    }
    tx.commit().await?;
    Ok(disabled)
}

/// Writes the attempts (a redelivered attempt overwrites its own row) and clears the failure
/// record of the subscriptions in `delivered`, in one statement.
async fn record_attempts<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    attempts: &[NewAttempt],
    delivered: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH attempts AS ( \
             INSERT INTO event.delivery_attempts (subscription_id, event_id, webhook_id, attempt, status, \
                 status_code, duration_ms, error, next_attempt_at) \
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], \
                 $7::float8[], $8::text[], $9::timestamptz[]) \
             ON CONFLICT (subscription_id, event_id, attempt) DO UPDATE SET status = EXCLUDED.status, \
                 status_code = EXCLUDED.status_code, duration_ms = EXCLUDED.duration_ms, error = EXCLUDED.error, \
                 next_attempt_at = EXCLUDED.next_attempt_at, attempted_at = now()) \
         UPDATE event.event_subscriptions SET failing_since = NULL \
         WHERE subscription_id = ANY($10) AND failing_since IS NOT NULL",
    )
    .bind(attempts.iter().map(|a| a.subscription_id.as_str()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.event_id).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.webhook_id.as_str()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.attempt).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.status.as_str()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.status_code.map(i32::from)).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.duration_ms).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.error.as_deref()).collect::<Vec<_>>())
    .bind(attempts.iter().map(|a| a.next_attempt_at).collect::<Vec<_>>())
    .bind(delivered)
    .execute(executor)
    .await?;
    Ok(())
}

/// Delivery counts of one subscription.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct DeliveryStats {
    pub delivered: i64,
    pub failed: i64,
    pub retrying: i64,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// Delivery counts per subscription (events whose latest attempt has each status).
pub async fn stats(pool: &PgPool) -> Result<HashMap<String, DeliveryStats>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        subscription_id: String,
        #[sqlx(flatten)]
        stats: DeliveryStats,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT subscription_id, count(*) FILTER (WHERE status = 'delivered') AS delivered, \
                count(*) FILTER (WHERE status IN ('failed', 'refused')) AS failed, \
                count(*) FILTER (WHERE status = 'retry') AS retrying, max(attempted_at) AS last_attempt_at \
         FROM (SELECT DISTINCT ON (subscription_id, event_id) subscription_id, status, attempted_at \
               FROM event.delivery_attempts ORDER BY subscription_id, event_id, attempt DESC) latest \
         GROUP BY subscription_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|row| (row.subscription_id, row.stats)).collect())
}

/// The delivery log of a subscription, newest first, and its length, read from one snapshot
/// (so the page and the count agree while attempts are being recorded).
pub async fn attempts(pool: &PgPool, id: &str, limit: i64, offset: i64) -> Result<(Vec<Attempt>, i64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let rows = sqlx::query_as(
        "SELECT subscription_id, event_id, webhook_id, attempt, status, status_code, duration_ms, error, \
                next_attempt_at, attempted_at \
         FROM event.delivery_attempts WHERE subscription_id = $1 \
         ORDER BY attempted_at DESC, attempt_id DESC LIMIT $2 OFFSET $3",
    )
    .bind(id)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *tx)
    .await?;
    let total = sqlx::query_scalar("SELECT count(*) FROM event.delivery_attempts WHERE subscription_id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((rows, total))
}

/// Events of a subscription whose latest attempt in the window failed (or was refused or
/// skipped): what `recover` queues again.
pub async fn failed_in_window(
    pool: &PgPool,
    id: &str,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT event_id FROM ( \
             SELECT DISTINCT ON (event_id) event_id, status, attempted_at FROM event.delivery_attempts \
             WHERE subscription_id = $1 ORDER BY event_id, attempt DESC \
         ) latest WHERE status IN ('failed', 'refused', 'skipped') AND attempted_at BETWEEN $2 AND $3 \
         ORDER BY attempted_at LIMIT 10000",
    )
    .bind(id)
    .bind(since)
    .bind(until)
    .fetch_all(pool)
    .await
}
