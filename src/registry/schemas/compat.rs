//! Backward compatibility between two versions of an event type's schema: every event the
//! previous version accepts must stay accepted by the new one, so no producer breaks when a
//! schema changes.
//!
//! Reads two JSON Schemas; writes nothing. The rule is structural and conservative: it walks
//! both schemas side by side and lists every change that could refuse an event the old one
//! took: a new required property, a type or enum value dropped, a bound tightened, a pattern
//! or format added, `additionalProperties` closed, a constrained property added to an open
//! object (which took that name with any value before). A change it cannot prove safe (a combinator, a `$ref`, a keyword it does not know that
//! differs) counts as breaking; `?compatibility=none` registers such a schema anyway.

use serde_json::{Map, Value};

/// Keywords whose change this rule understands; any other keyword that differs is breaking.
const UNDERSTOOD: &[&str] = &[
    "$schema",
    "$id",
    "title",
    "description",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
];

/// The changes from `old` to `new` that could refuse an event `old` accepted, each with where
/// it is (`/properties/amount`, say). Empty: `new` is backward compatible.
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let mut found = Vec::new();
    compare(old, new, "", &mut found);
    found
}

fn compare(old: &Value, new: &Value, at: &str, found: &mut Vec<String>) {
    let here = if at.is_empty() { "the schema" } else { at };
    match (old, new) {
        // `true` and `{}` accept everything: nothing can be looser.
        (_, Value::Bool(true)) => return,
        (Value::Bool(false), _) => return,
        (_, Value::Bool(false)) => {
            found.push(format!("{here}: now refuses everything"));
            return;
        }
        (Value::Bool(true), Value::Object(new)) if new.keys().all(|key| !constrains(key)) => return,
        (Value::Bool(true), _) => {
            found.push(format!("{here}: accepted anything, now has constraints"));
            return;
        }
        _ => {}
    }
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else { return };
    for key in new.keys().chain(old.keys()) {
        if !UNDERSTOOD.contains(&key.as_str()) && old.get(key) != new.get(key) {
            found.push(format!("{here}: `{key}` changed, and this rule cannot tell whether that is safe"));
        }
    }
    types(old, new, here, found);
    sets(old, new, here, found);
    bounds(old, new, here, found);
    if new.get("pattern").is_some_and(|pattern| old.get("pattern") != Some(pattern)) {
        found.push(format!("{here}: `pattern` added or changed"));
    }
    if new.get("format").is_some_and(|format| old.get("format") != Some(format)) {
        found.push(format!("{here}: `format` added or changed"));
    }
    objects(old, new, at, here, found);
    if let Some(new_items) = new.get("items") {
        let old_items = old.get("items").cloned().unwrap_or(Value::Bool(true));
        compare(&old_items, new_items, &format!("{at}/items"), found);
    }
}

/// Whether a keyword can refuse an instance.
fn constrains(key: &str) -> bool {
    !matches!(key, "$schema" | "$id" | "title" | "description" | "examples" | "default" | "deprecated" | "$comment")
}

fn type_set(schema: &Map<String, Value>) -> Option<Vec<&str>> {
    match schema.get("type")? {
        Value::String(one) => Some(vec![one.as_str()]),
        Value::Array(many) => Some(many.iter().filter_map(Value::as_str).collect()),
        _ => Some(Vec::new()),
    }
}

fn types(old: &Map<String, Value>, new: &Map<String, Value>, here: &str, found: &mut Vec<String>) {
    let Some(new_types) = type_set(new) else { return };
    let Some(old_types) = type_set(old) else {
        found.push(format!("{here}: `type` added"));
        return;
    };
    for kind in old_types {
        let kept = new_types.contains(&kind) || (kind == "integer" && new_types.contains(&"number"));
        if !kept {
            found.push(format!("{here}: type `{kind}` no longer accepted"));
        }
    }
}

fn sets(old: &Map<String, Value>, new: &Map<String, Value>, here: &str, found: &mut Vec<String>) {
    if let Some(new_const) = new.get("const")
        && old.get("const") != Some(new_const)
    {
        found.push(format!("{here}: `const` added or changed"));
    }
    if let Some(Value::Array(new_values)) = new.get("enum") {
        let old_values: Option<Vec<&Value>> = match (old.get("enum"), old.get("const")) {
            (Some(Value::Array(values)), _) => Some(values.iter().collect()),
            (_, Some(value)) => Some(vec![value]),
            _ => None,
        };
        match old_values {
            Some(values) => {
                for value in values.into_iter().filter(|value| !new_values.contains(value)) {
                    found.push(format!("{here}: enum value {value} removed"));
                }
            }
            None => found.push(format!("{here}: `enum` added")),
        }
    }
}

