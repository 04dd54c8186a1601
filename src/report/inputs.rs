//! The `metrics` layouts the report reads from each stage artifact.
//!
//! These structs are the contract between the stages and the report: the download, baseline,
//! quantize, prepare, train and evaluate stages serialize exactly these as their artifact's
//! `metrics`, and the report deserializes them. Every field is lenient (`#[serde(default)]`,
//! `Option`), so an artifact that lacks an optional figure still reads, and the report
//! shows "n/a" for it. Units are in the field names (STYLE 15).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::extraction::{Comparison, ScoreReport};

pub use crate::bench::performance::Performance;
pub use crate::stages::baseline::BaselineMetrics;
pub use crate::stages::download::{DownloadMetrics, DownloadedFile};
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

/// `evaluation.json` (evaluate): every variant scored on the test split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaluationMetrics {
    /// Test documents scored (the same for every variant).
    pub test_documents: usize,
    /// Variants in evaluation order, named `base`, `nf4`, `nf4+adapter`.
    pub variants: Vec<VariantEvaluation>,
    /// Paired-bootstrap comparisons, e.g. `nf4+adapter` − `base` on `combined`.
    pub comparisons: Vec<Comparison>,
    /// Of `test_documents`, those from the test split.
    pub test_split_documents: usize,
    /// Of `test_documents`, the fixed evaluation documents (`data/eval/eval.jsonl`).
    pub eval_documents: usize,
    /// Generation settings every variant used.
    pub generation: Option<GenerationSettings>,
    /// Variants that were not scored, with the reason (disabled, upstream missing, failed).
    pub not_run: Vec<VariantNotRun>,
    /// Comparisons in `comparisons` where the candidate is worse than its baseline beyond the
    /// 95% interval (upper bound of candidate − baseline below zero).
    pub regressions: Vec<Comparison>,
}

/// How the evaluate stage generated answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationSettings {
    /// `greedy`.
    pub sampling: String,
    /// New tokens at most per answer.
    pub max_new_tokens: usize,
    /// Requests per `generate` call.
    pub batch_size: usize,
    /// Device the variants ran on (`cpu`).
    pub device: String,
}

/// A variant the evaluate stage did not score.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VariantNotRun {
    /// `base`, `nf4` or `nf4+adapter`.
    pub name: String,
    /// `not_run` (disabled or upstream absent) or `failed` (loading or generating failed).
    pub status: String,
    /// Why, in words (names the config key, stage or error).
    pub reason: String,
}

/// One variant's scores and performance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantEvaluation {
    /// `base`, `nf4` or `nf4+adapter`.
    pub name: String,
    /// Extraction scores overall, per document type and per source.
    pub scores: ScoreReport,
    #[serde(default)]
    pub performance: Performance,
    /// Resident memory right after loading the weights, bytes (CPU runs).
    #[serde(default)]
    pub rss_after_load_bytes: Option<u64>,
    /// Where the weights came from (workspace-relative or absolute directory).
    #[serde(default)]
    pub model_dir: Option<String>,
    /// The per-document predictions, JSONL, workspace-relative.
    #[serde(default)]
    pub predictions_path: Option<String>,
}
