//! Folding entity streams into projection state: the reducers and the fold itself, pure.
//!
//! Reads nothing, writes nothing. Guarantees: a fold only takes events after its watermark
//! (the last stream version folded), so folding the same events twice changes nothing; every
//! `snapshot_every` applied events it keeps a snapshot.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::registry::definitions::{Definition, Reducer};
use crate::store::projections::{Projection, Snapshot, StreamEvent};

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Folds one event into a state.
pub fn reduce(reducer: Reducer, state: &mut Value, event: &StreamEvent) {
    if reducer == Reducer::Merge {
        merge_patch(state, &event.data);
        return;
    }
    if !state.is_object() {
        *state = Value::Object(Map::new());
    }
    let Value::Object(map) = state else { return };
    match reducer {
        Reducer::ByType => {
            map.insert(event.event_type.clone(), event.data.clone());
        }
        Reducer::Counter => {
            let count = map.get(&event.event_type).and_then(Value::as_i64).unwrap_or(0);
            map.insert(event.event_type.clone(), json!(count + 1));
        }
        Reducer::Merge => {}
    }
}

/// A projection being folded, and the snapshots taken on the way.
#[derive(Debug, Clone)]
pub struct Fold {
    pub projection: Projection,
    pub max_timestamp: DateTime<Utc>,
    pub snapshots: Vec<Snapshot>,
    /// It was not stored before.
    pub created: bool,
    /// It moved past its stored watermark.
    pub changed: bool,
}

impl Fold {
    /// Starts from a stored projection, or from nothing.
    pub fn start(definition: &Definition, entity_type: &str, entity_id: &str, stored: Option<Projection>) -> Self {
        let created = stored.is_none();
        let now = Utc::now();
        let projection = stored.unwrap_or_else(|| Projection {
            projection_id: Uuid::now_v7(),
            projection_name: definition.name.clone(),
            entity_type: entity_type.to_owned(),
            entity_id: entity_id.to_owned(),
            state: Value::Object(Map::new()),
            version: 0,
            stream_version: 0,
            last_event_id: None,
            created_at: now,
            updated_at: now,
        });
        Self { projection, max_timestamp: DateTime::<Utc>::UNIX_EPOCH, snapshots: Vec::new(), created, changed: false }
    }

    /// Starts from a snapshot (time travel).
    pub fn from_snapshot(definition: &Definition, snapshot: Snapshot) -> Self {
        let mut fold = Self::start(definition, &snapshot.entity_type, &snapshot.entity_id, None);
        fold.projection.version = snapshot.version;
        fold.projection.stream_version = snapshot.stream_version;
        fold.projection.state = snapshot.state;
        fold.projection.last_event_id = snapshot.last_event_id;
        fold.max_timestamp = snapshot.max_timestamp;
        fold.changed = true;
        fold
    }

    /// Folds the events after the watermark, in stream order; a snapshot every
    /// `snapshot_every` applied events (0: none).
    pub fn apply<'a>(
        &mut self,
        definition: &Definition,
        events: impl IntoIterator<Item = &'a StreamEvent>,
        snapshot_every: i64,
    ) {
        for event in events {
            if event.stream_version <= self.projection.stream_version {
                continue;
            }
            self.projection.stream_version = event.stream_version;
            self.changed = true;
            if !definition.takes(&event.event_type) {
                continue;
            }
            reduce(definition.reducer, &mut self.projection.state, event);
            self.projection.version += 1;
            self.projection.last_event_id = Some(event.event_id);
            self.max_timestamp = self.max_timestamp.max(event.timestamp);
            if snapshot_every > 0 && self.projection.version % snapshot_every == 0 {
                self.snapshots.push(self.snapshot());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            projection_name: self.projection.projection_name.clone(),
            entity_type: self.projection.entity_type.clone(),
            entity_id: self.projection.entity_id.clone(),
            version: self.projection.version,
            stream_version: self.projection.stream_version,
            state: self.projection.state.clone(),
            last_event_id: self.projection.last_event_id,
            max_timestamp: self.max_timestamp,
        }
    }
}

/// Whether the events (in stream order) continue a watermark with no gap, so they can be
/// folded as they came instead of being read back.
pub fn continues(events: &[StreamEvent], watermark: i64) -> bool {
    events.iter().zip(watermark.saturating_add(1)..).all(|(event, next)| event.stream_version == next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DefinitionStatus, EventTypePattern, StreamId};

    fn definition(reducer: Reducer, types: Option<&[&str]>) -> Definition {
        Definition {
            name: "d".into(),
            entity_type: "*".into(),
            event_types: types.map(|types| types.iter().map(|t| EventTypePattern::parse(t).unwrap()).collect()),
            reducer,
            status: DefinitionStatus::Live,
            created_at: Utc::now(),
        }
    }

    fn event(version: i64, event_type: &str, data: Value) -> StreamEvent {
        StreamEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            data,
            stream_id: StreamId::parse("order:1").unwrap(),
            stream_version: version,
            timestamp: Utc::now(),
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut state = json!({"a": "b", "c": {"d": "e", "f": "g"}, "keep": 1});
        merge_patch(&mut state, &json!({"a": "z", "c": {"f": null, "h": [1]}, "new": {"x": 1}}));
        assert_eq!(state, json!({"a": "z", "c": {"d": "e", "h": [1]}, "keep": 1, "new": {"x": 1}}));
        merge_patch(&mut state, &json!({"c": null}));
        assert!(state.get("c").is_none());
    }

    #[test]
    fn folds_are_idempotent_and_keep_snapshots() {
        let counter = definition(Reducer::Counter, Some(&["order.*"]));
        let events: Vec<StreamEvent> =
            (1..=5).map(|v| event(v, if v == 3 { "note.added" } else { "order.placed" }, json!({}))).collect();
        let mut fold = Fold::start(&counter, "order", "1", None);
        fold.apply(&counter, &events, 2);
        fold.apply(&counter, &events, 2);
        assert_eq!(fold.projection.state, json!({"order.placed": 4}));
        assert_eq!((fold.projection.version, fold.projection.stream_version), (4, 5));
        assert_eq!(fold.snapshots.iter().map(|s| s.version).collect::<Vec<_>>(), [2, 4]);
        assert!(fold.created && fold.changed);
    }

    #[test]
    fn by_type_keeps_the_latest_data_per_type() {
        let by_type = definition(Reducer::ByType, None);
        let mut fold = Fold::start(&by_type, "order", "1", None);
        fold.apply(&by_type, &[event(1, "a", json!({"x": 1})), event(2, "a", json!({"x": 2}))], 0);
        assert_eq!(fold.projection.state, json!({"a": {"x": 2}}));
    }

    #[test]
    fn only_a_gapless_continuation_is_folded_as_it_came() {
        let events = [event(4, "a", json!({})), event(5, "a", json!({}))];
        assert!(continues(&events, 3));
        assert!(!continues(&events, 2));
        assert!(continues(&[], 7));
    }
}
