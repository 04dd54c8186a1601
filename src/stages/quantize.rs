//! quantize: the downloaded model as an NF4 checkpoint, and base vs NF4 speed and memory.
//!
//! Writes `checkpoints/nf4/` exactly as transformers' `save_pretrained` writes a model loaded
//! with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=True, llm_int8_skip_modules=[...])` (see `crate::quant`), and
//! `reports/quantize.json` with the [`QuantizeMetrics`] layout the report reads: tensors
//! quantized/skipped, bytes before/after, compression, per-layer reconstruction error,
//! quantization time, memory after load, and latency/tokens per second of both models on
//! the same prompts with greedy decoding.
//!
//! Timing runs on `probe.device` (the probe's rule, `crate::device::resolve`): NdArray f32
//! on the CPU, burn's Cuda backend on a GPU in a `--features cuda` build. The NF4 forward
//! is `quant::Nf4Linear` on either; peak memory is RSS on the CPU and the allocator's pools
//! on a GPU.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::bench::memory::{rss_bytes, DeviceWatch, MemorySampler};
use crate::bench::performance::Performance;
use crate::device::{run_on_as, BackendJob, Device, DeviceMemory, Precision, Target};
use crate::kernels::Kernels;
use crate::metrics::stats::summarize_ms;
use crate::model::loader::{load_model, InputEncoder};
use crate::model::processor::ImageInput as ProcImage;
use crate::model::GenerateConfig;
use crate::pipeline::{Stage, StageCtx, StageOutput};
use crate::quant::{quantize_checkpoint, QuantizeOptions, QuantizeReport};

/// How often the memory sampler reads RSS while generating.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// `[quantize]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeConfig {
    /// Module names whose Linears stay dense (matched as whole dotted components).
    #[serde(default = "default_skip")]
    pub skip: Vec<String>,
    /// Prompts timed per model (each one greedy generation), documents.
    #[serde(default = "default_latency_prompts")]
    pub latency_prompts: usize,
    /// New tokens per timed generation, tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Untimed generations before the timed ones, per model.
    #[serde(default = "default_warmup_runs")]
    pub warmup_runs: usize,
}

fn default_skip() -> Vec<String> {
    vec!["lm_head".into()]
}
fn default_latency_prompts() -> usize {
    3
}
fn default_max_new_tokens() -> usize {
    8
}
fn default_warmup_runs() -> usize {
    1
}

impl crate::pipeline::SectionConfig for QuantizeConfig {
    /// Checks `[quantize]`.
    ///
    /// # Errors
    /// `latency_prompts` or `max_new_tokens` of 0, or an empty module name in `skip`.
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::{at_least_one, check};
        at_least_one("quantize.latency_prompts", self.latency_prompts as u64)?;
        at_least_one("quantize.max_new_tokens", self.max_new_tokens as u64)?;
        for (i, m) in self.skip.iter().enumerate() {
            check(
                !m.trim().is_empty(),
                &format!("quantize.skip[{i}]"),
                "\"\"",
                "must be a dotted module name such as lm_head",
            )?;
        }
        Ok(())
    }
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self {
            skip: default_skip(),
            latency_prompts: default_latency_prompts(),
            max_new_tokens: default_max_new_tokens(),
            warmup_runs: default_warmup_runs(),
        }
    }
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

/// The quantize stage.
pub struct Quantize;

impl Stage for Quantize {
    const NAME: &'static str = "quantize";
    type Config = QuantizeConfig;
    type Metrics = QuantizeMetrics;

