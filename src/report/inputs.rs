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
use crate::metrics::stats::Summary;

/// `environment.json` (probe): the few fields the report shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EnvironmentMetrics {
    /// Device the model stages use (`cpu`, `cuda:0`).
    pub device: String,
    /// Why that device was chosen.
    pub device_reason: String,
    /// CPU model and threads.
    pub cpu: CpuInfo,
    /// Machine RAM.
    pub memory: MemoryInfo,
    /// GPUs NVML listed.
    pub gpu: GpuList,
    /// Backends compiled into the binary.
    pub backends_built: Vec<String>,
}

/// CPU of the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuInfo {
    pub model: String,
    /// Logical CPU threads.
    pub logical_threads: usize,
}

/// RAM of the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryInfo {
    /// Total RAM, bytes.
    pub total_bytes: u64,
}

/// GPUs seen by NVML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuList {
    /// One entry per GPU.
    pub gpus: Vec<GpuEntry>,
    /// NVIDIA driver version.
    pub driver_version: Option<String>,
    /// CUDA version the driver supports.
    pub cuda_version: Option<String>,
}

/// One GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuEntry {
    /// GPU name as NVML reports it.
    pub name: String,
    /// GPU memory, bytes.
    pub memory_total_bytes: u64,
}

/// `download.json`: the model and dataset files fetched or materialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DownloadMetrics {
    /// Model source as configured (`builtin:tiny`, `hf:Qwen/Qwen2.5-VL-7B-Instruct`).
    pub model_source: String,
    /// Resolved revision (commit sha) when the source has one.
    pub revision: Option<String>,
    /// Every file with its size and hash.
    pub files: Vec<DownloadedFile>,
    /// Sum of `files[].bytes`.
    pub total_bytes: u64,
}

/// One downloaded or materialized file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DownloadedFile {
    /// Path relative to the model or dataset directory.
    pub path: String,
    /// Size, bytes.
    pub bytes: u64,
    /// sha256 of the content, hex.
    pub sha256: String,
    /// Where it came from (`hf:...@rev`, `builtin:tiny seed 0`, a local path).
    pub source: String,
}

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
}

/// `baseline.json`: the unquantized base model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BaselineMetrics {
    /// Weight dtype (`bf16`, `f32`).
    pub dtype: String,
    #[serde(flatten)]
    pub performance: Performance,
}

/// `quantize.json`: the NF4 model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantizeMetrics {
    /// Bytes of the original weights of the quantized layers.
    pub original_bytes: Option<u64>,
    /// Bytes of the NF4 weights, absmax and double-quant constants of those layers.
    pub quantized_bytes: Option<u64>,
    /// Layers quantized.
    pub quantized_layers: Option<usize>,
    /// Mean |W − dequant(quant(W))| over all quantized weights.
    pub reconstruction_mean_abs_error: Option<f64>,
    /// ‖W − dequant(quant(W))‖_F / ‖W‖_F over all quantized weights.
    pub reconstruction_rel_frobenius_error: Option<f64>,
    /// Linear weights left dense because a skip entry matched (e.g. `lm_head`).
    pub skipped_layers: Option<usize>,
    /// Module names kept dense (`llm_int8_skip_modules`).
    pub skip_modules: Vec<String>,
    /// Tensors copied unchanged (embeddings, norms, biases, conv, skipped Linears).
    pub copied_tensors: Option<usize>,
    /// Bytes of every tensor of the input checkpoint.
    pub checkpoint_bytes_before: Option<u64>,
    /// Bytes of every tensor of the NF4 checkpoint.
    pub checkpoint_bytes_after: Option<u64>,
    /// `checkpoint_bytes_before / checkpoint_bytes_after`.
    pub compression_ratio: Option<f64>,
    /// `original_bytes / quantized_bytes` (the quantized layers alone).
    pub quantized_layers_compression_ratio: Option<f64>,
    /// Largest per-layer RMSE of `dequant(quant(W)) − W`.
    pub max_layer_rmse: Option<f64>,
    /// Largest `|dequant(quant(W)) − W|` over all layers.
    pub max_abs_error: Option<f64>,
    /// Seconds spent quantizing (conversion and NF4, not I/O).
    pub quantize_time_s: Option<f64>,
    /// Whole checkpoint conversion including I/O, s.
    pub quantize_elapsed_s: Option<f64>,
    /// Original bytes of the quantized layers per quantize second, MB/s (10^6 bytes).
    pub quantize_throughput_mb_per_s: Option<f64>,
    /// Process peak RSS right after quantizing (streams tensor by tensor), bytes.
    pub quantize_peak_rss_bytes: Option<u64>,
    /// Process RSS right after loading the NF4 model, bytes.
    pub memory_after_load_rss_bytes: Option<u64>,
    /// RSS growth from loading the NF4 model, bytes.
    pub load_rss_growth_bytes: Option<u64>,
    /// Where the NF4 checkpoint was written, workspace-relative.
    pub output_dir: Option<String>,
    /// One entry per quantized layer.
    pub per_layer: Vec<QuantizedLayer>,
    /// The same speed/memory figures for the unquantized base model, measured on the same
    /// prompts in the same run (so the two are comparable).
    pub base: Option<Performance>,
    /// Speed and memory of the NF4 model.
    #[serde(flatten)]
    pub performance: Performance,
}

/// Reconstruction figures of one quantized weight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantizedLayer {
    /// Checkpoint key of the weight.
    pub key: String,
    /// Weight shape `[out, in]`.
    pub shape: Vec<usize>,
    /// Bytes of the original weight.
    pub bytes_before: u64,
    /// Bytes of its NF4 tensors (codes, absmax, maps, blob).
    pub bytes_after: u64,
    /// RMSE of `dequant(quant(W)) − W`.
    pub rmse: f64,
    /// Largest `|dequant(quant(W)) − W|`.
    pub max_abs_error: f64,
    /// Mean `|dequant(quant(W)) − W|`.
    pub mean_abs_error: f64,
}

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

/// `training_metrics.json` (train): the QLoRA run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingMetrics {
    /// One entry per logged optimizer step.
    pub steps: Vec<TrainStep>,
    /// Validation loss at evaluation points.
    pub val: Vec<ValPoint>,
    /// Optimizer steps run.
    pub total_steps: Option<usize>,
    /// Passes over the training split.
    pub epochs: Option<f64>,
    /// Training throughput, tokens/s.
    pub tokens_per_s: Option<f64>,
    /// Peak device memory during training, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Wall time of training, s.
    pub train_time_s: Option<f64>,
    /// Trainable (LoRA) parameters.
    pub trainable_params: Option<u64>,
}

/// One logged training step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainStep {
    /// Optimizer step, from 1.
    pub step: usize,
    /// Mean cross-entropy over the step's answer tokens, nats.
    pub loss: f64,
    /// Learning rate used at this step.
    pub lr: Option<f64>,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: Option<f64>,
}

/// One validation point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValPoint {
    /// Optimizer step the validation ran after.
    pub step: usize,
    /// Mean cross-entropy over the validation answers, nats.
    pub loss: f64,
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
