//! The measuring loop: load the model (timed), turn the evaluation documents into requests,
//! then per batch size run warm-up calls and `runs` measured passes of batched generation,
//! sampling resident memory throughout; optionally a batch × sequence-length grid and a
//! bounded soak run. Everything lands in a [`BenchResult`].
//!
//! On a GPU the device memory is measured too (`crate::device::DeviceMemory`): NVML's used
//! memory sampled beside RSS, and the allocator's figures read after loading and after every
//! generate call. [`run_bench_as`] runs the harness on the backend of a [`Device`].
//!
//! Timings per call come from [`Qwen25Vl::generate`] (prefill incl. vision tower and first
//! token, then decode); throughput divides new tokens by the wall time of the calls.
//! Image preprocessing and tokenization happen once, before timing (they are not model time).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::bench::inputs::{BenchInput, InputError};
use crate::bench::memory::{growth_bytes_per_s, rss_bytes, DeviceWatch, MemSample, MemorySampler};
use crate::bench::schema::*;
use crate::device::{BackendJob, Device, DeviceError, DeviceMemory, Target};
use crate::kernels::Kernels;
use crate::metrics::stats::{summarize_ms, StatsError};
use crate::model::loader::{load_model, InputEncoder, LoadError};
use crate::model::processor::{ImageInput as RawImage, ProcessorError};
use crate::model::prompt::PromptError;
use crate::model::{GenerateConfig, Generation, ModelError, Qwen25Vl, Request, Sampling};

/// RSS sampling period while measuring.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// A soak run reports throughput in this many windows (at least [`MIN_SOAK_WINDOW_S`] each).
const SOAK_WINDOWS: usize = 10;
/// Shortest soak window, s.
const MIN_SOAK_WINDOW_S: f64 = 0.25;
/// Longest soak run accepted, s (one day: the mode is bounded by design).
pub const MAX_SOAK_SECONDS: f64 = 86_400.0;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid benchmark setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    #[error(transparent)]
    Inputs(#[from] InputError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Precision(#[from] crate::device::PrecisionError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("training: {0}")]
    Train(#[from] crate::train::trainer::TrainError),
    #[error("summarizing {what}: {source}")]
    Stats {
        what: String,
        #[source]
        source: StatsError,
    },
}

/// What to measure and how.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Model id as the user gave it (recorded; loading uses the directory).
    pub model_id: String,
    /// Hub revision when known.
    pub revision: Option<String>,
    /// Warm-up calls per batch size (excluded).
    pub warmup_runs: usize,
    /// Measured passes over the inputs per batch size (≥ 1).
    pub runs: usize,
    /// Batch sizes to sweep (each ≥ 1).
    pub batch_sizes: Vec<usize>,
    /// New tokens at most per request (≥ 1).
    pub max_new_tokens: usize,
    /// Sequence-length axis of the grid (`max_new_tokens` values); empty: no grid.
    pub grid_max_new_tokens: Vec<usize>,
    /// Soak duration, s (0: none).
    pub soak_seconds: f64,
    /// Price of one device-hour for the cost figures.
    pub price_per_device_hour: Option<f64>,
    /// Currency of the price.
    pub currency: String,
    /// Decoding rule.
    pub sampling: Sampling,
    /// Sampling seed.
    pub seed: u64,
    /// The processor's resize bounds `[min_pixels, max_pixels]` (`None`: the model's).
    pub pixel_bounds: [Option<u64>; 2],
}

impl BenchOptions {
    /// Checks every setting, naming the bad one.
    ///
    /// # Errors
    /// [`BenchError::Invalid`].
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |name, reason: String| Err(BenchError::Invalid { name, reason });
        if self.runs == 0 {
            return bad("runs", "must be at least 1 (got 0)".into());
        }
        if self.batch_sizes.is_empty() {
            return bad("batch sizes", "at least one is needed".into());
        }
        if self.batch_sizes.contains(&0) || self.grid_max_new_tokens.contains(&0) {
            return bad(
                "batch sizes / grid",
                format!(
                    "every value must be at least 1 (got {:?} / {:?})",
                    self.batch_sizes, self.grid_max_new_tokens
                ),
            );
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1 (got 0)".into());
        }
        if !(self.soak_seconds.is_finite() && (0.0..=MAX_SOAK_SECONDS).contains(&self.soak_seconds))
        {
            return bad(
                "soak seconds",
                format!(
                    "must be in [0, {MAX_SOAK_SECONDS}] (got {})",
                    self.soak_seconds
                ),
            );
        }
        if let Some(p) = self.price_per_device_hour {
            if !(p.is_finite() && p >= 0.0) {
                return bad("price per device-hour", format!("must be ≥ 0 (got {p})"));
            }
        }
        if let Err(reason) = self.sampling.check() {
            return bad("sampling", reason);
        }
        Ok(())
    }
}