    fn description(&self) -> &'static str {
        "NF4-quantize the model (bitsandbytes format); time base vs NF4"
    }
    fn artifact_file(&self) -> &'static str {
        "quantize.json"
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
        1
    }

    fn run(&self, cfg: &QuantizeConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let cfg = cfg.clone();
        // Workspace-relative when the model lives in the workspace (issue 15).
        let download = ctx.upstream_metrics::<super::download::Download>()?;
        let model_dir = super::download::model_dir(ctx, &download)?;
        let device = super::probe::device(ctx)?;
        let admitted = super::memory::ensure_fits(Self::NAME, ctx.settings(), &model_dir, device)?;
        let model = &admitted.model;
        let pixel_bounds = [model.min_pixels, model.max_pixels];
        let out_dir = ctx.workspace().checkpoints().join("nf4");
        let opts = QuantizeOptions {
            skip: cfg.skip.clone(),
            ..QuantizeOptions::default()
        };
        // NF4 packs a weight into 4 bits plus an 8-bit absmax per 64: about 1/4 of bf16 and 1/8
        // of f32. Half the base weights leaves room for the tensors kept unquantized
        // (`skip`, norms, biases) in any realistic checkpoint.
        let needed = safetensors_bytes(&model_dir)? / 2;
        crate::fs::space::ensure_free(
            &ctx.workspace().checkpoints(),
            needed,
            "the NF4 checkpoint (half the base weights)",
        )?;
        let report = quantize_checkpoint(&model_dir, &out_dir, &opts).with_context(|| {
            format!(
                "quantizing {} into {}",
                model_dir.display(),
                out_dir.display()
            )
        })?;
        let quantize_peak = rss_bytes().map(|(_, peak)| peak);
        tracing::info!(
            quantized = report.tensors_quantized,
            skipped = report.tensors_skipped,
            "NF4 checkpoint written"
        );

        let prompts = evaluation_prompts(&model_dir, cfg.latency_prompts)?;
        // NF4 first: its load-time RSS is then not masked by pages freed from the base model.
        let on = (device, admitted.precision);
        let nf4 =
            measure(on, &out_dir, &prompts, &cfg, pixel_bounds).context("timing the NF4 model")?;
        let mut warnings = Vec::new();
        let base = match admitted.optional_refusal() {
            None => Some(
                measure(on, &model_dir, &prompts, &cfg, pixel_bounds)
                    .context("timing the base model")?,
            ),
            Some(why) => {
                warnings.push(format!(
                    "the base model was not timed beside the NF4 one: it would not fit ({why}); \
                     metrics.base is null"
                ));
                None
            }
        };

        let mut metrics = metrics_of(&report, &cfg.skip);
        metrics.quantize_peak_rss_bytes = quantize_peak;
        metrics.memory_after_load_rss_bytes = nf4.rss_after_load;
        metrics.load_rss_growth_bytes = nf4.load_growth;
        metrics.output_dir = Some(
            ctx.workspace()
                .relative(&out_dir)
                .to_string_lossy()
                .into_owned(),
        );
        metrics.performance = nf4.performance;
        metrics.base = base.map(|b| b.performance);

        let mut summary = vec![
            (
                "layers quantized".into(),
                report.tensors_quantized.to_string(),
            ),
            (
                "compression".into(),
                metrics
                    .compression_ratio
                    .map_or("n/a".into(), |r| format!("{r:.2}x")),
            ),
        ];
        let tps = |p: &Option<Performance>| {
            p.as_ref()
                .and_then(|p| p.tokens_per_s)
                .map_or("n/a".into(), |t| format!("{t:.1} tok/s"))
        };
        summary.push(("nf4 decode".into(), tps(&Some(metrics.performance.clone()))));
        summary.push(("base decode".into(), tps(&metrics.base)));
        summary.push(("device".into(), device.to_string()));
        Ok(StageOutput {
            metrics: serde_json::to_value(&metrics).context("serializing quantize metrics")?,
            outputs: vec![out_dir],
            summary,
            warnings,
        })
    }
}

/// The artifact figures that come from the conversion itself.
fn metrics_of(report: &QuantizeReport, skip: &[String]) -> QuantizeMetrics {
    let quantized_bytes: u64 = report.per_tensor.iter().map(|t| t.bytes_after).sum();
    let numel = |shape: &[usize]| shape.iter().product::<usize>() as f64;
    let total: f64 = report.per_tensor.iter().map(|t| numel(&t.shape)).sum();
    let (mut abs, mut err_sq, mut w_sq) = (0f64, 0f64, 0f64);
    for t in &report.per_tensor {
        let n = numel(&t.shape);
        abs += t.mean_abs_err * n;
        err_sq += t.rmse * t.rmse * n;
        w_sq += t.weight_rms * t.weight_rms * n;
    }
    let (max_rmse, max_abs) = report.worst_errors();
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    let any = !report.per_tensor.is_empty();
    QuantizeMetrics {
        original_bytes: Some(report.quantized_input_bytes),
        quantized_bytes: Some(quantized_bytes),
        quantized_layers: Some(report.tensors_quantized),
        reconstruction_mean_abs_error: any.then(|| abs / total),
        reconstruction_rel_frobenius_error: (w_sq > 0.0).then(|| (err_sq / w_sq).sqrt()),
        skipped_layers: Some(report.tensors_skipped),
        skip_modules: skip.to_vec(),
        copied_tensors: Some(report.tensors_copied),
        checkpoint_bytes_before: Some(report.bytes_before),
        checkpoint_bytes_after: Some(report.bytes_after),
        compression_ratio: ratio(report.bytes_before, report.bytes_after),
        quantized_layers_compression_ratio: ratio(report.quantized_input_bytes, quantized_bytes),
        max_layer_rmse: any.then_some(max_rmse),
        max_abs_error: any.then_some(max_abs),
        quantize_time_s: Some(report.quantize_s),
        quantize_elapsed_s: Some(report.elapsed_s),
        quantize_throughput_mb_per_s: Some(report.throughput_mb_per_s()),
        per_layer: report
            .per_tensor
            .iter()
            .map(|t| QuantizedLayer {
                key: t.key.clone(),
                shape: t.shape.clone(),
                bytes_before: t.bytes_before,
                bytes_after: t.bytes_after,
                rmse: t.rmse,
                max_abs_error: t.max_abs_err,
                mean_abs_error: t.mean_abs_err,
            })
            .collect(),
        ..QuantizeMetrics::default()
    }
}

