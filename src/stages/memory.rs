//! What each model stage asks of memory, predicted before it loads anything
//! (`model::plan`) from the stage's settings and the model's `config.json`, and checked
//! against what the device has free (or `[model] memory_limit_mib`).
//!
//! A stage that will not fit refuses with the figures and the settings that would make it
//! fit, instead of running out of memory halfway. `medpipe plan` prints the same table.

use std::path::Path;

use anyhow::Context;

use serde::Serialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::device::{Device, Precision};
use crate::model::config::{HfConfig, Qwen25VlConfig};
use crate::model::plan::{self, Engine, Footprint, Generation, Stored, Training, WeightFormat};
use crate::model::processor::ImageProcessor;
use crate::pipeline::Settings;

use super::baseline::BaselineConfig;
use super::evaluate::EvaluateConfig;
use super::quantize::QuantizeConfig;
use super::train::TrainStageConfig;

/// The stages that load a model, in pipeline order.
pub const MODEL_STAGES: [&str; 4] = ["baseline", "quantize", "train", "evaluate"];

/// What the planner needs of a model directory: its config and the largest image its
/// processor makes.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub config: Qwen25VlConfig,
    /// Largest resized image, pixels (0: the model has no image processor).
    pub max_pixels: u64,
    /// How the checkpoint stores its dense tensors (`torch_dtype`).
    pub stored: Stored,
}

impl ModelFacts {
    /// Reads `dir/config.json` and, when present, `dir/preprocessor_config.json` with
    /// `[model]`'s pixel bounds laid over it. No weights are read.
    ///
    /// # Errors
    /// Either file missing or invalid, or pixel bounds that cross; naming the file.
    pub fn read(dir: &Path, model: &ModelConfig) -> anyhow::Result<Self> {
        let config = HfConfig::from_dir(dir)?.resolve()?;
        let proc_path = dir.join("preprocessor_config.json");
        let max_pixels = if proc_path.is_file() {
            ImageProcessor::from_config_file(&proc_path)
                .and_then(|p| p.with_pixel_bounds(model.min_pixels, model.max_pixels))
                .with_context(|| format!("image processor of {}", dir.display()))?
                .config()
                .max_pixels
        } else {
            0
        };
        Ok(Self {
            config,
            max_pixels,
            stored: stored_dtype(dir),
        })
    }
}

/// How a checkpoint stores its dense tensors, from its `config.json`'s `torch_dtype` (or
/// transformers 5's `dtype`): bf16 when it names none (the hub's Qwen2.5-VL releases).
pub fn stored_dtype(dir: &Path) -> Stored {
    let v = raw_config(dir);
    let dtype = ["torch_dtype", "dtype"].iter().find_map(|k| {
        v.get(k)
            .or_else(|| v.get("text_config").and_then(|t| t.get(k)))
            .and_then(Value::as_str)
    });
    match dtype {
        Some("float32") => Stored::F32,
        Some("float16") => Stored::F16,
        _ => Stored::Bf16,
    }
}

/// `dir/config.json` as plain JSON, for the keys the typed config does not keep
/// (`Null` when it does not read: the typed read has already reported why).
fn raw_config(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The settings of the model stages that drive memory, read from a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    pub max_pixels: u64,
    pub stored: Stored,
    pub baseline_batch: usize,
    pub baseline_new_tokens: usize,
    pub quantize_skip: Vec<String>,
    pub quantize_new_tokens: usize,
    pub train_batch: usize,
    pub train_seq_len: usize,
    pub train_r: usize,
    /// `train.recompute` as a segment length (`None`: none).
    pub train_recompute: Option<usize>,
    /// Data parallel peers on the busiest device of `train.devices` (1 without data
    /// parallelism): peers sharing a device (the CPU) each hold a model and its activations.
    pub train_peers_per_device: usize,
    pub evaluate_variants: Vec<&'static str>,
    pub evaluate_batch: usize,
    pub evaluate_new_tokens: usize,
}

