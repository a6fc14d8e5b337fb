//! The schema registry: per event type, numbered versions of a JSON Schema (draft 2020-12) for
//! the event's `data`, each with a mode (`reject` or `flag`) and redaction rules. The newest
//! version of a type is the one events are checked against ([`check`]).
//!
//! Reads and writes `event.event_schemas`. Guarantees: versions of a type count up from 1
//! without gaps (a new version is numbered under a row lock of the type's newest one); a
//! new version is backward compatible with the one before ([`compat`]) unless registered with
//! `compatibility=none`; every stored schema compiles.

pub mod check;
pub mod compat;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use super::Source;
use crate::domain::fields::object_body;
use crate::domain::kinds::string_enum;
use crate::domain::parse::MAX_EVENT_TYPE_CHARS;
use crate::domain::{Event, FieldError, Fields};
use crate::infra::metrics::{Metrics, SchemaLabels};
use crate::wire::subjects;
pub use check::{Active, Checked, SchemaError};

string_enum!(
    /// What happens to an event its schema refuses.
    SchemaMode {
        /// Refused: HTTP 422, or dead-lettered `schema_violation` when it came over NATS.
        Reject => "reject",
        /// Stored, with the errors in `metadata.schema_errors`.
        Flag => "flag",
    }
);

string_enum!(
    /// What a redaction rule does to its path.
    RedactAction {
        /// The field is removed.
        Drop => "drop",
        /// The value is replaced by the SHA-256 (hex) of its JSON text.
        Hash => "hash",
    }
);

/// One redaction rule: a dotted path into `data` (`card.number`) and what to do there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redaction {
    pub path: String,
    pub action: RedactAction,
}

/// One stored version.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SchemaVersion {
    pub event_type: String,
    pub version: i32,
    pub schema: sqlx::types::Json<Value>,
    pub mode: SchemaMode,
    pub redact: sqlx::types::Json<Vec<Redaction>>,
    /// How it was checked against the version before: `backward` or `none`.
    pub compatibility: String,
    pub created_at: DateTime<Utc>,
}

/// A validated `PUT /api/v1/events/schemas/{event_type}`.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub schema: Value,
    pub mode: SchemaMode,
    pub redact: Vec<Redaction>,
}

const MAX_REDACTIONS: usize = 50;

/// Validates the request body: the schema compiles as draft 2020-12, the mode and the
/// redaction rules are known.
pub fn parse_version(event_type: &str, body: &Value) -> Result<NewVersion, Vec<FieldError>> {
    let map = object_body(body)?;
    let mut errors = Vec::new();
    if event_type.is_empty() || event_type.chars().count() > MAX_EVENT_TYPE_CHARS || event_type.contains(['*', '>']) {
        errors.push(FieldError::new("event_type", "must be one event type (no pattern), 1 to 255 characters"));
    }
    let mut fields = Fields { body: map, errors: &mut errors };
    let mode = fields.enumerated("mode", SchemaMode::parse, SchemaMode::expected).unwrap_or(SchemaMode::Reject);
    let schema = map.get("schema").cloned();
    match &schema {
        None => errors.push(FieldError::new("schema", "is required")),
        Some(schema) => {
            if let Err(error) = check::compile(schema) {
                errors.push(FieldError::new("schema", format!("is not a valid JSON Schema (draft 2020-12): {error}")));
            }
        }
    }
    let redact = redactions(map.get("redact"), &mut errors);
    for key in map.keys().filter(|key| !matches!(key.as_str(), "schema" | "mode" | "redact")) {
        errors.push(FieldError::new(key, "is not a schema field (schema, mode, redact)"));
    }
    match schema {
        Some(schema) if errors.is_empty() => Ok(NewVersion { schema, mode, redact }),
        _ => Err(errors),
    }
}

