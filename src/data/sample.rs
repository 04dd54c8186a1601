//! A training/evaluation sample: one JSONL row of `data/splits/*.jsonl`.
//!
//! The target is the JSON the model must produce: a compact array of
//! `{"term","value","unit"}` objects in reading order, keys in that order, no whitespace.
//! The category stays in `ground_truth` (for per-category scoring) and out of the target, to
//! keep answers short.

use serde::{Deserialize, Serialize};

use super::document::Item;

/// The instruction every sample carries.
pub const PROMPT: &str = "Extract every medical term in this document with its value and unit. \
Answer only with a JSON array of objects with keys \"term\", \"value\", \"unit\" (empty string when there is no unit).";

/// One row of a split file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Unique across all sources: `<source>/<source-local id>`.
    pub id: String,
    /// The source's configured name.
    pub source: String,
    /// Document type (`lab_panel`, a medical specialty, `vqa`).
    pub doc_type: String,
    /// Image path, relative to the workspace.
    pub image: String,
    /// The instruction (or, for VQA sources, the question).
    pub prompt: String,
    /// The exact text the model must answer with.
    pub target: String,
    /// The items behind the target, with categories.
    pub ground_truth: Vec<Item>,
}

#[derive(Serialize)]
struct TargetItem<'a> {
    term: &'a str,
    value: &'a str,
    unit: &'a str,
}

/// The canonical compact target JSON for `items`.
pub fn target_json(items: &[Item]) -> String {
    let view: Vec<TargetItem<'_>> = items
        .iter()
        .map(|i| TargetItem {
            term: &i.term,
            value: &i.value,
            unit: &i.unit,
        })
        .collect();
    serde_json::to_string(&view).expect("strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_compact_with_keys_in_fixed_order() {
        let t = target_json(&[Item::new("Sodium", "138", "mmol/L", "lab")]);
        assert_eq!(t, r#"[{"term":"Sodium","value":"138","unit":"mmol/L"}]"#);
    }

    #[test]
    fn target_escapes_quotes_and_keeps_unicode() {
        let t = target_json(&[Item::new("Temp \"core\"", "37.2", "°C", "vital")]);
        assert_eq!(
            t,
            r#"[{"term":"Temp \"core\"","value":"37.2","unit":"°C"}]"#
        );
    }
}