fn bounds(old: &Map<String, Value>, new: &Map<String, Value>, here: &str, found: &mut Vec<String>) {
    let number = |schema: &Map<String, Value>, key: &str| schema.get(key).and_then(Value::as_f64);
    for key in ["minimum", "exclusiveMinimum", "minLength", "minItems"] {
        if let Some(new_bound) = number(new, key)
            && number(old, key).is_none_or(|old_bound| new_bound > old_bound)
        {
            found.push(format!("{here}: `{key}` added or raised"));
        }
    }
    for key in ["maximum", "exclusiveMaximum", "maxLength", "maxItems"] {
        if let Some(new_bound) = number(new, key)
            && number(old, key).is_none_or(|old_bound| new_bound < old_bound)
        {
            found.push(format!("{here}: `{key}` added or lowered"));
        }
    }
}

fn objects(old: &Map<String, Value>, new: &Map<String, Value>, at: &str, here: &str, found: &mut Vec<String>) {
    let names = |schema: &Map<String, Value>, key: &str| -> Vec<String> {
        schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let old_required = names(old, "required");
    for name in names(new, "required").iter().filter(|name| !old_required.contains(name)) {
        found.push(format!("{here}: `{name}` is required now"));
    }
    let empty = Map::new();
    let old_properties = old.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let new_properties = new.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let old_additional = old.get("additionalProperties").cloned().unwrap_or(Value::Bool(true));
    let new_additional = new.get("additionalProperties").cloned().unwrap_or(Value::Bool(true));
    for (name, new_property) in new_properties {
        // A property the old schema did not name was checked by its additionalProperties.
        let old_property = old_properties.get(name).unwrap_or(&old_additional);
        compare(old_property, new_property, &format!("{at}/properties/{name}"), found);
    }
    for (name, old_property) in old_properties.iter().filter(|(name, _)| !new_properties.contains_key(*name)) {
        compare(old_property, &new_additional, &format!("{at}/properties/{name}"), found);
    }
    compare(&old_additional, &new_additional, &format!("{at}/additionalProperties"), found);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "type": "object",
            "required": ["order_id"],
            "properties": {
                "order_id": {"type": "string", "maxLength": 40},
                "amount": {"type": "integer", "minimum": 0},
                "currency": {"enum": ["EUR", "USD"]}
            }
        })
    }

    fn with(change: impl Fn(&mut Value)) -> Vec<String> {
        let mut new = base();
        change(&mut new);
        breaking_changes(&base(), &new)
    }

    #[test]
    fn loosening_is_compatible() {
        assert!(with(|_| {}).is_empty());
        let closed = json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false});
        let mut added = closed.clone();
        added["properties"]["b"] = json!({"type": "string"});
        assert!(breaking_changes(&closed, &added).is_empty(), "a new property where none could be before");
        assert!(with(|s| s["properties"]["amount"]["type"] = json!("number")).is_empty(), "integer to number");
        assert!(with(|s| s["properties"]["currency"]["enum"] = json!(["EUR", "USD", "GBP"])).is_empty());
        assert!(with(|s| s["properties"]["order_id"]["maxLength"] = json!(80)).is_empty());
        assert!(with(|s| s["required"] = json!([])).is_empty(), "no longer required");
        assert!(with(|s| s["description"] = json!("Orders")).is_empty());
    }

    #[test]
    fn tightening_is_breaking() {
        let one = |change: &dyn Fn(&mut Value)| {
            let found = with(change);
            assert_eq!(found.len(), 1, "{found:?}");
            found[0].clone()
        };
        assert!(one(&|s| s["required"] = json!(["order_id", "amount"])).contains("`amount` is required now"));
        assert!(one(&|s| s["properties"]["amount"]["type"] = json!("string")).contains("/properties/amount"));
        assert!(one(&|s| s["properties"]["currency"]["enum"] = json!(["EUR"])).contains("\"USD\" removed"));
        assert!(one(&|s| s["properties"]["order_id"]["maxLength"] = json!(10)).contains("maxLength"));
        assert!(one(&|s| s["properties"]["amount"]["minimum"] = json!(1)).contains("minimum"));
        assert!(one(&|s| s["additionalProperties"] = json!(false)).contains("additionalProperties"));
        assert!(one(&|s| s["properties"]["order_id"]["pattern"] = json!("^o-")).contains("pattern"));
        assert!(one(&|s| s["oneOf"] = json!([{"required": ["a"]}])).contains("cannot tell"));
        // An open object took `note` of any type before: constraining it is breaking.
        assert!(one(&|s| s["properties"]["note"] = json!({"type": "string"})).contains("/properties/note"));
    }

    #[test]
    fn a_property_dropped_from_a_closed_object_is_breaking() {
        let old = json!({"type": "object", "properties": {"a": {}, "b": {}}, "additionalProperties": false});
        let new = json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false});
        assert_eq!(breaking_changes(&old, &new), ["/properties/b: now refuses everything"]);
        assert!(breaking_changes(&json!(true), &json!({"type": "object"}))[0].contains("accepted anything"));
        assert!(breaking_changes(&json!({"type": "object"}), &json!(true)).is_empty());
    }
}
