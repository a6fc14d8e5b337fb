//! The processor registry: what a processor is, how it is stored (`event.event_processors`),
//! which events it takes, and the set of runnable processors workers run from.
//!
//! Reads and writes `event.event_processors`. Guarantees: a registration that its kind cannot
//! run is refused with field errors; a stored processor whose config cannot run (registered by
//! an older version, say) is left out of the set with a warning, never run half-configured.

mod action;
mod request;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;
use sqlx::types::Json;

pub use action::Action;
pub use request::{DEFAULT_MAX_RETRIES, Registration, parse_registration};

use super::{Registry, Source};
use crate::domain::{Event, EventCategory, EventSource, EventTypePattern};
use crate::infra::callback::Guard;
use crate::wire::subjects;

/// A registered processor, as stored and as the API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Processor {
    pub processor_id: String,
    pub processor_name: String,
    pub processor_type: String,
    pub enabled: bool,
    pub priority: i32,
    pub filters: Json<Filters>,
    pub config: Json<Map<String, Value>>,
    pub max_retries: i32,
    pub error_count: i64,
    pub last_error: Option<String>,
    pub last_processed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which events a processor takes. Absent filters match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filters {
    /// An event type or pattern: `user.*`, `order.>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<EventTypePattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source: Option<EventSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_category: Option<EventCategory>,
}

impl Filters {
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_kind(event.event_source, event.event_category, &event.event_type)
    }

    /// [`Self::matches`] on what the filters look at: source, category and type.
    pub fn matches_kind(&self, source: EventSource, category: EventCategory, event_type: &str) -> bool {
        self.event_source.is_none_or(|filter| filter == source)
            && self.event_category.is_none_or(|filter| filter == category)
            && self.event_type.as_ref().is_none_or(|pattern| pattern.matches(event_type))
    }
}

/// Why a registration could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("a processor named {0} already exists")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "processor_id, processor_name, processor_type, enabled, priority, filters, config, max_retries, \
                       error_count, last_error, last_processed_at, created_at, updated_at";

/// Stores a registration: a new processor, or a replacement of the one with the same
/// `processor_id` (its counters are kept).
pub async fn register(pool: &PgPool, registration: Registration) -> Result<Processor, RegisterError> {
    let processor_id = registration.processor_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let sql = format!(
        "INSERT INTO event.event_processors \
             (processor_id, processor_name, processor_type, enabled, priority, filters, config, max_retries) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (processor_id) DO UPDATE SET processor_name = EXCLUDED.processor_name, \
             processor_type = EXCLUDED.processor_type, enabled = EXCLUDED.enabled, priority = EXCLUDED.priority, \
             filters = EXCLUDED.filters, config = EXCLUDED.config, max_retries = EXCLUDED.max_retries, \
             updated_at = now() \
         RETURNING {COLUMNS}"
    );
    let stored = sqlx::query_as::<_, Processor>(sqlx::AssertSqlSafe(sql))
        .bind(&processor_id)
        .bind(&registration.processor_name)
        .bind(&registration.processor_type)
        .bind(registration.enabled)
        .bind(registration.priority)
        .bind(Json(&registration.filters))
        .bind(Json(&registration.config))
        .bind(registration.max_retries)
        .fetch_one(pool)
        .await;
    match stored {
        Err(sqlx::Error::Database(error)) if error.constraint() == Some("event_processors_processor_name_key") => {
            Err(RegisterError::NameTaken(registration.processor_name))
        }
        other => Ok(other?),
    }
}

/// Every processor, from a pool or from inside a transaction.
pub async fn list<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<Vec<Processor>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_processors ORDER BY priority DESC, processor_name");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(db).await
}

pub async fn get(pool: &PgPool, processor_id: &str) -> Result<Option<Processor>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM event.event_processors WHERE processor_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(processor_id).fetch_optional(pool).await
}

/// Turns a processor on or off; false when there is no such processor.
pub async fn set_enabled(pool: &PgPool, processor_id: &str, enabled: bool) -> Result<bool, sqlx::Error> {
    let updated =
        sqlx::query("UPDATE event.event_processors SET enabled = $2, updated_at = now() WHERE processor_id = $1")
            .bind(processor_id)
            .bind(enabled)
            .execute(pool)
            .await?;
    Ok(updated.rows_affected() == 1)
}

/// Removes a processor (its results stay); false when there is no such processor.
pub async fn delete(pool: &PgPool, processor_id: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM event.event_processors WHERE processor_id = $1")
        .bind(processor_id)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// A processor ready to run.
#[derive(Debug)]
pub struct Runnable {
    pub processor: Processor,
    pub action: Action,
}

impl Runnable {
    pub fn name(&self) -> &str {
        &self.processor.processor_name
    }

    /// Enabled, and its filters match the event.
    pub fn takes(&self, event: &Event) -> bool {
        self.processor.enabled && self.processor.filters.matches(event)
    }
}

/// Every processor whose config is runnable, highest priority first.
#[derive(Debug, Default)]
pub struct ProcessorSet {
    pub processors: Vec<Arc<Runnable>>,
}

impl ProcessorSet {
    /// The enabled processors that take this event, in the order they run.
    pub fn matching(&self, event: &Event) -> Vec<Arc<Runnable>> {
        self.processors.iter().filter(|runnable| runnable.takes(event)).cloned().collect()
    }

    /// Whether any enabled processor takes this event.
    pub fn takes(&self, event: &Event) -> bool {
        self.processors.iter().any(|runnable| runnable.takes(event))
    }

    /// Whether no processor is enabled: then no event is taken.
    pub fn idle(&self) -> bool {
        self.processors.iter().all(|runnable| !runnable.processor.enabled)
    }

    /// Whether any enabled processor takes events of this source, category and type.
    pub fn takes_kind(&self, source: EventSource, category: EventCategory, event_type: &str) -> bool {
        self.processors.iter().any(|runnable| {
            runnable.processor.enabled && runnable.processor.filters.matches_kind(source, category, event_type)
        })
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Runnable>> {
        self.processors.iter().find(|runnable| runnable.name() == name).cloned()
    }
}

/// Processors as a [`Source`] of the live registry. The guard judges configured URLs.
pub struct Processors {
    pub guard: Guard,
}

impl Source for Processors {
    type Set = ProcessorSet;
    const NAME: &'static str = "processors";
    const CHANGED: &'static str = subjects::PROCESSORS_CHANGED;

    async fn load(&self, pool: &PgPool) -> Result<ProcessorSet, sqlx::Error> {
        let mut processors = Vec::new();
        for processor in list(pool).await? {
            match Action::of(&processor.processor_name, &processor.processor_type, &processor.config, &self.guard) {
                Ok(action) => processors.push(Arc::new(Runnable { processor, action })),
                Err(errors) => tracing::warn!(processor = %processor.processor_name, ?errors,
                    "processor config cannot run; skipping it"),
            }
        }
        Ok(ProcessorSet { processors })
    }
}

/// The live processor set of one process.
pub type ProcessorRegistry = Registry<Processors>;
