//! What the evaluate stage records in `reports/evaluation.json`: every variant scored on
//! the test split, the paired comparisons, and the variants not run with why. The report
//! reads exactly this.

use serde::{Deserialize, Serialize};

use crate::bench::performance::Performance;
use crate::metrics::extraction::{Comparison, ScoreReport};

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
