//! The `metrics` layouts the report reads from each stage artifact.
//!
//! These structs are the contract between the stages and the report: the download, baseline,
//! quantize, prepare, train and evaluate stages serialize exactly these as their artifact's
//! `metrics`, and the report deserializes them. Every field is lenient (`#[serde(default)]`,
//! `Option`), so an artifact that lacks an optional figure still reads, and the report
//! shows "n/a" for it. Units are in the field names (STYLE 15).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::bench::performance::Performance;
pub use crate::stages::baseline::BaselineMetrics;
pub use crate::stages::download::{DownloadMetrics, DownloadedFile};
pub use crate::stages::evaluate::metrics::{
    EvaluationMetrics, GenerationSettings, VariantEvaluation, VariantNotRun,
};
pub use crate::stages::probe::EnvironmentMetrics;
pub use crate::stages::quantize::{QuantizeMetrics, QuantizedLayer};
pub use crate::stages::train::{TrainStep, TrainingMetrics, ValPoint};

/// `dataset.json` (prepare): sources, filters, splits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetMetrics {
    /// Seed of the shuffle and the synthetic generator.
    pub seed: Option<u64>,
    /// Per source: what was offered, kept and dropped with reasons.
    pub sources: Vec<SourceStats>,
    /// Documents per split.
    pub splits: SplitSizes,
    /// Documents per type over all splits.
    pub doc_types: BTreeMap<String, usize>,
}

/// One dataset source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceStats {
    /// Source name (`synthetic`, `mtsamples`, `pathvqa`, `pubmedvision`).
    pub name: String,
    /// Records read from the source.
    pub offered: usize,
    /// Records kept.
    pub kept: usize,
    /// Dropped records per reason (`image does not decode`: 3).
    pub dropped: BTreeMap<String, usize>,
}

/// Split sizes, documents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SplitSizes {
    /// Training documents.
    pub train: usize,
    /// Validation documents.
    pub val: usize,
    /// Test documents.
    pub test: usize,
}
