//! The `metrics` layouts the report reads. Each producing stage owns its type (its
//! `Stage::Metrics`, beside its code); they are re-exported here so the report reads as one
//! list. Every field is lenient (`#[serde(default)]`, `Option`), so an artifact that lacks
//! an optional figure still reads, and the report shows "n/a" for it. Units are in the
//! field names (STYLE 15).
//!
//! [`DatasetMetrics`] is the report's own summary of prepare's metrics (and the layout of
//! hand-made artifacts); `report::build` derives it from `PrepareMetrics`.

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