/// A timing prompt: the question and the page image.
struct Prompt {
    question: String,
    page: image::DynamicImage,
}

/// The first `n` (at least 1) of the five evaluation documents (`data/eval`, rendered as the
/// benchmark renders them), each with the extraction instruction: base and NF4 are timed on
/// the same real pages and prompts.
fn evaluation_prompts(_model_dir: &Path, n: usize) -> anyhow::Result<Vec<Prompt>> {
    let docs = crate::bench::inputs::evaluation_documents()
        .context("rendering the evaluation documents")?;
    Ok(docs
        .into_iter()
        .cycle()
        .take(n.max(1))
        .map(|d| Prompt {
            question: d.prompt,
            page: d.image,
        })
        .collect())
}

/// What timing one model gave.
struct Measured {
    performance: Performance,
    rss_after_load: Option<u64>,
    load_growth: Option<u64>,
}

/// [`measure_on`] on the backend of `device`.
fn measure(
    (device, precision): (Device, Precision),
    dir: &Path,
    prompts: &[Prompt],
    cfg: &QuantizeConfig,
    pixel_bounds: [Option<u64>; 2],
) -> anyhow::Result<Measured> {
    struct Job<'a> {
        dir: &'a Path,
        prompts: &'a [Prompt],
        cfg: &'a QuantizeConfig,
        pixel_bounds: [Option<u64>; 2],
    }
    impl BackendJob for Job<'_> {
        type Output = anyhow::Result<Measured>;
        fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output {
            measure_on::<B>(
                self.dir,
                self.prompts,
                self.cfg,
                self.pixel_bounds,
                &device,
                target,
            )
        }
    }
    run_on_as(
        device,
        precision,
        Job {
            dir,
            prompts,
            cfg,
            pixel_bounds,
        },
    )??
}

