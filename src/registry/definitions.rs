//! Projection definitions: which entity streams a projection covers, which events it takes,
//! and how it folds them. `default` (every stream, every event, merge) comes with the schema.
//!
//! Reads and writes `event.projection_definitions`. Guarantees: event-type patterns follow the
//! one rule of [`crate::domain::pattern`]; a stored reducer or status the code does not know is
//! an error when read, never a silent default.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::{Registry, Source};
use crate::domain::fields::object_body;
use crate::domain::kinds::string_enum;
use crate::domain::{DefinitionStatus, EventTypePattern, FieldError, Fields};
use crate::wire::subjects;

/// The projection every stream has.
pub const DEFAULT_NAME: &str = "default";

string_enum!(
    /// How a projection folds an event into its state.
    Reducer {
        /// The event's `data` as a JSON merge patch (RFC 7386).
        Merge => "merge",
        /// `state[event_type] = data`.
        ByType => "by_type",
        /// `state[event_type] += 1`.
        Counter => "counter",
    }
);

/// A projection definition.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Definition {
    pub name: String,
    /// An entity type, or `*` for every stream.
    pub entity_type: String,
    /// `None`: every event of the stream.
    pub event_types: Option<Vec<EventTypePattern>>,
    pub reducer: Reducer,
    pub status: DefinitionStatus,
    pub created_at: DateTime<Utc>,
}

impl Definition {
    pub fn covers(&self, entity_type: &str) -> bool {
        self.entity_type == "*" || self.entity_type == entity_type
    }

    pub fn takes(&self, event_type: &str) -> bool {
        self.event_types.as_ref().is_none_or(|types| types.iter().any(|pattern| pattern.matches(event_type)))
    }
}

/// A validated `POST /api/v1/events/projections/definitions`.
#[derive(Debug, Clone)]
pub struct NewDefinition {
    pub name: String,
    pub entity_type: String,
    pub event_types: Option<Vec<EventTypePattern>>,
    pub reducer: Reducer,
}

/// Validates `POST /api/v1/events/projections/definitions`.
pub fn parse_definition(body: &Value) -> Result<NewDefinition, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let valid_name =
        |text: &str| !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    let name = fields.required_string("name", 100);
    if name.as_deref().is_some_and(|name| !valid_name(name)) {
        fields.fail("name", "must be 1 to 100 letters, digits, '_' or '-'");
    }
    let entity_type = fields.required_string("entity_type", 255);
    if entity_type.as_deref().is_some_and(|kind| kind.is_empty() || kind.contains(':')) {
        fields.fail("entity_type", "must be non-empty, without ':'");
    }
    let event_types = fields.patterns("event_types", 100, false);
    let reducer = fields.enumerated("reducer", Reducer::parse, Reducer::expected).unwrap_or(Reducer::Merge);
    match (name, entity_type) {
        (Some(name), Some(entity_type)) if errors.is_empty() => {
            Ok(NewDefinition { name, entity_type, event_types, reducer })
        }
        _ => Err(errors),
    }
}

const COLUMNS: &str = "name, entity_type, event_types, reducer, status, created_at";

/// Stores a new definition (catching up); `None` when the name is taken.
pub async fn create(pool: &PgPool, new: &NewDefinition) -> Result<Option<Definition>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO event.projection_definitions (name, entity_type, event_types, reducer) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING RETURNING {COLUMNS}"
    )))
    .bind(&new.name)
    .bind(&new.entity_type)
    .bind(&new.event_types)
    .bind(new.reducer)
    .fetch_optional(pool)
    .await
}

/// Every definition, `default` first.
pub async fn list(pool: &PgPool) -> Result<Vec<Definition>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM event.projection_definitions ORDER BY name <> 'default', created_at, name"
    )))
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Option<Definition>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM event.projection_definitions WHERE name = $1")))
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Every definition, as projectors fold with them.
#[derive(Debug, Default)]
pub struct DefinitionSet {
    pub definitions: Vec<Definition>,
}

impl DefinitionSet {
    /// The definitions that cover streams of this entity type.
    pub fn covering<'a>(&'a self, entity_type: &'a str) -> impl Iterator<Item = &'a Definition> + 'a {
        self.definitions.iter().filter(move |definition| definition.covers(entity_type))
    }
}

/// Projection definitions as a [`Source`] of the live registry.
pub struct Definitions;

impl Source for Definitions {
    type Set = DefinitionSet;
    const NAME: &'static str = "projection definitions";
    const CHANGED: &'static str = subjects::DEFINITIONS_CHANGED;

    async fn load(&self, pool: &PgPool) -> Result<DefinitionSet, sqlx::Error> {
        Ok(DefinitionSet { definitions: list(pool).await? })
    }
}

/// The live definition set of one process.
pub type DefinitionRegistry = Registry<Definitions>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_are_validated() {
        let ok =
            parse_definition(&json!({"name": "orders", "entity_type": "order", "event_types": ["order.*"]})).unwrap();
        assert_eq!(ok.reducer, Reducer::Merge);
        let fields = |body: Value| -> Vec<String> {
            parse_definition(&body).unwrap_err().into_iter().map(|error| error.field).collect()
        };
        assert_eq!(fields(json!({})), ["name", "entity_type"]);
        assert_eq!(fields(json!({"name": "a b", "entity_type": "x:y"})), ["name", "entity_type"]);
        assert_eq!(fields(json!({"name": "a", "entity_type": "o", "reducer": "sum"})), ["reducer"]);
        // Projection definitions check patterns like every other filter.
        assert_eq!(fields(json!({"name": "a", "entity_type": "o", "event_types": ["a..b"]})), ["event_types"]);
        assert_eq!(fields(json!({"name": "a", "entity_type": "o", "event_types": []})), ["event_types"]);
    }
}
