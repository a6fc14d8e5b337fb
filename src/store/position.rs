//! The persister's position in a JetStream stream: the sequence up to which every message is
//! committed in PostgreSQL (or was dead-lettered).
//!
//! Reads and writes `event.persister_position`: the position, and how far the stored events are
//! on STORED. Guarantees: the position moves only inside
//! the transaction that stores the batch it covers ([`super::write::insert_batch`]), so it
//! never claims more than is stored.

use sqlx::PgPool;

/// Where a batch sits in its JetStream stream: it continues `from` and ends at `to`.
/// `announced`: every row at or below it is on STORED, as far as the writer knows (the
/// stored value only ever grows).
#[derive(Debug, Clone, Copy)]
pub struct Advance<'a> {
    pub stream: &'a str,
    pub from: u64,
    pub to: u64,
    pub announced: u64,
}

/// The stored position, creating its row (at 0) the first time, so the persister's first
/// batch can move it.
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

/// How far stored events are on STORED, as last recorded (see migration 0012: STORED's own
/// last message is the better answer while it is there).
pub async fn announced_position(pool: &PgPool, stream: &str) -> Result<u64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT announced_seq FROM event.persister_position WHERE stream = $1")
            .bind(stream)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0).max(0) as u64)
}

/// Records that every row up to `announced` is on STORED (never moves it back).
pub async fn record_announced(pool: &PgPool, stream: &str, announced: u64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE event.persister_position SET announced_seq = $2 WHERE stream = $1 AND announced_seq < $2")
        .bind(stream)
        .bind(announced as i64)
        .execute(pool)
        .await?;
    Ok(())
}

/// Moves the position back, for a JetStream stream that was recreated and numbers anew.
pub async fn reset_position(pool: &PgPool, stream: &str, last_seq: u64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE event.persister_position SET last_seq = $2, announced_seq = $2, updated_at = now() WHERE stream = $1",
    )
    .bind(stream)
    .bind(last_seq as i64)
    .execute(pool)
    .await?;
    Ok(())
}