/// Parses a comma-separated list of positive integers (`1,2,4,8`).
///
/// # Errors
/// [`BenchError::Invalid`] naming `what` and the offending item.
pub fn parse_list(what: &'static str, text: &str) -> Result<Vec<usize>, BenchError> {
    let items: Vec<&str> = text.split(',').map(str::trim).collect();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item.parse::<usize>() {
            Ok(n) if n >= 1 => out.push(n),
            _ => {
                return Err(BenchError::Invalid {
                    name: what,
                    reason: format!(
                        "`{item}` in `{text}` is not a positive integer (expected e.g. 1,2,4,8)"
                    ),
                })
            }
        }
    }
    Ok(out)
}

/// One prepared input: its name and the request the model gets.
struct Prepared<B: Kernels> {
    name: String,
    request: Request<B>,
}

/// [`run_bench`] on the backend of `device` (NdArray for the CPU, wgpu or Cuda for a GPU),
/// computing in `precision` (`--dtype`, `model.dtype`).
///
/// # Errors
/// As [`run_bench`]; [`BenchError::Device`] for a GPU in a build without `--features cuda`;
/// a precision the device does not support.
pub fn run_bench_as(
    device: Device,
    precision: crate::device::Precision,
    model_dir: &Path,
    opts: &BenchOptions,
    inputs: &[BenchInput],
) -> Result<BenchResult, BenchError> {
    struct Job<'a> {
        model_dir: &'a Path,
        opts: &'a BenchOptions,
        inputs: &'a [BenchInput],
    }
    impl BackendJob for Job<'_> {
        type Output = Result<BenchResult, BenchError>;
        fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output {
            run_bench::<B>(self.model_dir, self.opts, self.inputs, &device, target)
        }
    }
    let job = Job {
        model_dir,
        opts,
        inputs,
    };
    crate::device::run_on_as(device, precision, job)??
}

