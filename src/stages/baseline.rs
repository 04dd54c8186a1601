//! baseline: benchmarks the downloaded, unquantized model on the five evaluation documents
//! with the harness in `crate::bench`, so every later variant has numbers to beat.
//!
//! Writes `reports/baseline.json`, whose `metrics` are the report's
//! [`BaselineMetrics`] layout (dtype, load time,
//! weights size, peak memory, per-document latency and time-to-first-token summaries at the
//! smallest batch size, decode tokens/s) plus `bench`: the complete benchmark result
//! (`crate::bench::schema`). Beside it: `baseline.md` (results table) and the charts
//! `baseline_latency.{png,svg}`, `baseline_batch_sweep.{png,svg}`.
//!
//! Device: `probe.device` resolved by the probe's rule (`crate::device::resolve`): NdArray
//! on the CPU, burn's wgpu or Cuda backend on a GPU, computing in `model.dtype` (auto: f32
//! on the CPU, f16 on wgpu, bf16 on CUDA); the bench block records the device and dtype,
//! and on a GPU its memory (NVML and the allocator).

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bench::charts::write_charts;
use crate::bench::inputs::evaluation_documents;
use crate::bench::output::markdown_document;
use crate::bench::performance::Performance;
use crate::bench::schema::BenchResult;
use crate::bench::{run_bench_as, BenchOptions};
use crate::fs::write_atomic;
use crate::model::Sampling;
use crate::pipeline::{Stage, StageCtx, StageOutput};

/// `[baseline]` config section. Defaults keep the builtin:tiny pipeline fast.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaselineConfig {
    /// Warm-up calls per batch size (excluded from the figures).
    #[serde(default = "default_warmup")]
    pub warmup_runs: usize,
    /// Measured passes over the five documents per batch size (≥ 1).
    #[serde(default = "default_runs")]
    pub runs: usize,
    /// Batch sizes to sweep.
    #[serde(default = "default_batch_sizes")]
    pub batch_sizes: Vec<usize>,
    /// New tokens at most per request.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sequence-length axis of the batch × length grid (`max_new_tokens` values); empty: no grid.
    #[serde(default)]
    pub grid_max_new_tokens: Vec<usize>,
    /// Soak duration, s (0: none).
    #[serde(default)]
    pub soak_seconds: f64,
    /// Price of one device-hour for the cost per 1,000 requests; absent: no cost figure.
    #[serde(default)]
    pub price_per_device_hour: Option<f64>,
    /// Currency of the price.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Sampling instead of greedy decoding.
    #[serde(default)]
    pub do_sample: bool,
    /// Sampling temperature (with `do_sample`).
    #[serde(default = "one")]
    pub temperature: f32,
    /// Nucleus threshold (with `do_sample`).
    #[serde(default = "one")]
    pub top_p: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

fn default_warmup() -> usize {
    1
}
fn default_runs() -> usize {
    3
}
fn default_batch_sizes() -> Vec<usize> {
    vec![1, 2]
}
fn default_max_new_tokens() -> usize {
    32
}
fn default_currency() -> String {
    "USD".into()
}
fn one() -> f32 {
    1.0
}