impl Knobs {
    /// The stages' sections of `settings`, and the image bound of `facts`.
    ///
    /// # Errors
    /// A section that does not parse (the registry has already checked them on a run).
    pub fn read(settings: &Settings, facts: &ModelFacts) -> anyhow::Result<Self> {
        let b: BaselineConfig = settings.section("baseline")?;
        let q: QuantizeConfig = settings.section("quantize")?;
        let t: TrainStageConfig = settings.section("train")?;
        let e: EvaluateConfig = settings.section("evaluate")?;
        let variants = [("base", e.base), ("nf4", e.nf4), ("nf4+adapter", e.adapter)]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect();
        Ok(Self {
            max_pixels: facts.max_pixels,
            stored: facts.stored,
            baseline_batch: b.batch_sizes.iter().copied().max().unwrap_or(1),
            baseline_new_tokens: b
                .grid_max_new_tokens
                .iter()
                .copied()
                .chain([b.max_new_tokens])
                .max()
                .unwrap_or(b.max_new_tokens),
            quantize_skip: q.skip,
            quantize_new_tokens: q.max_new_tokens,
            train_batch: t.batch_size,
            train_seq_len: t.max_seq_len,
            train_r: t.r,
            train_recompute: t.recompute.segment_len(),
            train_peers_per_device: t
                .devices
                .iter()
                .map(|d| t.devices.iter().filter(|e| *e == d).count())
                .max()
                .unwrap_or(1),
            evaluate_variants: variants,
            evaluate_batch: e.batch_size,
            evaluate_new_tokens: e.max_new_tokens,
        })
    }
}

/// One model stage's predicted peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    pub stage: &'static str,
    /// The work behind the peak, in words.
    pub workload: String,
    #[serde(flatten)]
    pub footprint: Footprint,
    pub peak_bytes: u64,
    /// Peak of work the stage does only when it fits (quantize: timing the base model
    /// after the NF4 one); the stage itself needs only `peak_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optional_peak_bytes: Option<u64>,
}

/// The engine a stage's device runs the model on, computing in `precision` (the CPU always
/// computes in f32).
pub fn engine_for(device: Device, precision: Precision) -> Engine {
    match device {
        Device::Cpu => Engine::cpu(rayon::current_num_threads()),
        Device::Cuda(_) | Device::Wgpu => Engine::gpu(precision.dtype().size() as u64),
    }
}

/// The predicted peak of `stage` (`None` for a stage that loads no model).
pub fn stage_plan(
    stage: &str,
    cfg: &Qwen25VlConfig,
    k: &Knobs,
    engine: Engine,
) -> Option<StagePlan> {
    let nf4 = WeightFormat::Nf4 {
        skip: k.quantize_skip.clone(),
    };
    let gen = |batch: usize, new_tokens: usize| Generation {
        batch,
        text_tokens: plan::PROMPT_TEXT_TOKENS,
        image_pixels: k.max_pixels,
        new_tokens,
    };
    let images = if k.max_pixels > 0 {
        format!("images of {} px", k.max_pixels)
    } else {
        "text only".to_string()
    };
    let mut optional = None;
    let (stage, workload, footprint) = match stage {
        "baseline" => (
            "baseline",
            format!(
                "base model, batch {}, {images}, {} new tokens",
                k.baseline_batch, k.baseline_new_tokens
            ),
            plan::generation(
                cfg,
                &WeightFormat::Dense,
                k.stored,
                engine,
                gen(k.baseline_batch, k.baseline_new_tokens),
            ),
        ),
        "quantize" => {
            // The conversion streams tensor by tensor; the NF4 model's timing is the peak. The
            // base model's timing is optional: the stage skips it, with a warning, when it
            // would not fit (a 7B in f32 on a 24 GB machine), and still makes the checkpoint.
            let work = gen(1, k.quantize_new_tokens);
            let base = plan::generation(cfg, &WeightFormat::Dense, k.stored, engine, work);
            let q = plan::generation(cfg, &nf4, k.stored, engine, work);
            optional = Some(base.total());
            (
                "quantize",
                format!(
                    "NF4, batch 1, {images}, {} new tokens; then the base if it fits ({})",
                    k.quantize_new_tokens,
                    gib(base.total())
                ),
                q,
            )
        }
        "train" => (
            "train",
            format!(
                "QLoRA r {} on NF4, micro-batch {}, {} tokens, {images}{}{}",
                k.train_r,
                k.train_batch,
                k.train_seq_len,
                match k.train_recompute {
                    None => String::new(),
                    Some(1) => ", layers recomputed".into(),
                    Some(n) => format!(", recomputed in segments of {n} layers"),
                },
                match k.train_peers_per_device {
                    1 => String::new(),
                    n => format!(", {n} data parallel peers on one device"),
                }
            ),
            peers_on_one_device(
                plan::training(
                    cfg,
                    &k.quantize_skip,
                    k.stored,
                    Training {
                        micro_batch: k.train_batch,
                        seq_len: k.train_seq_len,
                        image_pixels: k.max_pixels,
                        lora_r: k.train_r,
                        recompute_every: k.train_recompute,
                    },
                ),
                k.train_peers_per_device,
            ),
        ),
        "evaluate" => {
            let work = gen(k.evaluate_batch, k.evaluate_new_tokens);
            let footprint = k
                .evaluate_variants
                .iter()
                .map(|v| {
                    let format = if *v == "base" {
                        WeightFormat::Dense
                    } else {
                        nf4.clone()
                    };
                    plan::generation(cfg, &format, k.stored, engine, work)
                })
                .reduce(larger)?;
            (
                "evaluate",
                format!(
                    "{}, one at a time, batch {}, {images}, {} new tokens",
                    k.evaluate_variants.join(", "),
                    k.evaluate_batch,
                    k.evaluate_new_tokens
                ),
                footprint,
            )
        }
        _ => return None,
    };
    Some(StagePlan {
        stage,
        workload,
        peak_bytes: footprint.total(),
        footprint,
        optional_peak_bytes: optional,
    })
}