/// Loads the model in `model_dir` on `device` and measures it on `inputs`.
///
/// `target` names the device (`cpu`, `cuda:0`) and backend (`ndarray`, `cuda`) recorded,
/// and which device memory to read.
///
/// # Errors
/// Invalid options, no inputs, model/prompt/processor errors, and non-finite timings.
pub fn run_bench<B: Kernels>(
    model_dir: &Path,
    opts: &BenchOptions,
    inputs: &[BenchInput],
    device: &B::Device,
    target: Target,
) -> Result<BenchResult, BenchError> {
    opts.validate()?;
    if inputs.is_empty() {
        return Err(BenchError::Invalid {
            name: "inputs",
            reason: "no benchmark inputs".into(),
        });
    }
    let mut watch = watch_device::<B>(device, target);
    let device_before_load = watch.memory().used_bytes();
    let loaded = load_model::<B>(model_dir, None, device)?;
    let (model, load_time_ms) = (loaded.model, loaded.load_ms);
    let rss_after_load = rss_bytes().map(|r| r.0);
    let device_after_load = watch.memory().used_bytes();
    let allocator_after_load = watch.memory().allocator();
    watch.after_call();
    tracing::info!(load_time_ms, "model loaded for benchmarking");

    let prepared = prepare(model_dir, inputs, opts.pixel_bounds, device)?;
    let gen_cfg = |max_new_tokens| GenerateConfig {
        max_new_tokens,
        sampling: opts.sampling.clone(),
        seed: opts.seed,
        eos_token_ids: None,
    };

    let sampler = MemorySampler::start_with(SAMPLE_EVERY, watch.sampled());
    let mut batches = Vec::new();
    let mut requests = Vec::new();
    for &b in &opts.batch_sizes {
        let cfg = gen_cfg(opts.max_new_tokens);
        for w in 0..opts.warmup_runs {
            generate(&model, &prepared, w * b, b, &cfg, device, &mut watch)?;
        }
        let calls_per_run = prepared.len().div_ceil(b);
        let mut calls = Vec::new();
        for run in 0..opts.runs {
            for c in 0..calls_per_run {
                let call = generate(&model, &prepared, c * b, b, &cfg, device, &mut watch)?;
                for (name, g) in &call.rows {
                    requests.push(record(b, run, name, g));
                }
                calls.push(call);
            }
        }
        let mut result = batch_result(b, &calls, opts)?;
        result.decode_breakdown = decode_breakdown(
            &model, &prepared, b, &cfg, &calls, device, &mut watch, target,
        )?;
        batches.push(result);
    }

    let mut grid = Vec::new();
    for &b in &opts.batch_sizes {
        for &n in &opts.grid_max_new_tokens {
            let cfg = gen_cfg(n);
            let calls = (0..opts.runs)
                .map(|r| generate(&model, &prepared, r * b, b, &cfg, device, &mut watch))
                .collect::<Result<Vec<_>, _>>()?;
            let lat: Vec<f64> = calls.iter().map(Call::latency_ms).collect();
            grid.push(GridCell {
                batch_size: b,
                max_new_tokens: n,
                latency_ms: summary(&format!("grid b={b} n={n} latency"), &lat)?,
                throughput_tokens_per_s: throughput(&calls),
            });
        }
    }
    let samples = sampler.finish();
    let sampled_peak = samples.iter().map(|s| s.rss_bytes).max();
    let device_peak = samples.iter().filter_map(|s| s.device_used_bytes).max();
    let device_samples = samples
        .iter()
        .filter(|s| s.device_used_bytes.is_some())
        .count();

    let soak = if opts.soak_seconds > 0.0 {
        Some(soak(
            &model,
            &prepared,
            &gen_cfg(opts.max_new_tokens),
            opts.soak_seconds,
            device,
            &mut watch,
        )?)
    } else {
        None
    };

    let gpu = crate::device::nvml::probe();
    Ok(BenchResult {
        schema_version: SCHEMA_VERSION,
        timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        git_commit: crate::build_info::git_commit(),
        platform: platform(&gpu),
        versions: Versions {
            medpipe: env!("CARGO_PKG_VERSION").to_string(),
            burn: BURN_VERSION.to_string(),
            backend: target.backend.to_string(),
            rustc: option_env!("MEDPIPE_RUSTC_VERSION")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        },
        device: target.device.to_string(),
        model: ModelInfo {
            id: opts.model_id.clone(),
            dir: model_dir.display().to_string(),
            revision: opts.revision.clone(),
            // The device's default float dtype: `--dtype` sets it, the backend type does not.
            dtype: crate::device::compute_dtype::<B>(device),
            quantization: quantization_of(model_dir),
            adapter: None,
            parameters: model.config().parameter_count(),
            weights_bytes: weights_bytes(model_dir),
        },
        generation: GenerationSettings {
            seed: opts.seed,
            do_sample: matches!(opts.sampling, Sampling::Sample { .. }),
            temperature: match opts.sampling {
                Sampling::Sample { temperature, .. } => Some(temperature),
                Sampling::Greedy => None,
            },
            top_p: match opts.sampling {
                Sampling::Sample { top_p, .. } => Some(top_p),
                Sampling::Greedy => None,
            },
            top_k: match opts.sampling {
                Sampling::Sample { top_k, .. } => (top_k > 0).then_some(top_k),
                Sampling::Greedy => None,
            },
            max_new_tokens: opts.max_new_tokens,
            kv_cache: true,
            batch_sizes: opts.batch_sizes.clone(),
        },
        settings: BenchSettingsRecord {
            warmup_runs: opts.warmup_runs,
            runs: opts.runs,
            inputs: inputs.iter().map(|i| i.name.clone()).collect(),
            grid_max_new_tokens: opts.grid_max_new_tokens.clone(),
            soak_seconds: opts.soak_seconds,
            price_per_device_hour: opts.price_per_device_hour,
            currency: opts.currency.clone(),
        },
        load: LoadStats {
            load_time_ms,
            rss_after_load_bytes: rss_after_load,
            device_memory_before_load_bytes: device_before_load,
            device_memory_after_load_bytes: device_after_load,
            allocator_in_use_after_load_bytes: allocator_after_load.map(|a| a.bytes_in_use),
            allocator_reserved_after_load_bytes: allocator_after_load.map(|a| a.bytes_reserved),
        },
        memory: MemoryStats {
            // The kernel updates VmHWM lazily, so a sample can exceed it: take the larger.
            peak_rss_bytes: rss_bytes().map(|r| r.1).max(sampled_peak),
            peak_rss_during_runs_bytes: sampled_peak,
            device_peak_bytes: device_peak,
            allocator_peak_in_use_bytes: watch.peak().map(|a| a.bytes_in_use),
            allocator_peak_reserved_bytes: watch.peak().map(|a| a.bytes_reserved),
            samples: samples.len(),
            device_samples,
            device_memory_note: watch.memory().note().to_string(),
        },
        batches,
        requests,
        grid,
        soak,
    })
}