fn redactions(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Vec<Redaction> {
    let Some(value) = value else { return Vec::new() };
    let rules: Vec<Redaction> = match serde_json::from_value(value.clone()) {
        Ok(rules) => rules,
        Err(_) => {
            errors.push(FieldError::new("redact", "must be [{\"path\": \"a.b\", \"action\": \"drop\" or \"hash\"}]"));
            return Vec::new();
        }
    };
    if rules.len() > MAX_REDACTIONS {
        errors.push(FieldError::new("redact", format!("at most {MAX_REDACTIONS} rules")));
    }
    for (index, rule) in rules.iter().enumerate() {
        if rule.path.is_empty() || rule.path.len() > 500 || rule.path.split('.').any(str::is_empty) {
            errors.push(FieldError::new(format!("redact[{index}].path"), "must be a dotted path into data: a.b.c"));
        }
    }
    rules
}

/// Why a new version was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("not backward compatible")]
    Incompatible(Vec<String>),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "event_type, version, schema, mode, redact, compatibility, created_at";

/// Stores `new` as the next version of `event_type`, checked against the newest one unless
/// `backward` is false.
pub async fn register(
    pool: &PgPool,
    event_type: &str,
    new: &NewVersion,
    backward: bool,
) -> Result<SchemaVersion, RegisterError> {
    let mut tx = pool.begin().await?;
    // Serializes versions of one type: the advisory lock lasts the transaction.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('event_schemas:' || $1))")
        .bind(event_type)
        .execute(&mut *tx)
        .await?;
    let newest: Option<SchemaVersion> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM event.event_schemas WHERE event_type = $1 ORDER BY version DESC LIMIT 1"
    )))
    .bind(event_type)
    .fetch_optional(&mut *tx)
    .await?;
    if backward && let Some(newest) = &newest {
        let mut breaking = compat::breaking_changes(&newest.schema, &new.schema);
        if newest.mode == SchemaMode::Flag && new.mode == SchemaMode::Reject {
            breaking.push("the mode changes from flag to reject: events flagged before would be refused".to_owned());
        }
        if !breaking.is_empty() {
            return Err(RegisterError::Incompatible(breaking));
        }
    }
    let version = newest.map_or(1, |newest| newest.version + 1);
    let stored = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO event.event_schemas (event_type, version, schema, mode, redact, compatibility) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    )))
    .bind(event_type)
    .bind(version)
    .bind(sqlx::types::Json(&new.schema))
    .bind(new.mode)
    .bind(sqlx::types::Json(&new.redact))
    .bind(if backward { "backward" } else { "none" })
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(stored)
}

/// Every version of one type, newest first.
pub async fn versions(pool: &PgPool, event_type: &str) -> Result<Vec<SchemaVersion>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM event.event_schemas WHERE event_type = $1 ORDER BY version DESC"
    )))
    .bind(event_type)
    .fetch_all(pool)
    .await
}

/// The newest version of every type.
pub async fn newest(pool: &PgPool) -> Result<Vec<SchemaVersion>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT ON (event_type) {COLUMNS} FROM event.event_schemas ORDER BY event_type, version DESC"
    )))
    .fetch_all(pool)
    .await
}

/// The schemas events are checked against: the newest version of each type, compiled.
#[derive(Default)]
pub struct SchemaSet {
    by_type: HashMap<String, Arc<Active>>,
}

impl SchemaSet {
    /// Checks an event against its type's schema, if it has one, and counts the outcome.
    /// `Err`: refused (mode `reject`); `Ok`: no schema, valid, or flagged (see [`Active::check`]).
    pub fn check(&self, event: &mut Event, metrics: &Metrics) -> Result<(), Vec<SchemaError>> {
        let Some(active) = self.by_type.get(&event.event_type) else { return Ok(()) };
        let checked = active.check(event);
        metrics.schema_checks.get_or_create(&SchemaLabels { outcome: checked.outcome() }).inc();
        match checked {
            Checked::Valid | Checked::Flagged => Ok(()),
            Checked::Refused(errors) => Err(errors),
        }
    }
}

/// The registry source of schemas.
pub struct Schemas;

impl Source for Schemas {
    type Set = SchemaSet;
    const NAME: &'static str = "schemas";
    const CHANGED: &'static str = subjects::SCHEMAS_CHANGED;

    async fn load(&self, pool: &PgPool) -> Result<SchemaSet, sqlx::Error> {
        let mut by_type = HashMap::new();
        for stored in newest(pool).await? {
            match Active::compile(&stored) {
                Ok(active) => {
                    by_type.insert(stored.event_type.clone(), Arc::new(active));
                }
                Err(error) => {
                    tracing::error!(event_type = %stored.event_type, version = stored.version, %error,
                        "a stored schema does not compile; events of this type are not checked");
                }
            }
        }
        Ok(SchemaSet { by_type })
    }
}