/// The footprint of `peers` data parallel peers sharing one device: each loads the model and
/// runs its own micro-batches; AdamW lives on the first only.
fn peers_on_one_device(one: Footprint, peers: usize) -> Footprint {
    let n = peers.max(1) as u64;
    Footprint {
        weights: one.weights * n,
        kv_cache: one.kv_cache * n,
        activations: one.activations * n,
        optimizer: one.optimizer,
        loading: one.loading * n,
    }
}

fn larger(a: Footprint, b: Footprint) -> Footprint {
    if b.total() > a.total() {
        b
    } else {
        a
    }
}

/// The memory a stage may use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    /// Bytes, `None` when the device does not say (wgpu) and no limit is set.
    pub bytes: Option<u64>,
    /// Where the figure comes from.
    pub source: String,
}

/// `[model] memory_limit_mib`, or what `device` has free now.
pub fn budget(device: Device, model: &ModelConfig) -> Budget {
    if let Some(mib) = model.memory_limit_mib {
        return Budget {
            bytes: Some(mib << 20),
            source: "model.memory_limit_mib".into(),
        };
    }
    match device {
        Device::Cpu => {
            let mut sys = sysinfo::System::new();
            sys.refresh_memory();
            Budget {
                bytes: Some(sys.available_memory()),
                source: "available RAM".into(),
            }
        }
        Device::Cuda(_) => {
            let memory = crate::device::memory::DeviceMemory::for_device(device);
            match memory.free_bytes() {
                Some(free) => Budget {
                    bytes: Some(free),
                    source: format!("free memory of {device} (NVML)"),
                },
                None => Budget {
                    bytes: None,
                    source: format!(
                        "{device}: NVML gives no free memory ({}); set model.memory_limit_mib",
                        memory.note()
                    ),
                },
            }
        }
        Device::Wgpu => Budget {
            bytes: None,
            source: "wgpu does not report free memory; set model.memory_limit_mib".into(),
        },
    }
}

/// A stage predicted not to fit: its figures and the settings that would make it fit.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WontFit(String);