/// The burn version medpipe pins (Cargo.toml `burn = "=0.21.0"`).
pub const BURN_VERSION: &str = "0.21.0";

/// Image preprocessing and prompt encoding of every input, once.
fn prepare<B: Kernels>(
    model_dir: &Path,
    inputs: &[BenchInput],
    [min_pixels, max_pixels]: [Option<u64>; 2],
    device: &B::Device,
) -> Result<Vec<Prepared<B>>, BenchError> {
    let encoder = InputEncoder::from_dir(model_dir)?.with_pixel_bounds(min_pixels, max_pixels)?;
    inputs
        .iter()
        .map(|input| {
            let e = encoder.encode(&[RawImage::Image(input.image.clone())], &input.prompt)?;
            Ok(Prepared {
                name: input.name.clone(),
                request: e.request(device),
            })
        })
        .collect()
}

/// One measured `generate` call.
struct Call {
    /// (input name, its generation) per row.
    rows: Vec<(String, Generation)>,
    /// Wall time of the call, ms.
    wall_ms: f64,
}

impl Call {
    fn prefill_ms(&self) -> f64 {
        self.rows.first().map_or(0.0, |r| r.1.prefill_ms)
    }
    fn decode_ms(&self) -> f64 {
        self.rows.first().map_or(0.0, |r| r.1.decode_ms)
    }
    fn latency_ms(&self) -> f64 {
        self.prefill_ms() + self.decode_ms()
    }
    fn new_tokens(&self) -> usize {
        self.rows.iter().map(|r| r.1.tokens.len()).sum()
    }
}

/// Generates for `b` inputs starting at `start` (wrapping around the inputs).
fn generate<B: Kernels>(
    model: &Qwen25Vl<B>,
    prepared: &[Prepared<B>],
    start: usize,
    b: usize,
    cfg: &GenerateConfig,
    device: &B::Device,
    watch: &mut DeviceWatch,
) -> Result<Call, BenchError> {
    let picked: Vec<&Prepared<B>> = (0..b)
        .map(|j| &prepared[(start + j) % prepared.len()])
        .collect();
    let reqs: Vec<Request<B>> = picked.iter().map(|p| p.request.clone()).collect();
    let batch = generate_batch(model, &reqs, cfg, device, watch)?;
    Ok(Call {
        rows: picked
            .iter()
            .map(|p| p.name.clone())
            .zip(batch.generations)
            .collect(),
        wall_ms: batch.wall_ms,
    })
}

/// Empties the backend's memory pools and starts watching the device, so the memory figures
/// that follow are this model's and not an earlier run's (a GPU's pools start from what this
/// model needs).
pub(crate) fn watch_device<B: Kernels>(device: &B::Device, target: Target) -> DeviceWatch {
    B::memory_cleanup(device);
    DeviceWatch::new(DeviceMemory::for_device(target.device))
}

/// One batch through [`Qwen25Vl::generate`]: the generations and the call's wall time.
pub(crate) struct TimedBatch {
    /// One per request, in request order.
    pub(crate) generations: Vec<Generation>,
    /// Wall time of the call, ms.
    pub(crate) wall_ms: f64,
}

/// Generates for one batch of `requests`, timed by the wall clock, then reads the device
/// allocator on this thread (cubecl keeps a pool per thread's stream): the step the benchmark
/// and the evaluate stage take for every batch, so both measure a call the same way.
///
/// # Errors
/// As [`Qwen25Vl::generate`].
pub(crate) fn generate_batch<B: Kernels>(
    model: &Qwen25Vl<B>,
    requests: &[Request<B>],
    cfg: &GenerateConfig,
    device: &B::Device,
    watch: &mut DeviceWatch,
) -> Result<TimedBatch, ModelError> {
    let t = Instant::now();
    let generations = model.generate(requests, cfg, device)?;
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    watch.after_call();
    Ok(TimedBatch {
        generations,
        wall_ms,
    })
}

