//! Canonical JSON: the one form configs and metrics take before they are hashed or
//! compared, so equal values hash equally whatever their field order. A leaf module.

use serde_json::Value;

/// Sorts object keys recursively.
pub fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// `v` in canonical form as compact text.
pub fn canonical_string(v: Value) -> String {
    serde_json::to_string(&canonical(v)).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_sorted_at_every_depth_and_arrays_keep_their_order() {
        let v = json!({"b": {"z": 1, "a": [ {"y": 1, "x": 2} ]}, "a": 0});
        assert_eq!(
            canonical_string(v),
            r#"{"a":0,"b":{"a":[{"x":2,"y":1}],"z":1}}"#
        );
    }
}
