//! Running processors on events, and recording what happened: shared by the live processor
//! stage and by replays.
//!
//! Reads `event.processing_results` (earlier attempts); writes `processing_results`, the
//! events' processing status, the processors' counters and the statistics rollups in one
//! transaction per batch, and `event.processed.*` on EVENT_SERVICE. Guarantees: a status change
//! moves the rollup counts in the same transaction; results are keyed by (event, processor,
//! run, attempt), so a redelivered attempt overwrites its own row and a replay adds rows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::bus::{Bus, Outgoing};
use crate::callback::{self, Guard};
use crate::model::{Event, EventStatus};
use crate::processors::{Action, Runnable};
use crate::subject;

/// How a processor run ended, as `processing_results.status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Success,
    /// Failed for good (no retries left).
    Failed,
    Skipped,
    /// Failed; will be tried again.
    Retry,
}

impl ResultStatus {
    fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "success",
            ResultStatus::Failed => "failed",
            ResultStatus::Skipped => "skipped",
            ResultStatus::Retry => "retry",
        }
    }
}

/// One `processing_results` row.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub event_id: Uuid,
    pub processor_id: String,
    pub processor_name: String,
    pub run_id: String,
    pub attempt: i32,
    pub status: ResultStatus,
    pub message: Option<String>,
    pub duration_ms: f64,
    pub processed_at: DateTime<Utc>,
}

/// The processing status an event moves to.
#[derive(Debug, Clone, Serialize)]
pub struct StatusChange {
    pub event_id: Uuid,
    /// `processing`, `processed` or `failed`.
    pub status: &'static str,
    /// Processors that succeeded; `None` keeps what is stored.
    pub processors: Option<Vec<String>>,
    pub error_message: Option<String>,
    pub retry_count: Option<i32>,
    /// Only move events in these statuses (a replay only lifts `failed` ones).
    pub only_from: Option<Vec<&'static str>>,
}

/// Runs processors' actions. One per process; cheap to share.
pub struct Runner {
    bus: Bus,
    guard: Guard,
    http: reqwest::Client,
    /// Whether a stream captures a subject, so a publish can wait for its PubAck.
    captured: Mutex<HashMap<String, (bool, Instant)>>,
}

const CAPTURE_CACHE_FOR: Duration = Duration::from_secs(30);
const MAX_MESSAGE_CHARS: usize = 500;

impl Runner {
    pub fn new(bus: Bus, guard: Guard) -> Result<Self, reqwest::Error> {
        // Each request sets its own timeout; this one only bounds what has none.
        let http = guard.client(Duration::from_secs(60))?;
        Ok(Self { bus, guard, http, captured: Mutex::new(HashMap::new()) })
    }