fn record(b: usize, run: usize, name: &str, g: &Generation) -> RequestRecord {
    let total_ms = g.prefill_ms + g.decode_ms;
    RequestRecord {
        batch_size: b,
        run,
        input: name.to_string(),
        prompt_tokens: g.prompt_tokens,
        new_tokens: g.tokens.len(),
        stopped_on_eos: g.stopped_on_eos,
        prefill_ms: g.prefill_ms,
        decode_ms: g.decode_ms,
        ttft_ms: g.prefill_ms,
        total_ms,
        tokens_per_s: per_s(g.tokens.len() as f64, total_ms),
    }
}

/// `count` per second over `ms` milliseconds (0 when no time passed).
fn per_s(count: f64, ms: f64) -> f64 {
    if ms > 0.0 {
        count / (ms / 1e3)
    } else {
        0.0
    }
}

fn summary(what: &str, samples: &[f64]) -> Result<crate::metrics::stats::Summary, BenchError> {
    summarize_ms(samples).map_err(|source| BenchError::Stats {
        what: what.to_string(),
        source,
    })
}

/// New tokens over the calls' wall time, tokens/s.
fn throughput(calls: &[Call]) -> f64 {
    let tokens: usize = calls.iter().map(Call::new_tokens).sum();
    per_s(tokens as f64, calls.iter().map(|c| c.wall_ms).sum())
}

fn batch_result(b: usize, calls: &[Call], opts: &BenchOptions) -> Result<BatchResult, BenchError> {
    let col = |f: fn(&Call) -> f64| calls.iter().map(f).collect::<Vec<f64>>();
    let rows: Vec<&Generation> = calls
        .iter()
        .flat_map(|c| c.rows.iter().map(|r| &r.1))
        .collect();
    let n = rows.len().max(1) as f64;
    let tps: Vec<f64> = rows
        .iter()
        .map(|g| per_s(g.tokens.len() as f64, g.prefill_ms + g.decode_ms))
        .collect();
    let wall_ms: f64 = calls.iter().map(|c| c.wall_ms).sum();
    let requests = rows.len();
    let label = |m: &str| format!("batch size {b} {m}");
    Ok(BatchResult {
        batch_size: b,
        calls: calls.len(),
        requests,
        prefill_ms: summary(&label("prefill"), &col(Call::prefill_ms))?,
        decode_ms: summary(&label("decode"), &col(Call::decode_ms))?,
        ttft_ms: summary(&label("time to first token"), &col(Call::prefill_ms))?,
        latency_ms: summary(&label("latency"), &col(Call::latency_ms))?,
        new_tokens_mean: rows.iter().map(|g| g.tokens.len() as f64).sum::<f64>() / n,
        prompt_tokens_mean: rows.iter().map(|g| g.prompt_tokens as f64).sum::<f64>() / n,
        tokens_per_s: summary(&label("tokens/s"), &tps)?.into(),
        throughput_tokens_per_s: throughput(calls),
        throughput_requests_per_s: per_s(requests as f64, wall_ms),
        cost_per_1k_requests: opts
            .price_per_device_hour
            .map(|price| cost_per_1k(price, wall_ms, requests)),
        decode_breakdown: None,
    })
}

/// Decode steps of a call: every row steps until the longest is done (its first token
/// comes from the prefill).
fn decode_steps(call: &Call) -> usize {
    call.rows
        .iter()
        .map(|r| r.1.tokens.len())
        .max()
        .unwrap_or(0)
        .saturating_sub(1)
}