impl crate::pipeline::SectionConfig for BaselineConfig {
    /// Checks `[baseline]` (the same rules `medpipe bench` applies to its flags).
    ///
    /// # Errors
    /// `runs`, `max_new_tokens`, a batch size or a grid length of 0; no batch size; a soak
    /// or price out of range; sampling with a temperature ≤ 0 or `top_p` outside (0, 1].
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::{at_least_one, check};
        at_least_one("baseline.runs", self.runs as u64)?;
        at_least_one("baseline.max_new_tokens", self.max_new_tokens as u64)?;
        check(
            !self.batch_sizes.is_empty() && !self.batch_sizes.contains(&0),
            "baseline.batch_sizes",
            format!("{:?}", self.batch_sizes),
            "must list at least one batch size, each at least 1",
        )?;
        check(
            !self.grid_max_new_tokens.contains(&0),
            "baseline.grid_max_new_tokens",
            format!("{:?}", self.grid_max_new_tokens),
            "each must be at least 1",
        )?;
        let max_soak = crate::bench::run::MAX_SOAK_SECONDS;
        check(
            self.soak_seconds.is_finite() && (0.0..=max_soak).contains(&self.soak_seconds),
            "baseline.soak_seconds",
            self.soak_seconds,
            &format!("must be in [0, {max_soak}]"),
        )?;
        if let Some(p) = self.price_per_device_hour {
            check(
                p.is_finite() && p >= 0.0,
                "baseline.price_per_device_hour",
                p,
                "must be at least 0",
            )?;
        }
        if self.do_sample {
            check(
                self.temperature.is_finite() && self.temperature > 0.0,
                "baseline.temperature",
                self.temperature,
                "must be greater than 0 when do_sample = true",
            )?;
            check(
                self.top_p > 0.0 && self.top_p <= 1.0,
                "baseline.top_p",
                self.top_p,
                "must be in (0, 1] when do_sample = true",
            )?;
        }
        Ok(())
    }
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            warmup_runs: default_warmup(),
            runs: default_runs(),
            batch_sizes: default_batch_sizes(),
            max_new_tokens: default_max_new_tokens(),
            grid_max_new_tokens: Vec::new(),
            soak_seconds: 0.0,
            price_per_device_hour: None,
            currency: default_currency(),
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl BaselineConfig {
    /// Harness options for `model_id` (revision when known).
    pub fn options(&self, model_id: &str, revision: Option<String>) -> BenchOptions {
        BenchOptions {
            model_id: model_id.to_string(),
            revision,
            warmup_runs: self.warmup_runs,
            runs: self.runs,
            batch_sizes: self.batch_sizes.clone(),
            max_new_tokens: self.max_new_tokens,
            grid_max_new_tokens: self.grid_max_new_tokens.clone(),
            soak_seconds: self.soak_seconds,
            price_per_device_hour: self.price_per_device_hour,
            currency: self.currency.clone(),
            sampling: if self.do_sample {
                Sampling::Sample {
                    temperature: self.temperature,
                    top_k: 0,
                    top_p: self.top_p,
                }
            } else {
                Sampling::Greedy
            },
            seed: self.seed,
            pixel_bounds: [None, None],
        }
    }
}

/// `baseline.json`: the unquantized base model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BaselineMetrics {
    /// The float the model computed in (`f32`, `f16`, `bf16`: `model.dtype` on the device).
    pub dtype: String,
    #[serde(flatten)]
    pub performance: Performance,
}

/// The baseline stage.
pub struct Baseline;

impl Stage for Baseline {
    const NAME: &'static str = "baseline";
    type Config = BaselineConfig;
    type Metrics = BaselineMetrics;

    fn description(&self) -> &'static str {
        "benchmark the unquantized model on the evaluation documents (load, memory, latency, tokens/s)"
    }
    fn artifact_file(&self) -> &'static str {
        "baseline.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe", "download"]
    }
    /// The image bounds change what a model stage measures; `[model] source` reaches it
    /// through the download stage, and `memory_limit_mib` only decides whether it runs.
    fn shared_sections(&self) -> &[&'static str] {
        &["model.max_pixels", "model.min_pixels", "model.dtype"]
    }
    fn code_version(&self) -> u32 {
        // 2: bench schema 2 (device and allocator memory); runs on the chosen device.
        2
    }

    fn run(&self, cfg: &BaselineConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let download = ctx.upstream_metrics::<super::download::Download>()?;
        // Workspace-relative when the model lives in the workspace (issue 15).
        let model_dir = super::download::model_dir(ctx, &download)?;
        let model_id = if download.model_source.is_empty() {
            "unknown".to_string()
        } else {
            download.model_source.clone()
        };
        let device = super::probe::device(ctx)?;
        let admitted = super::memory::ensure_fits(Self::NAME, ctx.settings(), &model_dir, device)?;
        let (memory_plan, model, precision) = (admitted.plan, admitted.model, admitted.precision);
        let mut opts = cfg.options(&model_id, download.model_revision.clone());
        opts.pixel_bounds = [model.min_pixels, model.max_pixels];
        let inputs = evaluation_documents()?;
        let result = run_bench_as(device, precision, &model_dir, &opts, &inputs)
            .with_context(|| format!("benchmarking {}", model_dir.display()))?;

        let reports = ctx.workspace().reports();
        let md = reports.join("baseline.md");
        write_atomic(&md, markdown_document(&result).as_bytes())?;
        let mut outputs = vec![md];
        outputs.extend(write_charts(&result, &reports.join("baseline"))?);

        let metrics = baseline_metrics(&result, inputs.len());
        let mut value = serde_json::to_value(&metrics)?;
        if let Value::Object(map) = &mut value {
            map.insert("bench".into(), serde_json::to_value(&result)?);
            // The planner's prediction, beside the measured peak (bench.memory).
            map.insert("memory_plan".into(), serde_json::to_value(&memory_plan)?);
        }
        Ok(StageOutput {
            metrics: value,
            outputs,
            summary: summary(&result),
            warnings: Vec::new(),
        })
    }
}

