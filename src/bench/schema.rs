//! The benchmark result file (`medpipe bench --output FILE`, and the `bench` block of
//! `reports/baseline.json`): one JSON document, schema version [`SCHEMA_VERSION`].
//!
//! Layout (every key is always present; a figure that could not be measured is `null`,
//! never a made-up number; units are in the key names):
//!
//! - `schema_version`, `timestamp` (RFC 3339, UTC), `git_commit` (medpipe's build commit)
//! - `platform`: `os`, `os_version`, `kernel`, `arch`, `cpu_model`, `cpu_threads`,
//!   `memory_total_bytes`, `gpus[] {name, memory_total_bytes}`, `gpu_driver`, `cuda_version`
//! - `versions`: `medpipe`, `burn`, `backend`, `rustc`
//! - `device` (`cpu`, `cuda:0`)
//! - `model`: `id`, `dir`, `revision`, `dtype`, `quantization`, `adapter`, `parameters`,
//!   `weights_bytes`
//! - `generation`: `seed`, `do_sample`, `temperature`, `top_p`, `max_new_tokens`, `kv_cache`,
//!   `batch_sizes`
//! - `settings`: `warmup_runs`, `runs`, `inputs`, `grid_max_new_tokens`, `soak_seconds`,
//!   `price_per_device_hour`, `currency`
//! - `load`: `load_time_ms`, `rss_after_load_bytes`, `device_memory_before_load_bytes`,
//!   `device_memory_after_load_bytes`, `allocator_in_use_after_load_bytes`,
//!   `allocator_reserved_after_load_bytes`
//! - `memory`: `peak_rss_bytes` (process high-water mark), `peak_rss_during_runs_bytes`
//!   (sampled), `device_peak_bytes`, `allocator_peak_in_use_bytes`,
//!   `allocator_peak_reserved_bytes`, `samples`, `device_samples`, `device_memory_note`
//!
//! Device memory (GPU runs; `null` on the CPU, `device_memory_note` says why): `device_*` are
//! NVML's used memory of the whole GPU (every process and the driver's reservations: compare
//! with `device_memory_before_load_bytes`), sampled on a thread; `allocator_*` are cubecl's
//! memory manager for this process (live tensor bytes, pool bytes), read on the model's
//! thread after loading and after every generate call. Schema 1 files (without these keys)
//! still read, with the new keys `null`/0/empty.
//! - `batches[]`: per batch size, summaries (see [`BatchResult`]), throughput and cost
//! - `requests[]`: every measured request (see [`RequestRecord`])
//! - `grid[]`: batch size × sequence length cells
//! - `soak`: `null` unless a soak ran; else throughput windows and the memory slope

use serde::{Deserialize, Serialize};

use crate::bench::memory::MemSample;
use crate::metrics::stats::Summary;

/// Version of this layout; bumped on any incompatible change (2: device and allocator
/// memory keys in `load` and `memory`).
pub const SCHEMA_VERSION: u32 = 2;

/// One benchmark run, as written to JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchResult {
    pub schema_version: u32,
    /// When the benchmark finished, RFC 3339 UTC.
    pub timestamp: String,
    /// The commit medpipe was built from (`null` outside a git checkout).
    pub git_commit: Option<String>,
    pub platform: Platform,
    pub versions: Versions,
    /// Device the model ran on (`cpu`, `cuda:0`).
    pub device: String,
    pub model: ModelInfo,
    pub generation: GenerationSettings,
    pub settings: BenchSettingsRecord,
    pub load: LoadStats,
    pub memory: MemoryStats,
    /// One entry per batch size, in the order swept.
    pub batches: Vec<BatchResult>,
    /// Every measured (not warm-up) request.
    pub requests: Vec<RequestRecord>,
    /// Batch size × sequence length cells (empty when no grid was asked for).
    pub grid: Vec<GridCell>,
    /// Soak run, when asked for.
    pub soak: Option<SoakResult>,
}