/// One more call at batch size `b`, recorded by [`crate::kernels::profile`]: its decode
/// steps by kernel class, beside the unrecorded step time of the measured `calls` (`None`
/// when no call made a decode step).
#[allow(clippy::too_many_arguments)]
fn decode_breakdown<B: Kernels>(
    model: &Qwen25Vl<B>,
    prepared: &[Prepared<B>],
    b: usize,
    cfg: &GenerateConfig,
    calls: &[Call],
    device: &B::Device,
    watch: &mut DeviceWatch,
    target: Target,
) -> Result<Option<DecodeBreakdown>, BenchError> {
    use crate::kernels::profile::{self, KernelClass};
    let measured_steps: usize = calls.iter().map(decode_steps).sum();
    let recording = profile::record();
    let call = generate(model, prepared, 0, b, cfg, device, watch)?;
    let totals = recording.take();
    drop(recording);
    let steps = decode_steps(&call);
    if steps == 0 || measured_steps == 0 {
        return Ok(None);
    }
    let n = steps as f64;
    let recorded_step_ms = call.decode_ms() / n;
    let step_ms = calls.iter().map(Call::decode_ms).sum::<f64>() / measured_steps as f64;
    let classes: Vec<KernelShare> = KernelClass::ALL
        .iter()
        .enumerate()
        .map(|(k, class)| {
            let ms = totals.seconds[k] * 1e3 / n;
            KernelShare {
                class: class.name().to_string(),
                calls_per_step: totals.calls[k] as f64 / n,
                ms_per_step: ms,
                share: ms / recorded_step_ms.max(1e-12),
                bytes_per_step: (totals.bytes[k] as f64 / n).round() as u64,
            }
        })
        .collect();
    let in_kernels: f64 = classes.iter().map(|c| c.ms_per_step).sum();
    let other_ms = (recorded_step_ms - in_kernels).max(0.0);
    let bytes_per_step: u64 = classes.iter().map(|c| c.bytes_per_step).sum();
    Ok(Some(DecodeBreakdown {
        steps,
        recorded_step_ms,
        step_ms,
        classes,
        other_ms,
        other_share: other_ms / recorded_step_ms.max(1e-12),
        bytes_per_step,
        effective_bandwidth_gb_s: bytes_per_step as f64 / (step_ms / 1e3).max(1e-12) / 1e9,
        bandwidth_note: bandwidth_note(target),
    }))
}

/// Whether bytes read per decode step over its time means anything on `target`: on a GPU it
/// is the figure to hold against the device's copy bandwidth.
fn bandwidth_note(target: Target) -> String {
    let software = || {
        let adapters = crate::device::wgpu::adapters();
        !adapters.is_empty() && adapters.iter().all(|a| a.software)
    };
    match target.device {
        Device::Cpu => "not meaningful on the CPU: the host kernels' time is compute and \
                        threading, not memory traffic"
            .into(),
        Device::Wgpu if software() => "not meaningful on a software adapter (lavapipe, \
                                       llvmpipe): it runs on the CPU"
            .into(),
        _ => "bytes the decode kernels read per step over the unrecorded step time: compare \
              with the device's measured copy bandwidth"
            .into(),
    }
}

/// Device cost of 1,000 requests: `price` per hour × hours per request × 1,000.
pub fn cost_per_1k(price_per_hour: f64, wall_ms: f64, requests: usize) -> f64 {
    if requests == 0 {
        return 0.0;
    }
    price_per_hour * (wall_ms / 3.6e6) / requests as f64 * 1e3
}

