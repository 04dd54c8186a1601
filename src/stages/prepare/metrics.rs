//! What the prepare stage records in `reports/dataset.json`: the contract downstream
//! stages and the report read (lenient: a figure an older artifact lacks reads as empty).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `dataset.json` metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrepareMetrics {
    /// Seed of the shuffle and the synthetic generator.
    pub seed: Option<u64>,
    /// Hash of the settings and dataset inputs the shards were built from.
    pub config_key: String,
    /// Per source name: what it offered, kept and dropped.
    pub sources: BTreeMap<String, SourceTally>,
    /// Samples over all splits.
    pub samples_total: usize,
    /// Per split (`train`, `val`, `test`): its file and counts.
    pub splits: BTreeMap<String, SplitFile>,
    /// The evaluation rows.
    pub eval: EvalRows,
    /// Render settings and throughput, as recorded.
    pub render: Value,
    /// Wall time of the stage, s.
    pub elapsed_s: f64,
}

/// One source's tally.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceTally {
    /// `synthetic`, `mtsamples`, `parquet`, ...
    pub kind: String,
    /// Records read.
    pub read: usize,
    /// Records kept.
    pub kept: usize,
    /// Dropped records per reason.
    pub dropped: BTreeMap<String, usize>,
}

/// One split file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SplitFile {
    /// Workspace-relative path of its JSONL.
    pub path: PathBuf,
    /// Samples.
    pub count: usize,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// Size, bytes.
    pub bytes: u64,
    /// Samples per source.
    pub by_source: BTreeMap<String, usize>,
    /// Samples per document type.
    pub by_doc_type: BTreeMap<String, usize>,
}

/// The evaluation rows file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalRows {
    /// Workspace-relative path.
    pub path: PathBuf,
    /// Rows.
    pub count: usize,
    /// Document type of each row, in order.
    pub doc_types: Vec<String>,
}