/// Checks `stage`'s prediction against `budget`, naming the settings that would make it fit.
///
/// # Errors
/// [`WontFit`] when the predicted peak exceeds the budget.
pub fn check(
    stage: &str,
    cfg: &Qwen25VlConfig,
    knobs: &Knobs,
    engine: Engine,
    budget: &Budget,
) -> Result<Option<StagePlan>, WontFit> {
    let Some(plan) = stage_plan(stage, cfg, knobs, engine) else {
        return Ok(None);
    };
    let Some(free) = budget.bytes else {
        return Ok(Some(plan));
    };
    if plan.peak_bytes <= free {
        return Ok(Some(plan));
    }
    let fixes = fixes(stage, cfg, knobs, engine, free);
    let advice = if fixes.is_empty() {
        "No single setting of this stage makes it fit: use a machine with more memory, or a \
         smaller model."
            .to_string()
    } else {
        format!("To fit, set one of: {}.", fixes.join("; "))
    };
    let f = &plan.footprint;
    Err(WontFit(format!(
        "{stage} will not fit in memory: predicted peak {} (weights {}, kv_cache {}, \
         activations {}, optimizer {}, loading {}) for {}, but {} ({}) is available. {advice}",
        gib(plan.peak_bytes),
        gib(f.weights),
        gib(f.kv_cache),
        gib(f.activations),
        gib(f.optimizer),
        gib(f.loading),
        plan.workload,
        gib(free),
        budget.source,
    )))
}

/// Single-setting changes that bring `stage` under `free`, each with its predicted peak.
fn fixes(stage: &str, cfg: &Qwen25VlConfig, k: &Knobs, engine: Engine, free: u64) -> Vec<String> {
    let peak = |k: &Knobs| stage_plan(stage, cfg, k, engine).map_or(0, |p| p.peak_bytes);
    let mut out = Vec::new();
    let mut try_knob = |name: &str, value: String, changed: Knobs| {
        let p = peak(&changed);
        if p <= free {
            let (value, note) = value.split_once(" (").unwrap_or((&value, ""));
            let note = note.trim_end_matches(')');
            let note = if note.is_empty() {
                String::new()
            } else {
                format!("; {note}")
            };
            out.push(format!("{name} = {value} (peak {}{note})", gib(p)));
        }
    };
    // The largest value that fits, halving from the current one down to `floor`.
    let halving = |from: u64, floor: u64, set: &dyn Fn(u64) -> Knobs| {
        std::iter::successors(Some(from / 2), |v| Some(v / 2))
            .take_while(|v| *v >= floor)
            .map(set)
            .find(|changed| peak(changed) <= free)
    };
    if k.max_pixels > 0 {
        let set = |px| Knobs {
            max_pixels: px,
            ..k.clone()
        };
        if let Some(changed) = halving(k.max_pixels, 3136, &set) {
            try_knob("model.max_pixels", changed.max_pixels.to_string(), changed);
        }
    }
    match stage {
        "baseline" if k.baseline_batch > 1 => try_knob(
            "baseline.batch_sizes",
            "[1]".into(),
            Knobs {
                baseline_batch: 1,
                ..k.clone()
            },
        ),
        "evaluate" => {
            if k.evaluate_batch > 1 {
                try_knob(
                    "evaluate.batch_size",
                    "1".into(),
                    Knobs {
                        evaluate_batch: 1,
                        ..k.clone()
                    },
                );
            }
            if k.evaluate_variants.contains(&"base") && k.evaluate_variants.len() > 1 {
                try_knob(
                    "evaluate.base",
                    "false (score the NF4 variants only)".into(),
                    Knobs {
                        evaluate_variants: k
                            .evaluate_variants
                            .iter()
                            .copied()
                            .filter(|v| *v != "base")
                            .collect(),
                        ..k.clone()
                    },
                );
            }
        }
        "train" => {
            if k.train_recompute != Some(1) {
                try_knob(
                    "train.recompute",
                    "\"layers\" (one more forward of the decoder per step)".into(),
                    Knobs {
                        train_recompute: Some(1),
                        ..k.clone()
                    },
                );
            }
            if k.train_batch > 1 {
                try_knob(
                    "train.batch_size",
                    "1 (raise train.grad_accum to keep the effective batch)".into(),
                    Knobs {
                        train_batch: 1,
                        ..k.clone()
                    },
                );
            }
            let set = |len| Knobs {
                train_seq_len: len as usize,
                ..k.clone()
            };
            if let Some(changed) = halving(k.train_seq_len as u64, 64, &set) {
                try_knob(
                    "train.max_seq_len",
                    changed.train_seq_len.to_string(),
                    changed,
                );
            }
        }
        _ => {}
    }
    out
}