/// The machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    /// OS name (`Ubuntu`, `macOS`).
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub kernel: Option<String>,
    /// CPU architecture (`x86_64`).
    pub arch: String,
    pub cpu_model: Option<String>,
    /// Logical CPU threads.
    pub cpu_threads: usize,
    /// Machine RAM, bytes.
    pub memory_total_bytes: u64,
    /// GPUs NVML lists (empty when there is none or no driver).
    pub gpus: Vec<GpuRecord>,
    /// NVIDIA driver version.
    pub gpu_driver: Option<String>,
    /// CUDA version the driver supports.
    pub cuda_version: Option<String>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuRecord {
    pub name: String,
    /// GPU memory, bytes.
    pub memory_total_bytes: u64,
}

/// Software versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Versions {
    pub medpipe: String,
    pub burn: String,
    /// burn backend the model ran on (`ndarray`, `cuda`).
    pub backend: String,
    /// rustc medpipe was built with.
    pub rustc: Option<String>,
}

/// The model variant measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Source as given (`builtin:tiny`, `hf:org/name`, a directory).
    pub id: String,
    /// Directory the weights were loaded from.
    pub dir: String,
    /// Hub commit, when known.
    pub revision: Option<String>,
    /// Compute dtype of the weights (`f32`, `bf16`).
    pub dtype: String,
    /// Weight quantization (`nf4`), `null` for none.
    pub quantization: Option<String>,
    /// LoRA adapter directory, `null` for none.
    pub adapter: Option<String>,
    /// Parameters in the config's tensor manifest.
    pub parameters: u64,
    /// Bytes of `*.safetensors` in `dir`.
    pub weights_bytes: u64,
}

/// How tokens were generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    pub seed: u64,
    /// `false`: greedy.
    pub do_sample: bool,
    /// Sampling temperature; `null` when greedy.
    pub temperature: Option<f32>,
    /// Nucleus threshold; `null` when greedy.
    pub top_p: Option<f32>,
    /// Top-k cut when sampling with one (absent otherwise, and in results written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// New tokens at most per request.
    pub max_new_tokens: usize,
    /// Whether decoding reuses a KV cache (always, in medpipe's generate).
    pub kv_cache: bool,
    /// Batch sizes swept.
    pub batch_sizes: Vec<usize>,
}

/// How the benchmark was run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSettingsRecord {
    /// Warm-up calls per batch size, excluded from every figure.
    pub warmup_runs: usize,
    /// Measured passes over the inputs per batch size.
    pub runs: usize,
    /// Names of the inputs, in order.
    pub inputs: Vec<String>,
    /// Sequence-length axis of the grid: `max_new_tokens` values.
    pub grid_max_new_tokens: Vec<usize>,
    /// Soak duration, s (0: no soak).
    pub soak_seconds: f64,
    /// Price of one device-hour used for the cost figures; `null`: no cost computed.
    pub price_per_device_hour: Option<f64>,
    /// Currency of the price.
    pub currency: String,
}

/// Loading the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadStats {
    /// Files on disk → model ready on the device, ms.
    pub load_time_ms: f64,
    /// Resident memory right after loading, bytes.
    pub rss_after_load_bytes: Option<u64>,
    /// GPU memory in use before loading (NVML, device-wide), bytes (`null` on CPU).
    #[serde(default)]
    pub device_memory_before_load_bytes: Option<u64>,
    /// GPU memory in use after loading (NVML, device-wide), bytes (`null` on CPU).
    pub device_memory_after_load_bytes: Option<u64>,
    /// Bytes of live tensors in the allocator after loading (`null` on CPU).
    #[serde(default)]
    pub allocator_in_use_after_load_bytes: Option<u64>,
    /// Bytes the allocator's pools hold after loading (`null` on CPU).
    #[serde(default)]
    pub allocator_reserved_after_load_bytes: Option<u64>,
}