/// Batch-size-1 generation over the inputs, round robin, for `seconds`.
fn soak<B: Kernels>(
    model: &Qwen25Vl<B>,
    prepared: &[Prepared<B>],
    cfg: &GenerateConfig,
    seconds: f64,
    device: &B::Device,
    watch: &mut DeviceWatch,
) -> Result<SoakResult, BenchError> {
    let window_s = (seconds / SOAK_WINDOWS as f64).max(MIN_SOAK_WINDOW_S);
    let sampler = MemorySampler::start_with(
        SAMPLE_EVERY.max(Duration::from_secs_f64(window_s / 20.0)),
        watch.sampled(),
    );
    let start = Instant::now();
    let mut windows: Vec<SoakWindow> = Vec::new();
    let (mut w_requests, mut w_tokens, mut w_start) = (0usize, 0usize, 0.0f64);
    let mut total = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        let call = generate(model, prepared, total, 1, cfg, device, watch)?;
        total += 1;
        w_requests += 1;
        w_tokens += call.new_tokens();
        let now = start.elapsed().as_secs_f64();
        if now - w_start >= window_s {
            windows.push(SoakWindow {
                t_end_s: now,
                requests: w_requests,
                tokens_per_s: w_tokens as f64 / (now - w_start),
            });
            (w_requests, w_tokens, w_start) = (0, 0, now);
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    if w_requests > 0 && duration_s > w_start {
        windows.push(SoakWindow {
            t_end_s: duration_s,
            requests: w_requests,
            tokens_per_s: w_tokens as f64 / (duration_s - w_start),
        });
    }
    let memory_samples: Vec<MemSample> = sampler.finish();
    Ok(SoakResult {
        duration_s,
        requests: total,
        windows,
        memory_growth_bytes_per_s: growth_bytes_per_s(&memory_samples),
        memory_samples,
    })
}

/// The machine, from sysinfo and NVML.
fn platform(gpu: &crate::device::nvml::GpuProbe) -> Platform {
    use sysinfo::System;
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    Platform {
        os: System::name(),
        os_version: System::os_version(),
        kernel: System::kernel_version(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_model: sys.cpus().first().map(|c| c.brand().trim().to_string()),
        cpu_threads: sys.cpus().len(),
        memory_total_bytes: sys.total_memory(),
        gpus: gpu
            .gpus
            .iter()
            .map(|g| GpuRecord {
                name: g.name.clone(),
                memory_total_bytes: g.memory_total_bytes,
            })
            .collect(),
        gpu_driver: gpu.driver_version.clone(),
        cuda_version: gpu.cuda_version.clone(),
    }
}

/// The weight quantization a checkpoint declares in its config.json `quantization_config`:
/// `nf4`/`fp4` for bitsandbytes 4-bit (its `bnb_4bit_quant_type`), `int8` for its 8-bit,
/// else the `quant_method`;
/// `None` for a checkpoint without one (or an unreadable config, which loading reports).
pub(crate) fn quantization_of(model_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let q = cfg.get("quantization_config")?;
    let field = |k: &str| q.get(k).and_then(serde_json::Value::as_str);
    let method = field("quant_method");
    let label = match (method, field("bnb_4bit_quant_type")) {
        (Some("bitsandbytes") | None, _)
            if q.get("load_in_8bit").and_then(serde_json::Value::as_bool) == Some(true) =>
        {
            "int8"
        }
        (Some("bitsandbytes") | None, Some(kind)) => kind,
        (m, _) => m.unwrap_or("unknown"),
    };
    Some(label.to_string())
}

/// Bytes of `*.safetensors` directly in `dir` (0 where unreadable).
fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BenchOptions {
        BenchOptions {
            model_id: "x".into(),
            revision: None,
            warmup_runs: 0,
            runs: 1,
            batch_sizes: vec![1],
            max_new_tokens: 4,
            grid_max_new_tokens: vec![],
            soak_seconds: 0.0,
            price_per_device_hour: None,
            currency: "USD".into(),
            sampling: Sampling::Greedy,
            seed: 0,
            pixel_bounds: [None, None],
        }
    }

    #[test]
    fn lists_parse_and_bad_items_are_named() {
        assert_eq!(parse_list("batch sizes", "1,2, 4,8").unwrap(), [1, 2, 4, 8]);
        for bad in ["1;2", "0", "1,,2", "-1", "a", ""] {
            let err = parse_list("batch sizes", bad).unwrap_err().to_string();
            assert!(
                err.contains("batch sizes") && err.contains("positive integer"),
                "{err}"
            );
        }
    }

    #[test]
    fn zero_runs_and_bad_prices_are_rejected() {
        opts().validate().unwrap();
        let mut o = opts();
        o.runs = 0;
        assert!(o.validate().unwrap_err().to_string().contains("runs"));
        let mut o = opts();
        o.price_per_device_hour = Some(f64::NAN);
        assert!(o.validate().is_err());
        let mut o = opts();
        o.soak_seconds = -1.0;
        assert!(o.validate().is_err());
    }

    #[test]
    fn cost_of_a_thousand_requests_follows_the_device_hour_price() {
        // 10 requests in 36 s at 2.0/h: 1,000 requests take 3,600 s = 1 h = 2.0.
        assert!((cost_per_1k(2.0, 36_000.0, 10) - 2.0).abs() < 1e-12);
        assert_eq!(cost_per_1k(2.0, 1.0, 0), 0.0);
    }

    #[test]
    fn issue_15_an_nf4_checkpoint_is_labelled_nf4_and_a_dense_one_unquantized() {
        let fx = crate::test_util::fixture("qwen2_5_vl_tiny");
        assert_eq!(quantization_of(&fx.join("nf4")).as_deref(), Some("nf4"));
        assert_eq!(quantization_of(&fx), None);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("config.json"),
            r#"{"quantization_config": {"quant_method": "gptq", "bits": 4}}"#,
        )
        .unwrap();
        assert_eq!(quantization_of(tmp.path()).as_deref(), Some("gptq"));
    }
}