/// `medpipe plan`: every model stage's prediction against the budget.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub model_dir: String,
    pub parameters: u64,
    pub device: String,
    /// The precision the stages compute in there (`model.dtype` on the device).
    pub dtype: String,
    /// Largest resized image the stages are planned for, pixels.
    pub max_pixels: u64,
    pub budget: Budget,
    pub stages: Vec<StageFit>,
}

/// One stage's prediction and whether it fits (`None`: the budget is unknown).
#[derive(Debug, Clone, Serialize)]
pub struct StageFit {
    #[serde(flatten)]
    pub plan: StagePlan,
    pub fits: Option<bool>,
}

impl PlanReport {
    /// Plans every model stage of `settings` for the model in `model_dir` on `device`.
    ///
    /// # Errors
    /// The model's config or a stage section does not read.
    pub fn new(settings: &Settings, model_dir: &Path, device: Device) -> anyhow::Result<Self> {
        let model: ModelConfig = settings.section("model")?;
        let facts = ModelFacts::read(model_dir, &model)?;
        let knobs = Knobs::read(settings, &facts)?;
        let precision = model.dtype.resolve(device).context("model.dtype")?;
        let engine = engine_for(device, precision);
        let budget = budget(device, &model);
        let stages = MODEL_STAGES
            .iter()
            .filter_map(|s| stage_plan(s, &facts.config, &knobs, engine))
            .map(|plan| StageFit {
                fits: budget.bytes.map(|b| plan.peak_bytes <= b),
                plan,
            })
            .collect();
        Ok(Self {
            model_dir: model_dir.display().to_string(),
            parameters: facts.config.parameter_count(),
            device: device.to_string(),
            dtype: precision.to_string(),
            max_pixels: facts.max_pixels,
            budget,
            stages,
        })
    }

    /// Whether no stage is known not to fit.
    pub fn all_fit(&self) -> bool {
        self.stages.iter().all(|s| s.fits != Some(false))
    }

    /// The table `medpipe plan` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "model {} ({:.1} M parameters), device {} ({}), images up to {} px\n\
             available: {} ({})\n\n",
            self.model_dir,
            self.parameters as f64 / 1e6,
            self.device,
            self.dtype,
            self.max_pixels,
            self.budget.bytes.map_or("unknown".into(), gib),
            self.budget.source,
        );
        out += &format!(
            "{:<9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  {:<13} workload\n",
            "stage", "weights", "kv_cache", "activations", "optimizer", "loading", "peak", "fits"
        );
        for s in &self.stages {
            let f = &s.plan.footprint;
            let fits = match s.fits {
                Some(true) => "fits",
                Some(false) => "DOES NOT FIT",
                None => "unknown",
            };
            out += &format!(
                "{:<9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  {:<13} {}\n",
                s.plan.stage,
                gib(f.weights),
                gib(f.kv_cache),
                gib(f.activations),
                gib(f.optimizer),
                gib(f.loading),
                gib(s.plan.peak_bytes),
                fits,
                s.plan.workload
            );
        }
        out
    }
}

/// The model directory `medpipe plan` reads: the workspace's downloaded model once the
/// download stage has run, else the config's source (`builtin:tiny` is materialized into
/// the cache; a local directory resolves against the workspace).
///
/// # Errors
/// A hub model that has not been downloaded yet, or a directory without `config.json`.
pub fn model_dir_for_plan(settings: &Settings, ws: &Path) -> anyhow::Result<std::path::PathBuf> {
    let model: ModelConfig = settings.section("model")?;
    let artifact = crate::pipeline::Artifact::read(&ws.join("reports/download.json"))?;
    if let Some(a) = artifact.filter(|a| a.status == crate::pipeline::Status::Completed) {
        let m: super::download::DownloadMetrics = serde_json::from_value(a.metrics)?;
        if m.model_source == model.source && !m.model_dir.is_empty() {
            return Ok(ws.join(m.model_dir));
        }
    }
    let source = model.source.trim();
    if source.starts_with("hf:") {
        anyhow::bail!(
            "{source} has not been downloaded into {} yet: run `medpipe run --to download` \
             (or pass --model DIR)",
            ws.display()
        );
    }
    let seed = settings
        .section::<super::download::DownloadConfig>("download")
        .map_or(0, |d| d.seed);
    let name = if source.starts_with("builtin:") {
        source.to_string()
    } else {
        ws.join(source).display().to_string()
    };
    Ok(crate::bench::source::resolve_model(&name, seed)?)
}