/// Memory while running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryStats {
    /// Process resident-memory peak, bytes: the larger of `VmHWM` (includes loading) and
    /// the largest sample.
    pub peak_rss_bytes: Option<u64>,
    /// Largest RSS sampled during the measured runs, bytes.
    pub peak_rss_during_runs_bytes: Option<u64>,
    /// Peak GPU memory in use during the runs (NVML, device-wide, sampled), bytes (`null`
    /// on CPU or without NVML).
    pub device_peak_bytes: Option<u64>,
    /// Most live tensor bytes in the allocator after any generate call (`null` on CPU).
    #[serde(default)]
    pub allocator_peak_in_use_bytes: Option<u64>,
    /// Most bytes held by the allocator's pools after any generate call (`null` on CPU).
    #[serde(default)]
    pub allocator_peak_reserved_bytes: Option<u64>,
    /// RSS samples taken during the measured runs.
    pub samples: usize,
    /// Samples of those with a device-memory reading.
    #[serde(default)]
    pub device_samples: usize,
    /// Where the device figures come from, or why they are `null`.
    #[serde(default)]
    pub device_memory_note: String,
}

/// The figures of one batch size.
///
/// Latency summaries have one sample per `generate` call (a batch), because all requests of
/// a batch share its timings; counting them `batch_size` times would shrink the intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchResult {
    pub batch_size: usize,
    /// Measured `generate` calls.
    pub calls: usize,
    /// Measured requests (`calls × batch_size`).
    pub requests: usize,
    /// Prefill (vision tower + prompt + first token), per call, ms.
    pub prefill_ms: Summary,
    /// Remaining decode steps, per call, ms.
    pub decode_ms: Summary,
    /// Time to first token, per call, ms (= prefill: the first token comes out of it).
    pub ttft_ms: Summary,
    /// End-to-end latency, per call, ms.
    pub latency_ms: Summary,
    /// Mean new tokens per request.
    pub new_tokens_mean: f64,
    /// Prompt tokens per request (image tokens included), mean.
    pub prompt_tokens_mean: f64,
    /// Per-request generation speed, tokens/s (new tokens / request latency).
    pub tokens_per_s: RateSummary,
    /// All new tokens / all measured wall time, tokens/s.
    pub throughput_tokens_per_s: f64,
    /// Requests / measured wall time, requests/s.
    pub throughput_requests_per_s: f64,
    /// Device cost of 1,000 requests at this batch size, in `settings.currency`.
    pub cost_per_1k_requests: Option<f64>,
    /// Where a decode step's time goes, by kernel class (one recorded call; `None` when it
    /// made no decode step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_breakdown: Option<DecodeBreakdown>,
}

/// A decode step by kernel class, from one `generate` call recorded by
/// `kernels::profile` (the device waited for around every kernel call), and the bytes the
/// step's kernels read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeBreakdown {
    /// Decode steps recorded.
    pub steps: usize,
    /// A recorded step's wall time, ms: slower than `step_ms`, as nothing fuses or overlaps
    /// across kernel calls while recording.
    pub recorded_step_ms: f64,
    /// An unrecorded step's wall time (the measured calls' decode time over their steps), ms.
    pub step_ms: f64,
    /// One row per kernel class, in a fixed order.
    pub classes: Vec<KernelShare>,
    /// The recorded step's time outside kernel calls (embedding, residual adds, casts,
    /// and what a fused backend fuses between calls), ms.
    pub other_ms: f64,
    /// `other_ms` over `recorded_step_ms`.
    pub other_share: f64,
    /// Bytes the step's kernels read: weights, KV cache, activations.
    pub bytes_per_step: u64,
    /// `bytes_per_step` over `step_ms`, GB/s (1e9 bytes).
    pub effective_bandwidth_gb_s: f64,
    /// Whether the bandwidth figure means anything on this device.
    pub bandwidth_note: String,
}

/// One kernel class's part of a recorded decode step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelShare {
    /// `projections`, `attention`, `rms_norm`, `rotary`, `silu_mul` or `sampling` (argmax
    /// or sampling of the next tokens from the logits).
    pub class: String,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
    /// `ms_per_step` over the recorded step time.
    pub share: f64,
    pub bytes_per_step: u64,
}

