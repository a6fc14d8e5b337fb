//! The dead-letter endpoints: list (filtered, paged), show one, delete one, purge by filter,
//! and redrive by sequences or by filter.
//!
//! Reads DEADLETTER; deletes from it. A redrive goes back to the stage that refused the
//! message ([`redrive::route`]): republished to EVENTS or JOBS, a delivery queued again on
//! DELIVERIES, or a replay job for the processors that failed. Guarantees: a dead letter is
//! deleted only after its redrive was accepted (a published message acknowledged, a job
//! stored), so a crash in between leaves it listed and a second redrive lands once.

use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use crate::domain::fields::parse_timestamp;
use crate::domain::{EventTypePattern, FieldError};
use crate::infra::deadletter::letters::{DeadLetter, DeadLetters, Filter, SCAN_LIMIT};
use crate::infra::deadletter::redrive;
use crate::infra::metrics::StageLabels;
use crate::wire::subjects::{DEADLETTER_STAGES, deadletter_stage};

/// Dead letters one call lists, purges or redrives at most.
const MAX_PAGE: usize = 1000;

/// The filter, as the `filter` object of a redrive (and, field by field, as query parameters).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    stage: Option<String>,
    reason: Option<String>,
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// Checks a filter, every field error at once.
pub fn parse_filter(params: &FilterParams) -> Result<Filter, Vec<FieldError>> {
    let mut errors = Vec::new();
    let stage = params.stage.clone().filter(|stage| {
        let known = DEADLETTER_STAGES.contains(&stage.as_str());
        if !known {
            errors.push(FieldError::new("stage", format!("must be one of {}", DEADLETTER_STAGES.join(", "))));
        }
        known
    });
    let reason_code = params.reason.clone().filter(|code| {
        let valid = !code.is_empty() && code.len() <= 64 && code.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if !valid {
            errors.push(FieldError::new("reason", "must be a reason code: lower-case letters and '_'"));
        }
        valid
    });
    let event_type = params.event_type.as_deref().and_then(|text| match EventTypePattern::parse(text) {
        Ok(pattern) => Some(pattern),
        Err(error) => {
            errors.push(FieldError::new("event_type", error.to_string()));
            None
        }
    });
    let mut time = |name: &str, text: &Option<String>| {
        text.as_deref().and_then(|text| {
            let parsed = parse_timestamp(text);
            if parsed.is_none() {
                errors.push(FieldError::new(name, "must be an RFC 3339 timestamp"));
            }
            parsed
        })
    };
    let since = time("since", &params.since);
    let until = time("until", &params.until);
    if errors.is_empty() { Ok(Filter { stage, reason_code, event_type, since, until }) } else { Err(errors) }
}

/// The query of a list or a purge. Written out (not flattened) so that an unknown parameter
/// is refused: a misspelled filter must not widen a purge.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParams {
    stage: Option<String>,
    reason: Option<String>,
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// Resume after this DEADLETTER sequence (the `next` of the previous page).
    after: Option<u64>,
    /// List only.
    limit: Option<usize>,
    /// Purge only: required to purge with no filter at all.
    all: Option<bool>,
}

impl QueryParams {
    fn filter(&self) -> Result<Filter, ApiError> {
        let params = FilterParams {
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            event_type: self.event_type.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
        };
        parse_filter(&params).map_err(ApiError::Validation)
    }
}

#[derive(Serialize)]
pub struct Listed {
    dead_letters: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `null` when the stream was read to its end.
    next: Option<u64>,
}

pub async fn list(State(state): State<AppState>, Query(params): Query<QueryParams>) -> Result<Json<Listed>, ApiError> {
    let filter = params.filter()?;
    let limit = page_limit(params.limit)?;
    let letters = DeadLetters::open(&state.bus).await?;
    let page = letters.page(&filter, params.after.unwrap_or(0), limit).await?;
    Ok(Json(Listed { dead_letters: page.letters, next: page.next }))
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100),
        Some(limit @ 1..=MAX_PAGE) => Ok(limit),
        Some(_) => Err(ApiError::field("limit", format!("must be 1 to {MAX_PAGE}"))),
    }
}

fn sequence(seq: &str) -> Result<u64, ApiError> {
    seq.parse::<u64>().ok().filter(|seq| *seq > 0).ok_or(ApiError::NotFound("Dead letter"))
}

/// One dead letter with its original headers and payload.
#[derive(Serialize)]
pub struct Shown {
    #[serde(flatten)]
    letter: DeadLetter,
    headers: serde_json::Map<String, Value>,
    /// `json` (the payload as JSON), `text` (UTF-8 that is not JSON) or `base64`.
    payload_encoding: &'static str,
    payload: Value,
}