/// The report's layout, from the smallest batch size (one document per call at batch 1).
pub fn baseline_metrics(r: &BenchResult, documents: usize) -> BaselineMetrics {
    let first = r.batches.iter().min_by_key(|b| b.batch_size);
    let decode_tokens_per_s = first.and_then(|b| {
        let reqs = r.requests.iter().filter(|q| q.batch_size == b.batch_size);
        let (tokens, ms) = reqs.fold((0usize, 0.0f64), |(t, m), q| {
            (t + q.new_tokens.saturating_sub(1), m + q.decode_ms)
        });
        (ms > 0.0).then(|| tokens as f64 / (ms / 1e3))
    });
    BaselineMetrics {
        dtype: r.model.dtype.clone(),
        performance: Performance {
            load_time_s: Some(r.load.load_time_ms / 1e3),
            weights_bytes: Some(r.model.weights_bytes),
            // GPU: the allocator's pools, else NVML's device-wide peak; CPU: RSS.
            peak_memory_bytes: if r.device == "cpu" {
                r.memory.peak_rss_bytes
            } else {
                r.memory
                    .allocator_peak_reserved_bytes
                    .or(r.memory.device_peak_bytes)
            },
            latency_ms: first.map(|b| b.latency_ms.clone()),
            first_token_ms: first.map(|b| b.ttft_ms.clone()),
            tokens_per_s: decode_tokens_per_s,
            documents: Some(documents),
            warmup_runs: Some(r.settings.warmup_runs),
            compute_dtype: Some(r.model.dtype.clone()),
            ..Performance::default()
        },
    }
}

fn summary(r: &BenchResult) -> Vec<(String, String)> {
    let mut s = vec![("load".to_string(), format!("{:.1} ms", r.load.load_time_ms))];
    if let Some(b) = r.batches.first() {
        s.push((
            format!("latency (batch {})", b.batch_size),
            format!(
                "p50 {:.1} ms, p95 {:.1} ms",
                b.latency_ms.p50_ms, b.latency_ms.p95_ms
            ),
        ));
    }
    if let Some(b) = r.batches.iter().max_by(|x, y| {
        x.throughput_tokens_per_s
            .total_cmp(&y.throughput_tokens_per_s)
    }) {
        s.push((
            "best throughput".to_string(),
            format!(
                "{:.1} tokens/s at batch {}",
                b.throughput_tokens_per_s, b.batch_size
            ),
        ));
    }
    s.push(("device".to_string(), r.device.clone()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::schema::tests::crafted;

    #[test]
    fn metrics_follow_the_report_layout_and_read_back() {
        let r = crafted(40.0);
        let m = baseline_metrics(&r, 5);
        let v = serde_json::to_value(&m).unwrap();
        for key in [
            "dtype",
            "load_time_s",
            "latency_ms",
            "first_token_ms",
            "documents",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        let back: BaselineMetrics = serde_json::from_value(v).unwrap();
        assert_eq!(back.performance.latency_ms.unwrap().mean_ms, 40.0);
        assert_eq!(back.performance.load_time_s, Some(0.01));
    }

    #[test]
    fn default_config_is_small_and_greedy() {
        let c = BaselineConfig::default();
        let o = c.options("builtin:tiny", None);
        assert_eq!((o.runs, o.warmup_runs, o.max_new_tokens), (3, 1, 32));
        assert_eq!(o.batch_sizes, [1, 2]);
        assert_eq!(o.sampling, Sampling::Greedy);
        o.validate().unwrap();
    }
}