/// Loads the model in `dir`, then times greedy generation on every prompt.
fn measure_on<B: Kernels>(
    dir: &Path,
    prompts: &[Prompt],
    cfg: &QuantizeConfig,
    [min_pixels, max_pixels]: [Option<u64>; 2],
    dev: &B::Device,
    target: Target,
) -> anyhow::Result<Measured> {
    // A GPU's pools start from what this model needs, not the previous model's.
    B::memory_cleanup(dev);
    let mut watch = DeviceWatch::new(DeviceMemory::for_device(target.device));
    let rss_before = rss_bytes().map(|(now, _)| now);
    let loaded =
        load_model::<B>(dir, None, dev).with_context(|| format!("loading {}", dir.display()))?;
    let (model, load_time_s) = (loaded.model, loaded.load_ms / 1e3);
    let rss_after_load = rss_bytes().map(|(now, _)| now);
    watch.after_call();
    let encoder = InputEncoder::from_dir(dir)
        .and_then(|e| e.with_pixel_bounds(min_pixels, max_pixels))
        .with_context(|| {
            format!(
                "reading the tokenizer and image processor of {}",
                dir.display()
            )
        })?;
    let requests = prompts
        .iter()
        .map(|p| {
            let e = encoder
                .encode(&[ProcImage::Image(p.page.clone())], &p.question)
                .context("encoding a timing page and prompt")?;
            Ok(e.request::<B>(dev))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let gen_cfg = GenerateConfig {
        max_new_tokens: cfg.max_new_tokens,
        ..GenerateConfig::default()
    };
    let sampler = MemorySampler::start_with(MEMORY_SAMPLE_INTERVAL, watch.sampled());
    for r in requests.iter().cycle().take(cfg.warmup_runs) {
        model.generate(std::slice::from_ref(r), &gen_cfg, dev)?;
        watch.after_call();
    }
    let (mut latency, mut first, mut decode_ms, mut decode_tokens) =
        (Vec::new(), Vec::new(), 0f64, 0usize);
    for r in &requests {
        let t = Instant::now();
        let g = model.generate(std::slice::from_ref(r), &gen_cfg, dev)?;
        latency.push(t.elapsed().as_secs_f64() * 1e3);
        watch.after_call();
        if let Some(g) = g.first() {
            first.push(g.prefill_ms);
            decode_ms += g.decode_ms;
            // the first token comes out of the prefill
            decode_tokens += g.tokens.len().saturating_sub(1);
        }
    }
    let samples = sampler.finish();
    let peak = samples
        .iter()
        .map(|s| s.rss_bytes)
        .chain(rss_after_load)
        .max();
    let device_peak = samples.iter().filter_map(|s| s.device_used_bytes).max();
    let weights_bytes = safetensors_bytes(dir)?;
    Ok(Measured {
        performance: Performance {
            load_time_s: Some(load_time_s),
            weights_bytes: Some(weights_bytes),
            peak_memory_bytes: watch.peak_memory_bytes(device_peak, peak),
            latency_ms: summarize_ms(&latency).ok(),
            first_token_ms: summarize_ms(&first).ok(),
            tokens_per_s: (decode_ms > 0.0).then(|| decode_tokens as f64 / (decode_ms / 1e3)),
            documents: Some(requests.len()),
            warmup_runs: Some(cfg.warmup_runs),
            compute_dtype: Some(crate::device::compute_dtype::<B>(dev)),
            ..Performance::default()
        },
        rss_after_load,
        load_growth: rss_before
            .zip(rss_after_load)
            .map(|(b, a)| a.saturating_sub(b)),
    })
}

/// Bytes of the `.safetensors` files in `dir`.
fn safetensors_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?
                .len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture;

    #[test]
    fn metrics_aggregate_the_per_layer_errors_weighted_by_size() {
        let tmp = tempfile::tempdir().unwrap();
        let r = quantize_checkpoint(
            &fixture("qwen2_5_vl_tiny"),
            &tmp.path().join("nf4"),
            &QuantizeOptions::default(),
        )
        .unwrap();
        let m = metrics_of(&r, &["lm_head".into()]);
        assert_eq!(m.per_layer.len(), r.tensors_quantized);
        assert_eq!(m.skipped_layers, Some(1), "lm_head");
        let (worst_rmse, worst_abs) = r.worst_errors();
        assert_eq!(m.max_layer_rmse, Some(worst_rmse));
        assert_eq!(m.max_abs_error, Some(worst_abs));
        // a size-weighted mean lies between the smallest and largest layer means
        let means: Vec<f64> = m.per_layer.iter().map(|l| l.mean_abs_error).collect();
        let mean = m.reconstruction_mean_abs_error.unwrap();
        let lo = means.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = means.iter().copied().fold(0.0, f64::max);
        assert!(lo <= mean && mean <= hi, "{lo} <= {mean} <= {hi}");
        // NF4 with 64-blocks keeps relative error around 10%: far from 0 and from 1
        let rel = m.reconstruction_rel_frobenius_error.unwrap();
        assert!(rel > 0.01 && rel < 0.3, "{rel}");
        // every Linear but lm_head shrinks to about 1/7 (4.5 bits of 32); the checkpoint as
        // a whole keeps the dense lm_head and embeddings
        let layers = m.quantized_layers_compression_ratio.unwrap();
        assert!(layers > 5.0, "{layers}");
        let whole = m.compression_ratio.unwrap();
        assert!(whole > 1.0 && whole < layers, "{whole}");
        // and it round-trips through the report's reader
        let back: QuantizeMetrics =
            serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn timing_prompts_are_distinct_pages_with_a_question_each() {
        let p = evaluation_prompts(Path::new("."), 3).unwrap();
        assert_eq!(p.len(), 3);
        assert_ne!(p[0].page.as_bytes(), p[1].page.as_bytes());
        assert!(p.iter().all(|p| !p.question.is_empty()));
    }
}