/// Summary of a rate (tokens/s): the statistics of [`Summary`] without the ms unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSummary {
    pub n: usize,
    pub mean: f64,
    pub std: Option<f64>,
    pub min: f64,
    pub max: f64,
    pub ci95_low: Option<f64>,
    pub ci95_high: Option<f64>,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl From<Summary> for RateSummary {
    /// The same statistics; `summarize_ms` is unit-agnostic arithmetic.
    fn from(s: Summary) -> Self {
        RateSummary {
            n: s.n,
            mean: s.mean_ms,
            std: s.std_ms,
            min: s.min_ms,
            max: s.max_ms,
            ci95_low: s.ci95_low_ms,
            ci95_high: s.ci95_high_ms,
            p50: s.p50_ms,
            p95: s.p95_ms,
            p99: s.p99_ms,
        }
    }
}

/// One measured request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    pub batch_size: usize,
    /// Measured pass (0-based).
    pub run: usize,
    /// Input name.
    pub input: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub stopped_on_eos: bool,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// new tokens / total, tokens/s.
    pub tokens_per_s: f64,
}

/// One batch size × sequence length cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridCell {
    pub batch_size: usize,
    /// The sequence-length axis: new tokens at most.
    pub max_new_tokens: usize,
    /// End-to-end latency per call, ms.
    pub latency_ms: Summary,
    /// New tokens / wall time, tokens/s.
    pub throughput_tokens_per_s: f64,
}

/// A bounded soak run at batch size 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoakResult {
    /// Wall time actually run, s.
    pub duration_s: f64,
    pub requests: usize,
    /// Throughput per time window.
    pub windows: Vec<SoakWindow>,
    /// Least-squares RSS slope, bytes/s (a leak shows as a lasting positive slope).
    pub memory_growth_bytes_per_s: Option<f64>,
    /// The RSS curve.
    pub memory_samples: Vec<MemSample>,
}