/// How the checkpoint in `dir` stores its Linears: NF4 when its `config.json` carries a
/// bitsandbytes 4-bit `quantization_config`, with that config's skip list.
pub fn stored_format(dir: &Path) -> WeightFormat {
    match raw_config(dir).get("quantization_config") {
        Some(q) if q.get("load_in_4bit").and_then(Value::as_bool) == Some(true) => {
            WeightFormat::Nf4 {
                skip: q
                    .get("llm_int8_skip_modules")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        }
        _ => WeightFormat::Dense,
    }
}

/// Bytes in GiB, or MiB below one GiB, with two decimals.
pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

/// What a model stage may do, from [`ensure_fits`].
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The stage's prediction (`None` for a stage that loads no model).
    pub plan: Option<StagePlan>,
    /// The `[model]` section the plan was made with.
    pub model: ModelConfig,
    /// `model.dtype` resolved for the device: what inference computes in.
    pub precision: Precision,
    pub budget: Budget,
}

impl Admitted {
    /// Why the stage's optional work ([`StagePlan::optional_peak_bytes`]) will not fit, if
    /// the budget is known and too small for it.
    pub fn optional_refusal(&self) -> Option<String> {
        let need = self.plan.as_ref()?.optional_peak_bytes?;
        let free = self.budget.bytes?;
        (need > free).then(|| {
            format!(
                "predicted peak {} but {} ({}) is available",
                gib(need),
                gib(free),
                self.budget.source
            )
        })
    }
}