pub async fn show(State(state): State<AppState>, Path(seq): Path<String>) -> Result<Json<Shown>, ApiError> {
    let seq = sequence(&seq)?;
    let letter = DeadLetters::open(&state.bus).await?.get(seq).await?.ok_or(ApiError::NotFound("Dead letter"))?;
    let mut headers = serde_json::Map::new();
    for (name, values) in letter.headers.iter() {
        let values: Vec<Value> = values.iter().map(|value| json!(value.as_str())).collect();
        headers.insert(name.to_string(), Value::Array(values));
    }
    let (payload_encoding, payload) = payload_view(&letter.payload);
    Ok(Json(Shown { letter, headers, payload_encoding, payload }))
}

/// How a payload is shown: as JSON when it is, as text when it is UTF-8, else base64.
fn payload_view(payload: &[u8]) -> (&'static str, Value) {
    if let Ok(value) = serde_json::from_slice::<Value>(payload) {
        return ("json", value);
    }
    match std::str::from_utf8(payload) {
        Ok(text) => ("text", json!(text)),
        Err(_) => {
            use base64::Engine;
            ("base64", json!(base64::engine::general_purpose::STANDARD.encode(payload)))
        }
    }
}

pub async fn delete(State(state): State<AppState>, Path(seq): Path<String>) -> Result<Json<Value>, ApiError> {
    let seq = sequence(&seq)?;
    let letters = DeadLetters::open(&state.bus).await?;
    let letter = letters.get(seq).await?.ok_or(ApiError::NotFound("Dead letter"))?;
    if !letters.delete(seq).await? {
        return Err(ApiError::NotFound("Dead letter"));
    }
    count_deleted(&state, &letter.stage, 1);
    Ok(Json(json!({"status": "deleted", "seq": seq})))
}

/// Deletes what the filter matches among the dead letters one call reads ([`SCAN_LIMIT`]);
/// `next` is not null when more were left unread: call again.
pub async fn purge(State(state): State<AppState>, Query(params): Query<QueryParams>) -> Result<Json<Value>, ApiError> {
    let filter = params.filter()?;
    if filter.is_empty() && params.all != Some(true) {
        return Err(ApiError::field("all", "a purge with no filter must say all=true"));
    }
    let letters = DeadLetters::open(&state.bus).await?;
    let page = letters.page(&filter, params.after.unwrap_or(0), SCAN_LIMIT).await?;
    let mut deleted = 0;
    for letter in &page.letters {
        if letters.delete(letter.seq).await? {
            count_deleted(&state, &letter.stage, 1);
            deleted += 1;
        }
    }
    Ok(Json(json!({"status": "purged", "deleted": deleted, "next": page.next})))
}

fn count_deleted(state: &AppState, stage: &str, n: u64) {
    state.bus.metrics().dead_letters_deleted.get_or_create(&StageLabels { stage: deadletter_stage(stage) }).inc_by(n);
}

/// A validated redrive request: which dead letters, and a corrected payload for one.
#[derive(Debug)]
pub struct RedriveRequest {
    pub which: Which,
    /// With a filter: resume after this DEADLETTER sequence.
    pub after: u64,
    pub payload: Option<Bytes>,
}

#[derive(Debug)]
pub enum Which {
    Sequences(Vec<u64>),
    Matching(Filter),
}

pub fn parse_redrive(body: &Value) -> Result<RedriveRequest, Vec<FieldError>> {
    let map = crate::domain::fields::object_body(body)?;
    let mut errors = Vec::new();
    for key in map.keys().filter(|key| !matches!(key.as_str(), "seqs" | "filter" | "after" | "payload")) {
        errors.push(FieldError::new(key, "is not a redrive field (seqs, filter, after, payload)"));
    }
    let after = match map.get("after") {
        None => 0,
        Some(after) => match (after.as_u64(), map.contains_key("filter")) {
            (Some(after), true) => after,
            _ => {
                errors.push(FieldError::new("after", "goes with filter: the next of the previous answer"));
                0
            }
        },
    };
    let which = match (map.get("seqs"), map.get("filter")) {
        (Some(Value::Array(items)), None) if !items.is_empty() && items.len() <= MAX_PAGE => {
            let seqs: Option<Vec<u64>> = items.iter().map(|item| item.as_u64().filter(|seq| *seq > 0)).collect();
            if seqs.is_none() {
                errors.push(FieldError::new("seqs", "must hold dead-letter sequences (positive integers)"));
            }
            seqs.map(Which::Sequences)
        }
        (Some(_), None) => {
            errors.push(FieldError::new("seqs", format!("must be an array of 1 to {MAX_PAGE} sequences")));
            None
        }
        (None, Some(filter)) => match serde_json::from_value::<FilterParams>(filter.clone()) {
            Ok(params) => parse_filter(&params)
                .map_err(|found| errors.extend(found.into_iter().map(|error| error.nested("filter"))))
                .ok()
                .map(Which::Matching),
            Err(error) => {
                errors.push(FieldError::new(
                    "filter",
                    format!("must be {{stage, reason, event_type, since, until}}: {error}"),
                ));
                None
            }
        },
        _ => {
            errors.push(FieldError::new("body", "needs exactly one of seqs and filter"));
            None
        }
    };
    let payload = map.get("payload").map(|payload| Bytes::from(payload.to_string()));
    if payload.is_some() && !matches!(&which, Some(Which::Sequences(seqs)) if seqs.len() == 1) {
        errors.push(FieldError::new("payload", "replaces the payload of one dead letter: give exactly one seq"));
    }
    match which {
        Some(which) if errors.is_empty() => Ok(RedriveRequest { which, after, payload }),
        _ => Err(errors),
    }
}

