//! The PostgreSQL pool, the embedded migrations in `migrations/`, and the one place that
//! decides whether a database error is worth retrying.
//!
//! Reads and writes the `event` schema.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::settings::DatabaseArgs;

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
pub async fn connect(url: &str, settings: &DatabaseArgs) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(DbError::Url)?;
    let options = options
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    Ok(pool)
}

/// Waits (bounded) until PostgreSQL answers, then applies the migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut last = None;
    for _ in 0..60 {
        match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(error) => {
                last = Some(error);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    if let Some(error) = last {
        return Err(DbError::Connect(error));
    }
    sqlx::migrate!("./migrations").run(pool).await?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// True when the error says "the database is not reachable right now" rather than "this
/// statement can never succeed": connection trouble, shutdowns, pool exhaustion,
/// serialization failures and deadlocks.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            let code = code.as_ref();
            code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources
                || code.starts_with("57P") // operator intervention: shutdown, cannot connect now
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock
                || code == "55P03" // lock not available
        }),
        _ => false,
    }
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