/// What a model stage calls before loading: plan, check, and log the prediction.
///
/// # Errors
/// The model's config does not read, or the stage will not fit ([`WontFit`]).
pub fn ensure_fits(
    stage: &str,
    settings: &Settings,
    model_dir: &Path,
    device: Device,
) -> anyhow::Result<Admitted> {
    let model: ModelConfig = settings.section("model")?;
    let facts = ModelFacts::read(model_dir, &model)?;
    let knobs = Knobs::read(settings, &facts)?;
    let precision = model.dtype.resolve(device).context("model.dtype")?;
    let engine = engine_for(device, precision);
    let budget = budget(device, &model);
    let plan = check(stage, &facts.config, &knobs, engine, &budget)?;
    if let Some(p) = &plan {
        tracing::info!(stage, peak = %gib(p.peak_bytes), workload = %p.workload, "memory plan");
    }
    Ok(Admitted {
        plan,
        model,
        precision,
        budget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture;

    fn seven_b() -> (Qwen25VlConfig, Knobs) {
        let path = fixture("qwen2_5_vl_7b_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = HfConfig::from_json_str(&text, &path)
            .unwrap()
            .resolve()
            .unwrap();
        let settings = Settings::load(None, crate::config::DEFAULT_CONFIG, &[]).unwrap();
        let facts = ModelFacts {
            config: cfg.clone(),
            max_pixels: 1_003_520,
            stored: Stored::Bf16,
        };
        (cfg, Knobs::read(&settings, &facts).unwrap())
    }

    #[test]
    fn every_model_stage_has_a_plan_and_the_others_none() {
        let (cfg, k) = seven_b();
        for s in MODEL_STAGES {
            let p = stage_plan(s, &cfg, &k, Engine::gpu(4)).unwrap();
            assert_eq!(p.peak_bytes, p.footprint.total());
            assert!(p.footprint.weights > 0, "{s}");
        }
        for s in ["probe", "download", "prepare", "report"] {
            assert!(stage_plan(s, &cfg, &k, Engine::gpu(4)).is_none(), "{s}");
        }
    }

    #[test]
    fn data_parallel_peers_sharing_a_device_each_hold_a_model_and_activations() {
        let (cfg, k) = seven_b();
        let settings = |devices: &str| {
            let set = format!("train.devices={devices}");
            let s = Settings::load(None, crate::config::DEFAULT_CONFIG, &[set]).unwrap();
            let facts = ModelFacts {
                config: cfg.clone(),
                max_pixels: k.max_pixels,
                stored: k.stored,
            };
            Knobs::read(&s, &facts).unwrap()
        };
        let plan = |k: &Knobs| stage_plan("train", &cfg, k, Engine::gpu(2)).unwrap();
        let one = plan(&k);
        // One peer per device: each device's plan is the single-device one.
        let spread = plan(&settings(r#"["cuda:0", "cuda:1"]"#));
        assert_eq!(spread.peak_bytes, one.peak_bytes);
        // Two peers on one device: two models and two micro-batches' activations, one AdamW.
        let shared = plan(&settings(r#"["cpu", "cpu", "cpu"]"#));
        let (a, b) = (&one.footprint, &shared.footprint);
        assert_eq!(b.weights, 3 * a.weights);
        assert_eq!(b.activations, 3 * a.activations);
        assert_eq!(b.optimizer, a.optimizer);
        assert!(
            shared
                .workload
                .contains("3 data parallel peers on one device"),
            "{}",
            shared.workload
        );
    }

    #[test]
    fn a_gpu_in_half_precision_holds_the_7b_base_in_half_the_bytes_of_f32() {
        let (cfg, k) = seven_b();
        let weights = |precision| {
            stage_plan("baseline", &cfg, &k, engine_for(Device::Cuda(0), precision))
                .unwrap()
                .footprint
                .weights
        };
        let (bf16, f32) = (weights(Precision::Bf16), weights(Precision::F32));
        assert_eq!(bf16 * 2, f32);
        // 8.29 B parameters in bf16: the issue's 16.6 GB.
        assert!((16.4e9..16.8e9).contains(&(bf16 as f64)), "{bf16}");
        assert_eq!(weights(Precision::F16), bf16);
        // The CPU computes in f32 whatever the setting.
        let cpu = |p| engine_for(Device::Cpu, p);
        assert_eq!(cpu(Precision::F16), cpu(Precision::F32));
    }

    #[test]
    fn a_stage_over_budget_is_refused_naming_its_figures_and_the_settings_that_fit() {
        // On a GPU (no loading pages), so the activations decide.
        let (cfg, k) = seven_b();
        let need = stage_plan("evaluate", &cfg, &k, Engine::gpu(4))
            .unwrap()
            .peak_bytes;
        // Just under the need: a smaller batch or image bound fits.
        let budget = Budget {
            bytes: Some(need - need / 20),
            source: "model.memory_limit_mib".into(),
        };
        let err = check("evaluate", &cfg, &k, Engine::gpu(4), &budget)
            .unwrap_err()
            .to_string();
        for want in [
            "evaluate will not fit in memory",
            "weights",
            "kv_cache",
            "model.memory_limit_mib",
            "To fit, set one of:",
            "evaluate.base = false (peak",
            "model.max_pixels = ",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
        // Enough room passes, and an unknown budget is not checked.
        let roomy = Budget {
            bytes: Some(need),
            source: "test".into(),
        };
        assert!(check("evaluate", &cfg, &k, Engine::gpu(4), &roomy).is_ok());
        let unknown = Budget {
            bytes: None,
            source: "wgpu".into(),
        };
        assert!(check("evaluate", &cfg, &k, Engine::gpu(4), &unknown).is_ok());
    }

    #[test]
    fn training_over_budget_is_offered_a_shorter_sequence_and_a_smaller_micro_batch() {
        let (cfg, k) = seven_b();
        let need = stage_plan("train", &cfg, &k, Engine::cpu(2))
            .unwrap()
            .peak_bytes;
        let budget = Budget {
            bytes: Some(need * 3 / 4),
            source: "test".into(),
        };
        let err = check("train", &cfg, &k, Engine::cpu(2), &budget)
            .unwrap_err()
            .to_string();
        for want in [
            "train.max_seq_len = 256 (peak",
            "train.batch_size = 1 (peak",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
    }

    #[test]
    fn a_budget_below_the_weights_names_no_setting() {
        let (cfg, k) = seven_b();
        let budget = Budget {
            bytes: Some(1 << 30),
            source: "test".into(),
        };
        let err = check("baseline", &cfg, &k, Engine::cpu(2), &budget)
            .unwrap_err()
            .to_string();
        assert!(err.contains("No single setting"), "{err}");
    }
}