    /// Runs one processor on one event: `Ok(message)` on success, `Err(reason)` otherwise.
    /// `payload` is the event's JSON.
    pub async fn run(
        &self,
        runnable: &Runnable,
        event: &Event,
        payload: &Bytes,
        run_id: &str,
    ) -> Result<String, String> {
        match &runnable.action {
            Action::Webhook { url, secret, timeout } => {
                self.guard.check_delivery(url).map_err(|error| format!("callback URL {error}"))?;
                let mut request = self
                    .http
                    .post(url.clone())
                    .timeout(*timeout)
                    .header("content-type", "application/json")
                    .header("event-service-processor", runnable.name())
                    .body(payload.clone());
                if let Some(secret) = secret {
                    let message_id = format!("{}.{}", event.event_id, runnable.name());
                    for (name, value) in callback::sign(secret, &message_id, Utc::now().timestamp(), payload) {
                        request = request.header(name, value);
                    }
                }
                let response = request.send().await.map_err(|error| describe_http_error(&error))?;
                let status = response.status();
                if status.is_success() {
                    Ok(format!("HTTP {}", status.as_u16()))
                } else {
                    let body = response.text().await.unwrap_or_default();
                    Err(clip(&format!("HTTP {}: {}", status.as_u16(), body.trim())))
                }
            }
            Action::Request { subject, timeout } => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Event-Service-Event-Id", event.event_id.to_string().as_str());
                headers.insert("Event-Service-Processor", runnable.name());
                let request = self.bus.client().request_with_headers(subject.clone(), headers, payload.clone());
                let reply = match tokio::time::timeout(*timeout, request).await {
                    Err(_) => return Err(format!("no reply on {subject} within {} ms", timeout.as_millis())),
                    Ok(Err(error)) => {
                        return Err(match error.kind() {
                            async_nats::RequestErrorKind::NoResponders => format!("no responders on {subject}"),
                            async_nats::RequestErrorKind::TimedOut => format!("no reply on {subject} in time"),
                            _ => format!("request on {subject} failed: {error}"),
                        });
                    }
                    Ok(Ok(reply)) => reply,
                };
                let service_error = reply.headers.as_ref().and_then(|headers| {
                    let text = headers.get("Nats-Service-Error").map(|value| value.as_str().to_owned());
                    let code = headers.get("Nats-Service-Error-Code").map(|value| value.as_str().to_owned());
                    match (code, text) {
                        (None, None) => None,
                        (code, text) => {
                            Some(format!("service error {}: {}", code.unwrap_or_default(), text.unwrap_or_default()))
                        }
                    }
                });
                match service_error {
                    Some(error) => Err(clip(&error)),
                    None => Ok(clip(&format!("replied on {subject}: {}", String::from_utf8_lossy(&reply.payload)))),
                }
            }
            Action::Publish { template } => {
                let subject = Action::publish_subject(template, event);
                if self.is_captured(&subject).await {
                    let mut headers = async_nats::HeaderMap::new();
                    let message_id = format!("{}.{}.{run_id}", event.event_id, runnable.name());
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
                    let outgoing = Outgoing { subject: subject.clone(), headers, payload: payload.clone() };
                    let stored =
                        self.bus.publish(outgoing).await.map_err(|error| format!("publish to {subject}: {error}"))?;
                    Ok(format!("published to {subject} (stream sequence {})", stored.sequence))
                } else {
                    self.bus
                        .notify(subject.clone(), payload.clone())
                        .await
                        .map_err(|error| format!("publish to {subject}: {error}"))?;
                    Ok(format!("published to {subject} (no stream captures it)"))
                }
            }
        }
    }

    /// Republishes an event where a replay's target service reads it.
    pub async fn republish(&self, subject: String, event: &Event, payload: &Bytes, run_id: &str) -> Result<(), String> {
        if self.is_captured(&subject).await {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{}.{run_id}", event.event_id).as_str());
            let outgoing = Outgoing { subject: subject.clone(), headers, payload: payload.clone() };
            self.bus.publish(outgoing).await.map(|_| ()).map_err(|error| format!("republish to {subject}: {error}"))
        } else {
            self.bus
                .notify(subject.clone(), payload.clone())
                .await
                .map_err(|error| format!("republish to {subject}: {error}"))
        }
    }

    async fn is_captured(&self, subject: &str) -> bool {
        if let Ok(cache) = self.captured.lock()
            && let Some((captured, at)) = cache.get(subject)
            && at.elapsed() < CAPTURE_CACHE_FOR
        {
            return *captured;
        }
        let captured = self.bus.jetstream().stream_by_subject(subject).await.is_ok();
        if let Ok(mut cache) = self.captured.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (captured, Instant::now()));
        }
        captured
    }
}

fn describe_http_error(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_timeout() {
        text = format!("timed out: {text}");
    }
    clip(&text)
}

fn clip(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        text.to_owned()
    } else {
        text.chars().take(MAX_MESSAGE_CHARS).chain("…".chars()).collect()
    }
}

/// What earlier attempts of the live run did, per (event, processor).
#[derive(Debug, Clone, Default)]
pub struct Prior {
    pub succeeded: bool,
    pub exhausted: bool,
    pub failures: i32,
    /// The message of the latest failed attempt.
    pub last_error: Option<String>,
}

/// Earlier live-run results of these events, keyed by (event, processor name).
pub async fn prior_results(pool: &PgPool, event_ids: &[Uuid]) -> Result<HashMap<(Uuid, String), Prior>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        event_id: Uuid,
        processor_name: String,
        succeeded: bool,
        exhausted: bool,
        failures: i64,
        last_error: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_id, processor_name, bool_or(status = 'success') AS succeeded, \
                bool_or(status = 'failed') AS exhausted, \
                count(*) FILTER (WHERE status IN ('retry', 'failed')) AS failures, \
                (array_agg(message ORDER BY attempt DESC) FILTER (WHERE status IN ('retry', 'failed')))[1] AS last_error \
         FROM event.processing_results WHERE run_id = '' AND event_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(event_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let prior = Prior {
                succeeded: row.succeeded,
                exhausted: row.exhausted,
                failures: row.failures as i32,
                last_error: row.last_error,
            };
            ((row.event_id, row.processor_name), prior)
        })
        .collect())
}

