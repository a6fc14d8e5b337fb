//! The subscription endpoints: create, list, get, update, delete, the secret and its
//! rotation, the delivery log, resend and recover.
//!
//! Reads and writes `event.event_subscriptions`, reads `event.delivery_attempts` and
//! `event.events`; queues deliveries on DELIVERIES (resend, recover); tells dispatchers and
//! senders to reload after each change, so it takes effect within a second; sets the
//! dispatcher consumer's filter ([`crate::stages::interest`]) before answering.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, RawBody, parse_json};
use crate::domain::{FieldError, Fields, Secret};
use crate::infra::callback::Guard;
use crate::registry;
use crate::registry::subscriptions::{self, StoreError, Subscription, Subscriptions};
use crate::stages::dispatcher::{self, RequeueError};
use crate::stages::interest::{self, Idler};
use crate::store::deliveries::{self, Attempt, DeliveryStats};
use crate::store::events;
use crate::wire::domain_events::{DomainEvent, SubscriptionCreated};

/// A subscription with its delivery counts, secret masked.
#[derive(Serialize)]
pub struct SubscriptionView {
    #[serde(flatten)]
    subscription: Subscription,
    stats: DeliveryStats,
}

pub async fn create(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<Value>, ApiError> {
    let changes = subscriptions::parse_changes(&body, &Guard::default(), true).map_err(ApiError::Validation)?;
    let subscription = subscriptions::create(&state.pool, changes).await.map_err(|error| match error {
        StoreError::IdTaken(id) => ApiError::Conflict {
            code: "duplicate_subscription_id",
            detail: format!("A subscription with id {id} already exists"),
        },
        StoreError::Database(error) => ApiError::Database(error),
    })?;
    interest::changed(Idler::Dispatcher, &state.bus, &state.pool).await;
    let created = SubscriptionCreated {
        subscription_id: &subscription.subscription_id,
        subscriber_name: &subscription.subscriber_name,
        event_types: &subscription.event_types,
        event_sources: subscription.event_sources.as_deref(),
        event_categories: subscription.event_categories.as_deref(),
        enabled: subscription.enabled,
        timestamp: subscription.created_at,
    };
    state.bus.announce(created.to_message().into_iter().collect()).await;
    // The one answer that shows the secret, with GET .../secret.
    let secret = subscription.webhook_secret.clone();
    let mut shown = serde_json::to_value(SubscriptionView { subscription, stats: DeliveryStats::default() })
        .map_err(|error| ApiError::Internal(error.into()))?;
    shown["webhook_secret"] = json!(secret.expose());
    Ok(Json(shown))
}

#[derive(Deserialize)]
pub struct ListParams {
    enabled: Option<bool>,
    subscriber_name: Option<String>,
    /// Only subscriptions that would receive this event type.
    event_type: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<SubscriptionView>>, ApiError> {
    let mut stats = deliveries::stats(&state.pool).await?;
    let views = subscriptions::list(&state.pool)
        .await?
        .into_iter()
        .filter(|s| params.enabled.is_none_or(|enabled| s.enabled == enabled))
        .filter(|s| params.subscriber_name.as_deref().is_none_or(|name| s.subscriber_name == name))
        .filter(|s| params.event_type.as_deref().is_none_or(|event_type| s.takes_type(event_type)))
        .map(|subscription| {
            let stats = stats.remove(&subscription.subscription_id).unwrap_or_default();
            SubscriptionView { subscription, stats }
        })
        .collect();
    Ok(Json(views))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<SubscriptionView>, ApiError> {
    let subscription = subscriptions::get(&state.pool, &id).await?.ok_or(ApiError::NotFound("Subscription"))?;
    let stats = deliveries::stats(&state.pool).await?.remove(&id).unwrap_or_default();
    Ok(Json(SubscriptionView { subscription, stats }))
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Subscription>, ApiError> {
    let changes = subscriptions::parse_changes(&body, &Guard::default(), false).map_err(ApiError::Validation)?;
    let updated = subscriptions::update(&state.pool, &id, changes).await?.ok_or(ApiError::NotFound("Subscription"))?;
    interest::changed(Idler::Dispatcher, &state.bus, &state.pool).await;
    Ok(Json(updated))
}

pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if !subscriptions::delete(&state.pool, &id).await? {
        return Err(ApiError::NotFound("Subscription"));
    }
    interest::changed(Idler::Dispatcher, &state.bus, &state.pool).await;
    Ok(Json(json!({"status": "deleted", "subscription_id": id})))
}

pub async fn secret(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let subscription = subscriptions::get(&state.pool, &id).await?.ok_or(ApiError::NotFound("Subscription"))?;
    Ok(Json(shown_secret(&subscription)))
}

/// The default overlap of a rotation: a day.
const DEFAULT_OVERLAP_SECS: i64 = 24 * 3600;
/// The longest overlap: a week.
const MAX_OVERLAP_SECS: i64 = 7 * 24 * 3600;

/// `POST .../secret/rotate`: a new secret (generated, or the body's `webhook_secret`); the
/// replaced one keeps signing beside it for `overlap_seconds` (default a day). The body is
/// optional.
pub async fn rotate_secret(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawBody(bytes): RawBody,
) -> Result<Json<Value>, ApiError> {
    let body = match bytes.iter().all(u8::is_ascii_whitespace) {
        true => json!({}),
        false => parse_json(&bytes)?,
    };
    let Some(map) = body.as_object() else {
        return Err(ApiError::field("body", "must be a JSON object: {overlap_seconds, webhook_secret}"));
    };
    let mut errors: Vec<FieldError> = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let overlap = fields.integer("overlap_seconds", 0..=MAX_OVERLAP_SECS).unwrap_or(DEFAULT_OVERLAP_SECS);
    let chosen = fields.string("webhook_secret", 1024);
    if chosen.as_ref().is_some_and(|secret| secret.len() < 8) {
        fields.fail("webhook_secret", "must be at least 8 characters (or leave it out to get one)");
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let new = chosen.map(Secret::from).unwrap_or_else(subscriptions::new_secret);
    let overlap = std::time::Duration::from_secs(overlap.unsigned_abs());
    let rotated = subscriptions::rotate_secret(&state.pool, &id, &new, overlap)
        .await?
        .ok_or(ApiError::NotFound("Subscription"))?;
    registry::announce_change::<Subscriptions>(&state.bus).await;
    tracing::info!(subscription_id = %id, overlap_secs = overlap.as_secs(), "subscription secret rotated");
    Ok(Json(shown_secret(&rotated)))
}

/// The secret endpoints' answer: the current secret and when the replaced one stops signing.
fn shown_secret(subscription: &Subscription) -> Value {
    json!({
        "subscription_id": subscription.subscription_id,
        "webhook_secret": subscription.webhook_secret.expose(),
        "previous_secret_expires_at": subscription.previous_secret_expires_at,
    })
}

#[derive(Deserialize)]
pub struct Page {
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Serialize)]
pub struct Deliveries {
    deliveries: Vec<Attempt>,
    total: i64,
    limit: i64,
    offset: i64,
    has_more: bool,
}

pub async fn deliveries(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Deliveries>, ApiError> {
    let limit = page.limit.unwrap_or(100);
    let offset = page.offset.unwrap_or(0);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be an integer from 1 to 1000"));
    }
    if offset < 0 {
        return Err(ApiError::field("offset", "must be an integer ≥ 0"));
    }
    subscriptions::get(&state.pool, &id).await?.ok_or(ApiError::NotFound("Subscription"))?;
    let (deliveries, total) = deliveries::attempts(&state.pool, &id, limit, offset).await?;
    let has_more = offset + (deliveries.len() as i64) < total;
    Ok(Json(Deliveries { deliveries, total, limit, offset, has_more }))
}

pub async fn resend(
    State(state): State<AppState>,
    Path((id, event_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    subscriptions::get(&state.pool, &id).await?.ok_or(ApiError::NotFound("Subscription"))?;
    let event_id = Uuid::parse_str(&event_id).map_err(|_| ApiError::NotFound("Event"))?;
    let event = events::get_event(&state.pool, event_id).await?.ok_or(ApiError::NotFound("Event"))?;
    dispatcher::requeue(&state.bus, &state.pool, &id, &[event.to_event()]).await.map_err(requeue_error)?;
    Ok(Json(json!({"status": "queued", "subscription_id": id, "event_id": event_id})))
}

pub async fn recover(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let Some(map) = body.as_object() else {
        return Err(ApiError::field("body", "must be a JSON object: {since, until}"));
    };
    let mut errors: Vec<FieldError> = Vec::new();
    let mut fields = Fields { body: map, errors: &mut errors };
    let since = fields.timestamp("since");
    if !fields.present("since") {
        fields.fail("since", "is required");
    }
    let until = fields.timestamp("until").unwrap_or_else(chrono::Utc::now);
    if let Some(since) = since
        && until < since
    {
        fields.fail("until", "must not be before since");
    }
    let since = match since {
        Some(since) if errors.is_empty() => since,
        _ => return Err(ApiError::Validation(errors)),
    };
    subscriptions::get(&state.pool, &id).await?.ok_or(ApiError::NotFound("Subscription"))?;
    let ids = deliveries::failed_in_window(&state.pool, &id, since, until).await?;
    let events: Vec<_> = events::events_by_ids(&state.pool, &ids).await?.iter().map(|e| e.to_event()).collect();
    let queued = dispatcher::requeue(&state.bus, &state.pool, &id, &events).await.map_err(requeue_error)?;
    Ok(Json(json!({"status": "recovering", "subscription_id": id, "queued": queued})))
}

fn requeue_error(error: RequeueError) -> ApiError {
    match error {
        RequeueError::Database(error) => ApiError::Database(error),
        RequeueError::Bus(error) => ApiError::Bus(error),
        RequeueError::Encode(error) => ApiError::Internal(error.into()),
    }
}
