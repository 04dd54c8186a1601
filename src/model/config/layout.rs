//! The spellings of one setting across transformers versions (`in_chans`/`in_channels`,
//! `rope_scaling`/`rope_parameters`, `torch_dtype`/`dtype`, top-level text fields and their
//! `text_config` copies), rewritten into the one the serde structs read; two spellings that
//! disagree are refused naming both ([`ConfigError::Conflict`]).

use std::path::Path;

use super::error::ConfigError;

/// Text fields medpipe reads that transformers 4.53–4.57 write both at top level and in
/// `text_config`; where both are present they must agree.
const SHARED_TEXT_FIELDS: [&str; 18] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "hidden_act",
    "tie_word_embeddings",
    "use_sliding_window",
    "head_dim",
    "eos_token_id",
    "pad_token_id",
    "layer_types",
    "dtype",
];

/// Rewrites every spelling transformers uses into the one the serde structs read, refusing
/// two spellings of one setting that disagree: vision `in_chans` → `in_channels`,
/// `rope_parameters` → `rope_scaling`, `torch_dtype` → `dtype`, a top-level `rope_theta`
/// against the one inside the rope parameters, and top-level text fields against their
/// `text_config` copies.
pub(super) fn reconcile_spellings(
    root: &mut serde_json::Value,
    path: &Path,
) -> Result<(), ConfigError> {
    let Some(obj) = root.as_object_mut() else {
        return Ok(()); // not an object: the typed parse reports it
    };
    if let Some(v) = obj.get_mut("vision_config").and_then(|v| v.as_object_mut()) {
        merge_alias(v, "vision_config.", "in_chans", "in_channels", path)?;
    }
    reconcile_text(obj, "", path)?;
    if let Some(t) = obj.get_mut("text_config").and_then(|v| v.as_object_mut()) {
        reconcile_text(t, "text_config.", path)?;
    }
    if let Some(t) = obj.get("text_config").and_then(|v| v.as_object()) {
        for k in SHARED_TEXT_FIELDS {
            if let (Some(a), Some(b)) = (obj.get(k), t.get(k)) {
                if !same_setting(a, b) {
                    return Err(conflict(path, k.into(), a, format!("text_config.{k}"), b));
                }
            }
        }
    }
    Ok(())
}

/// One text-config object (the root or `text_config`): rope and dtype spellings.
fn reconcile_text(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for rope in ["rope_scaling", "rope_parameters"] {
        let inner = obj.get(rope).and_then(|r| r.get("rope_theta"));
        if let (Some(a), Some(b)) = (obj.get("rope_theta"), inner) {
            if !same_setting(a, b) {
                return Err(conflict(
                    path,
                    format!("{prefix}rope_theta"),
                    a,
                    format!("{prefix}{rope}.rope_theta"),
                    b,
                ));
            }
        }
    }
    merge_alias(obj, prefix, "rope_parameters", "rope_scaling", path)?;
    merge_alias(obj, prefix, "torch_dtype", "dtype", path)
}

/// Moves `from` to `to` in `obj`; when both are present they must be the same setting.
fn merge_alias(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    from: &str,
    to: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    let Some(a) = obj.remove(from) else {
        return Ok(());
    };
    match obj.get_mut(to) {
        Some(b) if !same_setting(&a, b) => Err(conflict(
            path,
            format!("{prefix}{from}"),
            &a,
            format!("{prefix}{to}"),
            b,
        )),
        // Equal: keep the union, so a `rope_theta` only one of them carries survives.
        Some(b) => {
            if let (Some(bo), Some(ao)) = (b.as_object_mut(), a.as_object()) {
                for (k, v) in ao {
                    bo.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            Ok(())
        }
        None => {
            obj.insert(to.into(), a);
            Ok(())
        }
    }
}

/// Whether two JSON values state the same setting: numbers compare by value (`2` = `2.0`),
/// rope objects by the fields that matter (`mrope_section`, and `rope_theta` where both
/// have it; `rope_type: default` and `type: mrope` name the same rotary scheme).
fn same_setting(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) if x.contains_key("mrope_section") => {
            ["mrope_section", "rope_theta"]
                .iter()
                .all(|k| match (x.get(*k), y.get(*k)) {
                    (Some(p), Some(q)) => same_setting(p, q),
                    _ => *k == "rope_theta",
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_setting(p, q))
        }
        _ => a == b,
    }
}

fn conflict(
    path: &Path,
    first: String,
    a: &serde_json::Value,
    second: String,
    b: &serde_json::Value,
) -> ConfigError {
    ConfigError::Conflict {
        path: path.to_path_buf(),
        first,
        first_value: a.to_string(),
        second,
        second_value: b.to_string(),
    }
}