/// Writes results, status changes and processor counters in one transaction. Returns the
/// events whose status was written; the others are not in PostgreSQL yet.
pub async fn record(
    pool: &PgPool,
    results: &[RunResult],
    changes: &[StatusChange],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let written = record_in(&mut tx, results, changes).await?;
    tx.commit().await?;
    Ok(written)
}

/// [`record`] inside the caller's transaction.
pub async fn record_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    results: &[RunResult],
    changes: &[StatusChange],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    if !results.is_empty() {
        sqlx::query(
            "INSERT INTO event.processing_results \
                 (event_id, processor_id, processor_name, run_id, attempt, status, message, duration_ms, processed_at) \
             SELECT event_id, processor_id, processor_name, run_id, attempt, status, message, duration_ms, processed_at \
             FROM jsonb_to_recordset($1) AS r(event_id uuid, processor_id text, processor_name text, run_id text, \
                  attempt int, status text, message text, duration_ms float8, processed_at timestamptz) \
             ON CONFLICT (event_id, processor_name, run_id, attempt) DO UPDATE SET status = EXCLUDED.status, \
                 message = EXCLUDED.message, duration_ms = EXCLUDED.duration_ms, processed_at = EXCLUDED.processed_at",
        )
        .bind(sqlx::types::Json(results))
        .execute(&mut **tx)
        .await?;
        // Counters per processor, in a fixed order so concurrent workers never deadlock.
        let mut counters: std::collections::BTreeMap<&str, (i64, Option<&str>)> = Default::default();
        for result in results {
            let entry = counters.entry(result.processor_id.as_str()).or_default();
            if matches!(result.status, ResultStatus::Failed | ResultStatus::Retry) {
                entry.0 += 1;
                entry.1 = result.message.as_deref();
            }
        }
        let counters: Vec<_> = counters
            .into_iter()
            .map(|(processor_id, (failures, last_error))| {
                json!({"processor_id": processor_id, "failures": failures, "last_error": last_error})
            })
            .collect();
        sqlx::query(
            "UPDATE event.event_processors p SET error_count = p.error_count + c.failures, \
                 last_error = COALESCE(c.last_error, p.last_error), last_processed_at = now() \
             FROM (SELECT * FROM jsonb_to_recordset($1) AS c(processor_id text, failures bigint, last_error text) \
                   ORDER BY processor_id) c \
             WHERE p.processor_id = c.processor_id",
        )
        .bind(sqlx::types::Json(counters))
        .execute(&mut **tx)
        .await?;
    }
    if changes.is_empty() { Ok(Default::default()) } else { change_statuses(tx, changes).await }
}

