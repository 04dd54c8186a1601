//! The five fixed evaluation documents, written by hand in `data/eval/*.json` and embedded
//! in the binary so every workspace evaluates on the same pages. They are rendered like the
//! training data but never enter a split.

use super::document::Document;
use super::DataError;

/// (file name, JSON text) of each evaluation document, in a fixed order.
const SOURCES: [(&str, &str); 5] = [
    (
        "medication_reconciliation.json",
        include_str!("../../data/eval/medication_reconciliation.json"),
    ),
    (
        "icu_flowsheet.json",
        include_str!("../../data/eval/icu_flowsheet.json"),
    ),
    (
        "cardiology_consult.json",
        include_str!("../../data/eval/cardiology_consult.json"),
    ),
    (
        "lab_panel.json",
        include_str!("../../data/eval/lab_panel.json"),
    ),
    (
        "operative_note.json",
        include_str!("../../data/eval/operative_note.json"),
    ),
];

/// The source name evaluation samples carry.
pub const SOURCE: &str = "eval";

/// Parses the embedded evaluation documents.
///
/// # Errors
/// A document that is not valid JSON for [`Document`] (a defect in `data/eval/`).
pub fn documents() -> Result<Vec<Document>, DataError> {
    SOURCES
        .iter()
        .map(|(name, text)| {
            serde_json::from_str(text).map_err(|source| DataError::EvalDoc {
                name: (*name).to_string(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_documents_parse_with_the_five_required_types() {
        let docs = documents().unwrap();
        let types: Vec<&str> = docs.iter().map(|d| d.doc_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "medication_reconciliation",
                "icu_flowsheet",
                "cardiology_consult",
                "lab_panel",
                "operative_note"
            ]
        );
    }

    #[test]
    fn every_ground_truth_item_is_printed_in_its_document() {
        for doc in documents().unwrap() {
            let text = doc.plain_text();
            for item in &doc.ground_truth {
                for part in [&item.term, &item.value, &item.unit] {
                    assert!(
                        text.contains(part.as_str()),
                        "{}: {part:?} not on the page",
                        doc.id
                    );
                }
            }
        }
    }

    #[test]
    fn evaluation_documents_render_at_the_default_size() {
        let cfg = crate::data::render::RenderConfig::default();
        for doc in documents().unwrap() {
            crate::data::render::render(&doc, &cfg, 0).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
