//! Folds on demand: one stream for some definitions (catch-up, rebuild), and the read of a
//! projection now, at a version or at a time (time travel).
//!
//! Reads `event.events` and the projection tables; [`fold_stream`] writes projections.
//! Guarantees: a read folds whatever the projector has not applied yet, so it always matches
//! the stored stream; time travel folds from the nearest snapshot, not from the start; a fold
//! that would need events that have left the store (retention) is refused, never guessed.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::fold::Fold;
use crate::domain::StreamId;
use crate::registry::definitions::Definition;
use crate::store::projections::{self, Projection};

/// Why a read has no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The fold would need events that have left the store (retention), and no snapshot or
    /// stored projection covers them.
    #[error("the stream's events before version {first_version} have left the store")]
    HistoryExpired { first_version: i64 },
}

/// Whether a fold that has applied the stream up to `folded` can go on from the stored
/// events, which start at `first_version`.
pub(super) fn can_go_on(folded: i64, first_version: i64) -> bool {
    folded + 1 >= first_version
}

/// Events read per page when folding on demand.
const PAGE: i64 = 1000;

/// Folds one stream for the given definitions in one transaction (catch-up and rebuild).
/// Returns the projections that were created.
pub async fn fold_stream(
    pool: &PgPool,
    stream_id: &StreamId,
    definitions: &[Definition],
    snapshot_every: i64,
) -> Result<Vec<Projection>, sqlx::Error> {
    let Some((entity_type, entity_id)) = stream_id.parts() else { return Ok(Vec::new()) };
    let mut tx = pool.begin().await?;
    let mut stored = projections::stored_projections(&mut tx, &[stream_id]).await?;
    let mut folds: Vec<(Fold, &Definition)> = definitions
        .iter()
        .filter(|definition| definition.covers(entity_type))
        .map(|definition| {
            let existing = stored.remove(&(definition.name.clone(), stream_id.clone()));
            (Fold::start(definition, entity_type, entity_id, existing), definition)
        })
        .collect();
    let from = folds.iter().map(|(fold, _)| fold.projection.stream_version).min().unwrap_or(0);
    let events = projections::events_after(&mut *tx, &[(stream_id, from)]).await?;
    // Read after the events, so a partition that left in between is seen (it moves
    // first_version in the transaction that takes it away).
    let first_version = projections::first_version(&mut *tx, stream_id).await?;
    if !can_go_on(from, first_version) {
        // Folding only the retained events would give a state that never was; reads of it
        // answer history_expired instead.
        tracing::warn!(%stream_id, first_version, "not folding a stream whose early events have left the store");
        return Ok(Vec::new());
    }
    for (fold, definition) in &mut folds {
        fold.apply(definition, &events, snapshot_every);
    }
    save(&mut tx, folds.iter().map(|(fold, _)| fold)).await?;
    tx.commit().await?;
    Ok(folds.into_iter().filter(|(fold, _)| fold.created && fold.changed).map(|(fold, _)| fold.projection).collect())
}

/// Writes the folds that moved, with their snapshots.
pub(super) async fn save<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    folds: impl Iterator<Item = &'a Fold>,
) -> Result<(), sqlx::Error> {
    let changed: Vec<&Fold> = folds.filter(|fold| fold.changed).collect();
    let rows: Vec<&Projection> = changed.iter().map(|fold| &fold.projection).collect();
    let snapshots: Vec<_> = changed.iter().flat_map(|fold| &fold.snapshots).collect();
    projections::save(tx, &rows, &snapshots).await
}

/// What a read answers: the projection, and for time travel where it was folded from.
#[derive(Debug, Clone, Serialize)]
pub struct Read {
    #[serde(flatten)]
    pub projection: Projection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_read: Option<i64>,
}

/// Where to stop when reading the past.
#[derive(Debug, Clone, Copy)]
pub enum AsOf {
    Now,
    Version(i64),
    Time(DateTime<Utc>),
}

/// The projection of one entity, as of now (stored row plus anything not applied yet) or as
/// of a version or a time (from the nearest snapshot). `None` when the entity has no events
/// the projection takes.
pub async fn read(
    pool: &PgPool,
    definition: &Definition,
    entity_type: &str,
    entity_id: &str,
    as_of: AsOf,
) -> Result<Option<Read>, ReadError> {
    let stream_id = StreamId::of(entity_type, entity_id);
    let (by_version, by_time) = match as_of {
        AsOf::Now => (None, None),
        AsOf::Version(version) => (Some(version), None),
        AsOf::Time(time) => (None, Some(time)),
    };
    let (mut fold, snapshot_version) = match as_of {
        AsOf::Now => {
            let stored = projections::stored_projection(pool, &definition.name, entity_type, entity_id).await?;
            (Fold::start(definition, entity_type, entity_id, stored), None)
        }
        AsOf::Version(_) | AsOf::Time(_) => {
            let snapshot =
                projections::snapshot_before(pool, &definition.name, entity_type, entity_id, by_version, by_time)
                    .await?;
            let snapshot_version = snapshot.as_ref().map(|snapshot| snapshot.version);
            let fold = match snapshot {
                Some(snapshot) => Fold::from_snapshot(definition, snapshot),
                None => Fold::start(definition, entity_type, entity_id, None),
            };
            (fold, snapshot_version)
        }
    };
    let reached = |fold: &Fold| by_version.is_some_and(|limit| fold.projection.version >= limit);
    let first_version = projections::first_version(pool, &stream_id).await?;
    if !reached(&fold) && !can_go_on(fold.projection.stream_version, first_version) {
        return Err(ReadError::HistoryExpired { first_version });
    }
    let mut events_read = 0i64;
    loop {
        let after = fold.projection.stream_version;
        let page = projections::stream_page(pool, &stream_id, after, by_time, PAGE).await?;
        for event in &page {
            if reached(&fold) {
                break;
            }
            events_read += 1;
            fold.apply(definition, std::iter::once(event), 0);
        }
        if reached(&fold) || (page.len() as i64) < PAGE {
            break;
        }
    }
    if fold.projection.version == 0 {
        return Ok(None);
    }
    let time_travel = !matches!(as_of, AsOf::Now);
    Ok(Some(Read {
        projection: fold.projection,
        snapshot_version: if time_travel { Some(snapshot_version.unwrap_or(0)) } else { None },
        events_read: time_travel.then_some(events_read),
    }))
}

#[cfg(test)]
mod tests {
    use super::can_go_on;

    #[test]
    fn a_fold_goes_on_only_from_where_the_stored_events_begin() {
        assert!(can_go_on(0, 1), "nothing has left");
        assert!(can_go_on(41, 42), "a snapshot at 41, events from 42");
        assert!(can_go_on(50, 42), "a stored projection past the horizon");
        assert!(!can_go_on(0, 42), "from the start, with 1 to 41 gone");
        assert!(!can_go_on(40, 42), "a snapshot at 40, event 41 gone");
    }
}