/// Moves events to new statuses, then the rollups with them. Returns the events that are
/// stored, moved or not. A change whose event is not in one of its `only_from` statuses (an
/// event nothing takes, already stored `processed`) costs one read and no write. The rollups
/// lock is taken last and only when a count moves, so it is held for one short statement and
/// the commit.
async fn change_statuses(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    changes: &[StatusChange],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = changes.iter().map(|change| change.event_id).collect();
    let current: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT event_id, status FROM event.events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    let mut changes: Vec<&StatusChange> = changes
        .iter()
        .filter(|change| {
            current.get(&change.event_id).is_some_and(|status| {
                change.only_from.as_ref().is_none_or(|from| from.iter().any(|allowed| allowed == status))
            })
        })
        .collect();
    let found = current.into_keys().collect();
    if changes.is_empty() {
        return Ok(found);
    }
    changes.sort_by_key(|change| change.event_id);
    changes.dedup_by_key(|change| change.event_id);
    #[derive(sqlx::FromRow)]
    struct Moved {
        old_status: String,
        new_status: String,
        user_id: Option<String>,
        ms: f64,
    }
    // `only_from` is checked again under the row lock: another worker may have moved it.
    let rows: Vec<Moved> = sqlx::query_as(
        "WITH input AS ( \
             SELECT * FROM jsonb_to_recordset($1) AS i(event_id uuid, status text, processors text[], \
                 error_message text, retry_count int, only_from text[]) \
         ), old AS ( \
             SELECT e.event_id, e.status AS old_status, e.user_id, e.created_at, i.status AS new_status \
             FROM event.events e JOIN input i USING (event_id) \
             WHERE i.only_from IS NULL OR e.status = ANY(i.only_from) \
             ORDER BY e.event_id FOR UPDATE OF e \
         ), moved AS ( \
             UPDATE event.events e SET status = i.status, \
                 processors = COALESCE(i.processors, e.processors), \
                 error_message = CASE WHEN i.status = 'processed' THEN NULL \
                                      ELSE COALESCE(i.error_message, e.error_message) END, \
                 retry_count = COALESCE(i.retry_count, e.retry_count), \
                 processed_at = CASE WHEN i.status IN ('processed', 'failed') THEN now() ELSE e.processed_at END, \
                 updated_at = now() \
             FROM input i, old o WHERE e.event_id = i.event_id AND o.event_id = i.event_id \
             RETURNING e.event_id \
         ) \
         SELECT old_status, new_status, user_id, (extract(epoch FROM now() - created_at) * 1000)::float8 AS ms \
         FROM old",
    )
    .bind(sqlx::types::Json(&changes))
    .fetch_all(&mut **tx)
    .await?;
    let mut counts = crate::store::StatusCounts::default();
    for row in rows.iter().filter(|row| row.old_status != row.new_status) {
        // The table's CHECK allows only known statuses.
        let (Some(old), Some(new)) = (EventStatus::parse(&row.old_status), EventStatus::parse(&row.new_status)) else {
            continue;
        };
        counts.add(row.user_id.as_deref(), old, -1);
        counts.add(row.user_id.as_deref(), new, 1);
        if new == EventStatus::Processed {
            counts.processed(row.user_id.as_deref(), row.ms);
        }
    }
    if !counts.is_empty() {
        crate::store::lock_rollups(tx).await?;
        crate::store::add_status_counts(tx, &counts).await?;
    }
    Ok(found)
}

/// The domain event of one processor run.
pub fn processed_message(result: &RunResult, event: &Event, retry_count: i32) -> Outgoing {
    let (subject, body) = match result.status {
        ResultStatus::Success => (
            subject::EVENT_PROCESSED_SUCCESS,
            json!({
                "event_id": event.event_id, "event_type": event.event_type, "processor_name": result.processor_name,
                "duration_ms": result.duration_ms, "run_id": result.run_id, "timestamp": result.processed_at,
            }),
        ),
        _ => (
            subject::EVENT_PROCESSED_FAILED,
            json!({
                "event_id": event.event_id, "event_type": event.event_type, "processor_name": result.processor_name,
                "error_message": result.message, "retry_count": retry_count, "run_id": result.run_id,
                "timestamp": result.processed_at,
            }),
        ),
    };
    let mut headers = async_nats::HeaderMap::new();
    let message_id =
        format!("{subject}.{}.{}.{}.{}", event.event_id, result.processor_name, result.run_id, result.attempt);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
    Outgoing { subject: subject.to_owned(), headers, payload: Bytes::from(body.to_string()) }
}

/// Runs processors on one event one after another, in the order given (highest priority
/// first); a failure never stops the ones after it. `attempt_of` numbers each run.
pub async fn run_in_order(
    runner: &Runner,
    event: &Event,
    payload: &Bytes,
    processors: &[(std::sync::Arc<Runnable>, i32)],
    run_id: &str,
    last_attempt: impl Fn(&Runnable, i32) -> bool,
) -> Vec<RunResult> {
    let mut results = Vec::with_capacity(processors.len());
    for (runnable, attempt) in processors {
        let started = Instant::now();
        let outcome = runner.run(runnable, event, payload, run_id).await;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (status, message) = match outcome {
            Ok(message) => (ResultStatus::Success, Some(message)),
            Err(error) if last_attempt(runnable, *attempt) => (ResultStatus::Failed, Some(error)),
            Err(error) => (ResultStatus::Retry, Some(error)),
        };
        if status != ResultStatus::Success {
            tracing::info!(event_id = %event.event_id, processor = runnable.name(), attempt, status = status.as_str(),
                message = message.as_deref().unwrap_or(""), "processor did not succeed");
        }
        results.push(RunResult {
            event_id: event.event_id,
            processor_id: runnable.processor.processor_id.clone(),
            processor_name: runnable.name().to_owned(),
            run_id: run_id.to_owned(),
            attempt: *attempt,
            status,
            message,
            duration_ms,
            processed_at: Utc::now(),
        });
    }
    results
}
