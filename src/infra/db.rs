//! The PostgreSQL pool, the embedded migrations in `migrations/`, and the one place that
//! decides what kind of failure a database error is.
//!
//! Reads and writes the `event` schema. Guarantees: [`kind`] is decided from the error's
//! type and SQLSTATE, never from its text; every caller (stages holding a batch, the HTTP
//! error mapping) uses it.

use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::settings::DatabaseArgs;
use crate::domain::Secret;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A pool that connects lazily and keeps trying, so a stage starts (and keeps its NATS side
/// working) while PostgreSQL is briefly away.
pub async fn connect(url: &Secret, settings: &DatabaseArgs) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.expose().parse().map_err(DbError::Url)?;
    let options = options
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    Ok(pool)
}

/// Waits (at most 30 s) until PostgreSQL answers, then applies the migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    (|| async { sqlx::query("SELECT 1").execute(pool).await })
        .retry(ConstantBuilder::default().with_delay(Duration::from_millis(500)).with_max_times(60))
        .notify(|error, _| tracing::debug!(error = %error, "waiting for PostgreSQL"))
        .await
        .map_err(DbError::Connect)?;
    sqlx::migrate!("./migrations").run(pool).await?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// What a database error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database is not reachable right now (connection trouble, shutdown, pool
    /// exhaustion, serialization failure, deadlock): the same statement may succeed later.
    Transient,
    /// A unique constraint refused the row: it exists already.
    UniqueViolation,
    /// Anything else: retrying will not help (a bug, a constraint, bad data).
    Permanent,
}

/// Classifies a database error by its type and SQLSTATE.
pub fn kind(error: &sqlx::Error) -> ErrorKind {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => ErrorKind::Transient,
        sqlx::Error::Database(db) if db.is_unique_violation() => ErrorKind::UniqueViolation,
        error if is_missing_partition(error) => ErrorKind::Transient,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if is_transient_state(&code) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        },
        _ => ErrorKind::Permanent,
    }
}

/// [`kind`] is [`ErrorKind::Transient`].
pub fn is_transient(error: &sqlx::Error) -> bool {
    kind(error) == ErrorKind::Transient
}

/// A row of `event.events` whose day has no partition yet: once the partition is created
/// (`store::retention::maintain`), the same write succeeds.
pub fn is_missing_partition(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23514") && db.constraint().is_none() && db.table() == Some("events"))
}

fn is_transient_state(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57P") // operator intervention: shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock
        || code == "55P03" // lock not available
}

/// Creates `database` unless it exists, connecting through `admin_url`.
pub async fn ensure_database(admin_url: &str, database: &str) -> Result<(), DbError> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(admin_url).await.map_err(DbError::Connect)?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut connection)
        .await
        .map_err(DbError::Connect)?;
    if !exists {
        let quoted = database.replace('"', "\"\"");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{quoted}\"")))
            .execute(&mut connection)
            .await
            .map_err(DbError::Connect)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_trouble_is_transient_and_the_rest_is_not() {
        assert_eq!(kind(&sqlx::Error::PoolTimedOut), ErrorKind::Transient);
        assert_eq!(kind(&sqlx::Error::Io(std::io::Error::other("reset"))), ErrorKind::Transient);
        assert_eq!(kind(&sqlx::Error::RowNotFound), ErrorKind::Permanent);
        assert_eq!(kind(&sqlx::Error::ColumnNotFound("x".into())), ErrorKind::Permanent);
        for code in ["08006", "53300", "57P01", "40001", "40P01", "55P03"] {
            assert!(is_transient_state(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "22P02"] {
            assert!(!is_transient_state(code), "{code}");
        }
    }
}