#[derive(Serialize)]
pub struct Redriven {
    seq: u64,
    stage: String,
    /// `republished`, `requeued`, or `reprocessing` (the replay job deletes the dead letter
    /// once the processors succeeded; it stays listed if they fail again).
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_id: Option<Uuid>,
    /// False when the redrive went through but the dead letter could not be deleted (it is
    /// still listed; a second redrive of a republished or requeued one lands once within
    /// JetStream's duplicate window).
    deleted: bool,
}

#[derive(Serialize)]
pub struct Refused {
    seq: u64,
    code: &'static str,
    detail: String,
}

pub async fn redrive(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    let request = parse_redrive(&body).map_err(ApiError::Validation)?;
    let letters = DeadLetters::open(&state.bus).await?;
    let (mut selected, mut refused, mut next) = (Vec::new(), Vec::new(), None);
    match &request.which {
        Which::Sequences(seqs) => {
            for &seq in seqs {
                match letters.get(seq).await? {
                    Some(letter) => selected.push(letter),
                    None => refused.push(Refused {
                        seq,
                        code: "not_found",
                        detail: "no dead letter has this sequence".into(),
                    }),
                }
            }
        }
        Which::Matching(filter) => {
            let page = letters.page(filter, request.after, MAX_PAGE).await?;
            (selected, next) = (page.letters, page.next);
        }
    }
    let mut redriven = Vec::new();
    for letter in selected {
        match super::redrive::carry_out(&state, &letter, redrive::route(&letter, request.payload.clone())).await {
            Ok((action, replay_id)) => {
                // Deleted only now: a redrive that failed leaves the dead letter listed. A
                // replay job deletes its own once the processors succeeded.
                let deleted = match replay_id {
                    Some(_) => false,
                    None => letters.delete(letter.seq).await.unwrap_or_else(|error| {
                        tracing::warn!(seq = letter.seq, %error, "redriven, but the dead letter is not deleted");
                        false
                    }),
                };
                let labels = StageLabels { stage: deadletter_stage(&letter.stage) };
                state.bus.metrics().dead_letters_redriven.get_or_create(&labels).inc();
                redriven.push(Redriven { seq: letter.seq, stage: letter.stage, action, replay_id, deleted });
            }
            Err((code, detail)) => refused.push(Refused { seq: letter.seq, code, detail }),
        }
    }
    Ok(Json(json!({"redriven": redriven, "refused": refused, "next": next})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: Value) -> Vec<String> {
        parse_redrive(&body).unwrap_err().into_iter().map(|error| error.field).collect()
    }

    #[test]
    fn a_redrive_names_its_dead_letters_one_way() {
        assert!(
            matches!(parse_redrive(&json!({"seqs": [3, 4]})).unwrap().which, Which::Sequences(ref s) if s == &[3, 4])
        );
        let matching = parse_redrive(&json!({"filter": {"stage": "sender", "reason": "delivery_failed"}})).unwrap();
        assert!(matches!(matching.which, Which::Matching(ref f) if f.stage.as_deref() == Some("sender")));
        assert!(parse_redrive(&json!({"seqs": [3], "payload": {"event_type": "x"}})).unwrap().payload.is_some());
        assert_eq!(fields(json!({})), ["body"]);
        assert_eq!(fields(json!({"seqs": [1], "filter": {}})), ["body"]);
        assert_eq!(fields(json!({"seqs": []})), ["seqs"]);
        assert_eq!(fields(json!({"seqs": [0]})), ["seqs"]);
        assert_eq!(fields(json!({"seqs": [1, 2], "payload": {}})), ["payload"]);
        assert_eq!(
            fields(json!({"filter": {"stage": "nowhere", "since": "yesterday"}})),
            ["filter.stage", "filter.since"]
        );
        assert_eq!(fields(json!({"filter": {"colour": "red"}})), ["filter"]);
        assert_eq!(fields(json!({"seqs": [1], "extra": 1})), ["extra"]);
        assert_eq!(fields(json!({"seqs": [1], "after": 5})), ["after"]);
        assert_eq!(parse_redrive(&json!({"filter": {}, "after": 5})).unwrap().after, 5);
    }

    #[test]
    fn payloads_show_as_json_text_or_base64() {
        assert_eq!(payload_view(br#"{"a": 1}"#), ("json", json!({"a": 1})));
        assert_eq!(payload_view(b"{oops"), ("text", json!("{oops")));
        assert_eq!(payload_view(&[0xff, 0x00]), ("base64", json!("/wA=")));
    }
}
