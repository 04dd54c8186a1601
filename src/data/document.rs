//! The document model every source produces and the renderer draws: a title, layout blocks
//! and the ground truth `{term, value, unit, category}` items.

use serde::{Deserialize, Serialize};

/// One thing a clinician needs from a document: a medical term with its value and unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The term as printed (`Sodium`, `Metoprolol tartrate`, `Heart rate`).
    pub term: String,
    /// The value as printed (`138`, `120/80`, `moderate`).
    pub value: String,
    /// The unit as printed, empty when the value has none (`mmol/L`, `mg`, ``).
    pub unit: String,
    /// `lab`, `medication`, `vital`, `score`, `measurement`, `finding` or `procedure`.
    pub category: String,
}

impl Item {
    /// Builds an item from string slices.
    pub fn new(term: &str, value: &str, unit: &str, category: &str) -> Self {
        Self {
            term: term.into(),
            value: value.into(),
            unit: unit.into(),
            category: category.into(),
        }
    }
}

/// The kinds of clinical document the synthetic generator and the evaluation set cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocType {
    MedicationReconciliation,
    IcuFlowsheet,
    CardiologyConsult,
    LabPanel,
    OperativeNote,
    DischargeSummary,
    RadiologyReport,
    PathologyReport,
}

impl DocType {
    /// Every type, in a fixed order (the generator cycles through it).
    pub const ALL: [DocType; 8] = [
        DocType::MedicationReconciliation,
        DocType::IcuFlowsheet,
        DocType::CardiologyConsult,
        DocType::LabPanel,
        DocType::OperativeNote,
        DocType::DischargeSummary,
        DocType::RadiologyReport,
        DocType::PathologyReport,
    ];

    /// The snake_case name used in sample rows and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DocType::MedicationReconciliation => "medication_reconciliation",
            DocType::IcuFlowsheet => "icu_flowsheet",
            DocType::CardiologyConsult => "cardiology_consult",
            DocType::LabPanel => "lab_panel",
            DocType::OperativeNote => "operative_note",
            DocType::DischargeSummary => "discharge_summary",
            DocType::RadiologyReport => "radiology_report",
            DocType::PathologyReport => "pathology_report",
        }
    }
}

/// How a document's facts are laid out on the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Facts in a ruled table.
    Table,
    /// Facts as labelled form fields, in two columns.
    Form,
    /// Facts inside running prose.
    Note,
}

/// A piece of a document's body, drawn top to bottom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Block {
    /// A section header, drawn bold.
    Heading(String),
    /// Running text, word-wrapped.
    Paragraph(String),
    /// `label: value` form fields, laid out in `columns` columns with underlined values.
    Fields {
        columns: usize,
        fields: Vec<(String, String)>,
    },
    /// A ruled table: a bold header row and body rows.
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
}

impl Block {
    /// The block's text, as plain lines.
    pub fn plain_text(&self) -> String {
        match self {
            Block::Heading(h) => h.clone(),
            Block::Paragraph(p) => p.clone(),
            Block::Fields { fields, .. } => fields
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("\n"),
            Block::Table { header, rows } => std::iter::once(header)
                .chain(rows)
                .map(|r| r.join(" | "))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A clinical document with its ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Unique within its source (`syn-000042`).
    pub id: String,
    /// Document type name (`lab_panel`; free-form for external sources).
    pub doc_type: String,
    /// Title line at the top of the page.
    pub title: String,
    /// Body, top to bottom.
    pub blocks: Vec<Block>,
    /// What the model must extract, in reading order.
    pub ground_truth: Vec<Item>,
}

impl Document {
    /// Title and blocks as plain text (one block per paragraph), for corpora and hashing.
    pub fn plain_text(&self) -> String {
        let mut out = self.title.clone();
        for b in &self.blocks {
            out.push_str("\n\n");
            out.push_str(&b.plain_text());
        }
        out
    }

    /// True when the document has no visible text besides its title.
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().all(|b| b.plain_text().trim().is_empty())
    }
}
