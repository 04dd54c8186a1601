//! Speed and memory of one model variant, as the baseline, quantize and evaluate stages
//! record it and the report compares it.

use serde::{Deserialize, Serialize};

use crate::metrics::stats::Summary;

/// Speed and memory of one model variant on the benchmark documents; the `baseline` stage
/// writes it for `base`, `quantize` for `nf4`, and `evaluate` for each variant it scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Performance {
    /// Time to load the weights onto the device, s.
    pub load_time_s: Option<f64>,
    /// Bytes of weights on disk.
    pub weights_bytes: Option<u64>,
    /// Peak memory during generation, bytes. From `evaluate`, the variant's own: on a GPU the
    /// allocator's peak over its load and run (pools emptied before it), on the CPU the larger
    /// of `weights_resident_bytes` and `rss_delta_bytes`. From `baseline`/`quantize`, the
    /// process peak (GPU memory on CUDA, RSS on CPU).
    pub peak_memory_bytes: Option<u64>,
    /// Bytes of the weights the loaded model holds (NF4 packed, dense, LoRA), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_resident_bytes: Option<u64>,
    /// Growth of the process RSS from before the variant's load to the peak of its load and
    /// run, bytes (memory freed by an earlier variant and reused is not growth, so this
    /// understates later variants; hence `peak_memory_bytes` takes the larger figure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_delta_bytes: Option<u64>,
    /// End-to-end latency per document (prefill + decode), ms.
    pub latency_ms: Option<Summary>,
    /// Time to first token per document, ms.
    pub first_token_ms: Option<Summary>,
    /// Generated tokens per second over all documents (decode only).
    pub tokens_per_s: Option<f64>,
    /// Documents timed.
    pub documents: Option<usize>,
    /// Warm-up runs excluded from the figures.
    pub warmup_runs: Option<usize>,
    /// The float the model computed in (`f32`, `f16`, `bf16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<String>,
}