/// Throughput in one soak window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoakWindow {
    /// Window end, s since the soak started.
    pub t_end_s: f64,
    pub requests: usize,
    pub tokens_per_s: f64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::stats::summarize_ms;

    /// A result with batch sizes 1 and 2 whose latencies are `mean - 1, mean, mean + 1` ms
    /// (mean ± 1 ms std), for tests of the renderers and `--compare`.
    pub(crate) fn crafted(mean: f64) -> BenchResult {
        let lat = summarize_ms(&[mean - 1.0, mean, mean + 1.0]).unwrap();
        let tps = summarize_ms(&[1000.0 / mean; 3]).unwrap();
        let batch = |b: usize| BatchResult {
            batch_size: b,
            calls: 3,
            requests: 3 * b,
            prefill_ms: lat.clone(),
            decode_ms: lat.clone(),
            ttft_ms: lat.clone(),
            latency_ms: lat.clone(),
            new_tokens_mean: 1.0,
            prompt_tokens_mean: 50.0,
            tokens_per_s: tps.clone().into(),
            throughput_tokens_per_s: b as f64 * 1000.0 / mean,
            throughput_requests_per_s: b as f64 * 1000.0 / mean,
            cost_per_1k_requests: Some(0.5),
            decode_breakdown: None,
        };
        BenchResult {
            schema_version: SCHEMA_VERSION,
            timestamp: "2026-01-01T00:00:00Z".into(),
            git_commit: Some("0123456789abcdef".into()),
            platform: Platform {
                os: Some("Linux".into()),
                os_version: Some("24.04".into()),
                kernel: Some("6.8".into()),
                arch: "x86_64".into(),
                cpu_model: Some("Test CPU".into()),
                cpu_threads: 2,
                memory_total_bytes: 1 << 30,
                gpus: vec![],
                gpu_driver: None,
                cuda_version: None,
            },
            versions: Versions {
                medpipe: "0.1.0".into(),
                burn: "0.21.0".into(),
                backend: "ndarray".into(),
                rustc: None,
            },
            device: "cpu".into(),
            model: ModelInfo {
                id: "builtin:tiny".into(),
                dir: "/tmp/tiny".into(),
                revision: None,
                dtype: "f32".into(),
                quantization: None,
                adapter: None,
                parameters: 1000,
                weights_bytes: 4000,
            },
            generation: GenerationSettings {
                seed: 0,
                do_sample: false,
                temperature: None,
                top_p: None,
                top_k: None,
                max_new_tokens: 8,
                kv_cache: true,
                batch_sizes: vec![1, 2],
            },
            settings: BenchSettingsRecord {
                warmup_runs: 1,
                runs: 3,
                inputs: vec!["lab_panel".into()],
                grid_max_new_tokens: vec![],
                soak_seconds: 0.0,
                price_per_device_hour: Some(1.0),
                currency: "USD".into(),
            },
            load: LoadStats {
                load_time_ms: 10.0,
                rss_after_load_bytes: Some(1 << 20),
                device_memory_before_load_bytes: None,
                device_memory_after_load_bytes: None,
                allocator_in_use_after_load_bytes: None,
                allocator_reserved_after_load_bytes: None,
            },
            memory: MemoryStats {
                peak_rss_bytes: Some(2 << 20),
                peak_rss_during_runs_bytes: Some(2 << 20),
                device_peak_bytes: None,
                allocator_peak_in_use_bytes: None,
                allocator_peak_reserved_bytes: None,
                samples: 5,
                device_samples: 0,
                device_memory_note: "cpu run: there is no device memory to measure".into(),
            },
            batches: vec![batch(1), batch(2)],
            requests: vec![],
            grid: vec![],
            soak: None,
        }
    }

    /// Writes `tests/data/bench/{a,b}.json` (crafted results for the `--compare` CLI test)
    /// when `MEDPIPE_WRITE_BENCH_FIXTURES` is set; otherwise checks they still parse.
    #[test]
    fn committed_compare_fixtures_match_the_schema() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench");
        if std::env::var_os("MEDPIPE_WRITE_BENCH_FIXTURES").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, mean) in [("a.json", 100.0), ("b.json", 120.0)] {
                let text = serde_json::to_string_pretty(&crafted(mean)).unwrap();
                std::fs::write(dir.join(name), text).unwrap();
            }
        }
        for (name, mean) in [("a.json", 100.0), ("b.json", 120.0)] {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let r: BenchResult = serde_json::from_str(&text).unwrap();
            // serde_json's float parsing may differ from the written value in the last ulp,
            // so the figures are compared, not the whole struct.
            let want = crafted(mean);
            assert_eq!(r.batches.len(), want.batches.len(), "{name}");
            assert_eq!(
                r.batches[0].latency_ms.mean_ms, mean,
                "{name} is stale: rerun with MEDPIPE_WRITE_BENCH_FIXTURES=1"
            );
        }
    }

    #[test]
    fn a_schema_1_file_without_the_device_memory_keys_still_reads() {
        let mut v = serde_json::to_value(crafted(50.0)).unwrap();
        v["schema_version"] = 1.into();
        for k in [
            "device_memory_before_load_bytes",
            "allocator_in_use_after_load_bytes",
            "allocator_reserved_after_load_bytes",
        ] {
            v["load"].as_object_mut().unwrap().remove(k).unwrap();
        }
        for k in [
            "allocator_peak_in_use_bytes",
            "allocator_peak_reserved_bytes",
            "device_samples",
            "device_memory_note",
        ] {
            v["memory"].as_object_mut().unwrap().remove(k).unwrap();
        }
        let r: BenchResult = serde_json::from_value(v).unwrap();
        assert_eq!(r.memory.device_memory_note, "");
        assert_eq!(r.load.allocator_in_use_after_load_bytes, None);
    }

    #[test]
    fn a_result_round_trips_through_json_and_unknown_keys_are_refused() {
        let r = crafted(50.0);
        let text = serde_json::to_string(&r).unwrap();
        let back: BenchResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<BenchResult>(v).is_err());
    }
}
