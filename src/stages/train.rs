//! train: QLoRA — LoRA on the frozen NF4 base (the quantize stage's checkpoint) — fine-tune of the language model on the prepared train split (vision tower,
//! embeddings, norms, lm_head and the base projections frozen), validated on the val split.
//!
//! Writes `checkpoints/adapter/` in peft's format (the adapter of the best validation loss,
//! or the final one when no validation ran) and `reports/training_metrics.json`. The
//! trainer checkpoints under `checkpoints/train-state/`; a killed run resumes there on the
//! next `medpipe run` and reaches the same adapter. The directory records the inputs its
//! checkpoints came from (`inputs.sha256`); checkpoints of other inputs are discarded.
//!
//! Device: `probe.device` by the probe's rule (`crate::device::resolve`): autodiff over
//! NdArray f32 on the CPU, over burn's Cuda backend (f32) on a GPU in a `--features cuda`
//! build.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bench::memory::DeviceWatch;
use crate::data::sample::Sample;
use crate::device::{
    backend_device, run_autodiff_on_as, AutodiffJob, Device, DeviceMemory, Precision, Target,
};
use crate::fs::commit_dir;
use crate::kernels::{AutodiffKernels, Kernels};
use crate::model::lora::LoraSpec;
use crate::model::processor::{ImageInput as ProcImage, ImageProcessor};
use crate::model::prompt::PromptBuilder;
use crate::model::{ImageInput, Qwen25Vl};
use crate::pipeline::{Stage, StageCtx, StageOutput};
use crate::train::batch::{SampleError, SampleSource, TrainSample};
use crate::train::checkpoint::TrainState;
use crate::train::config::Recompute;
use crate::train::trainer::{train_parallel, Flow, Replica, TrainConfig, TrainEvent};

/// `[train]` config section. Defaults: the QLoRA recipe of the project brief.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainStageConfig {
    /// LoRA rank.
    pub r: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    pub lora_dropout: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of optimizer steps in linear warmup.
    pub warmup_ratio: f64,
    /// Passes over the train split.
    pub epochs: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 = off).
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of LoRA init, data order and dropout.
    pub seed: u64,
    /// Samples longer than this (tokens, image tokens included) are dropped and counted.
    pub max_seq_len: usize,
    /// Train on at most this many samples (0 = all).
    pub max_samples: usize,
    /// Checkpoint every N optimizer steps.
    pub checkpoint_every: u64,
    /// Validate every N optimizer steps (0 = only at epoch ends).
    pub eval_every: u64,
    /// Layer recomputation: `none`, `layers` or `every_n:K` (see [`Recompute`]). Trades a
    /// second forward of the decoder for the activations of all but K layers; the adapter
    /// is the same, so it is left out of the stage's input hash.
    pub recompute: Recompute,
    /// Data parallel devices, one backend: `["cuda:0", "cuda:1"]`, `["cpu", "cpu"]`, …
    /// Each runs `grad_accum` micro-batches per optimizer step (so a step takes
    /// `batch_size × grad_accum × devices` samples) and the gradients are summed with
    /// burn-collective. Empty: the probe's device alone.
    pub devices: Vec<String>,
    /// Read the loss back from the device every N optimizer steps (the progress bar's loss
    /// and `training_metrics.json` are filled then). Between reads the GPU is never left
    /// waiting for the host; the adapter does not depend on it.
    pub log_every: u64,
}

/// `[train]` settings that change how training runs, not the adapter it produces (its
/// gradients agree to rounding): left out of the stage's input hash and the checkpoints'
/// fingerprint, so changing one neither makes the stage stale nor discards checkpoints.
const OUTPUT_NEUTRAL: [&str; 2] = ["recompute", "log_every"];

impl TrainStageConfig {
    /// The devices to train on: `devices`, or `probe` when it is empty.
    ///
    /// # Errors
    /// A name that is not a device (checked by `validate` first).
    pub fn device_list(&self, probe: Device) -> anyhow::Result<Vec<Device>> {
        if self.devices.is_empty() {
            return Ok(vec![probe]);
        }
        self.devices
            .iter()
            .map(|d| Device::parse(d).with_context(|| "train.devices"))
            .collect()
    }
}

impl crate::pipeline::SectionConfig for TrainStageConfig {
    /// Checks `[train]` before anything runs (a rank of 0 or a dropout of 1.5 used to panic
    /// inside the trainer, issue 15).
    ///
    /// # Errors
    /// The first hyper-parameter outside its range.
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::{at_least_one, check, fraction};
        at_least_one("train.r", self.r as u64)?;
        check(
            self.lora_alpha.is_finite() && self.lora_alpha > 0.0,
            "train.lora_alpha",
            self.lora_alpha,
            "must be greater than 0",
        )?;
        check(
            (0.0..1.0).contains(&self.lora_dropout),
            "train.lora_dropout",
            self.lora_dropout,
            "must be in [0, 1)",
        )?;
        check(
            self.lr.is_finite() && self.lr > 0.0,
            "train.lr",
            self.lr,
            "must be greater than 0",
        )?;
        fraction("train.warmup_ratio", self.warmup_ratio)?;
        at_least_one("train.epochs", self.epochs as u64)?;
        at_least_one("train.batch_size", self.batch_size as u64)?;
        at_least_one("train.grad_accum", self.grad_accum as u64)?;
        at_least_one("train.log_every", self.log_every)?;
        at_least_one("train.max_seq_len", self.max_seq_len as u64)?;
        check(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "train.max_grad_norm",
            self.max_grad_norm,
            "must be at least 0 (0 = no clipping)",
        )?;
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "train.weight_decay",
            self.weight_decay,
            "must be at least 0",
        )?;
        let mut kinds = Vec::new();
        for d in &self.devices {
            let parsed = Device::parse(d).ok();
            check(
                parsed.is_some(),
                "train.devices",
                format!("{d:?}"),
                "must name a device: cpu, wgpu, cuda or cuda:N; auto is not allowed here",
            )?;
            kinds.extend(parsed.map(|p| std::mem::discriminant(&p)));
        }
        kinds.dedup();
        check(
            kinds.len() <= 1,
            "train.devices",
            format!("{:?}", self.devices),
            "must all be devices of one backend: all cpu, all wgpu or all cuda:N",
        )
    }
}

impl Default for TrainStageConfig {
    fn default() -> Self {
        Self {
            r: 64,
            lora_alpha: 128.0,
            lora_dropout: 0.05,
            lr: 2e-4,
            warmup_ratio: 0.03,
            epochs: 2,
            batch_size: 4,
            grad_accum: 4,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 42,
            max_seq_len: 512,
            max_samples: 0,
            checkpoint_every: 10,
            eval_every: 0,
            recompute: Recompute::None,
            devices: Vec::new(),
            log_every: 10,
        }
    }
}

/// `training_metrics.json` (train): the QLoRA run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingMetrics {
    /// The adapter to ship, workspace-relative (`checkpoints/adapter`).
    pub adapter_dir: Option<String>,
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
    /// The loss scale of an f16 run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Skipped: its f16 gradients overflowed at that scale (`grad_norm` is then null).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
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

/// The train stage.
pub struct Train;

impl Stage for Train {
    const NAME: &'static str = "train";
    type Config = TrainStageConfig;
    type Metrics = TrainingMetrics;

    fn description(&self) -> &'static str {
        "LoRA fine-tune of the language model on the train split (vision frozen), resumable; peft adapter"
    }
    fn artifact_file(&self) -> &'static str {
        "training_metrics.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe", "download", "quantize", "prepare"]
    }
    /// The image bounds change what a model stage measures; `[model] source` reaches it
    /// through the download stage, and `memory_limit_mib` only decides whether it runs.
    fn shared_sections(&self) -> &[&'static str] {
        &["model.max_pixels", "model.min_pixels", "model.dtype"]
    }
    /// The [`OUTPUT_NEUTRAL`] settings change the time and memory of training, not the
    /// adapter, so changing one does not make the stage stale.
    fn resolve_config(
        &self,
        mut sections: serde_json::Value,
        _settings: &crate::pipeline::Settings,
        _ws: &crate::pipeline::Workspace,
    ) -> serde_json::Value {
        if let Some(train) = sections.get_mut("train").and_then(|t| t.as_object_mut()) {
            for key in OUTPUT_NEUTRAL {
                train.remove(key);
            }
        }
        sections
    }
    /// 2: LoRA dropout masks are seeded per (micro-batch, site), not drawn in layer order,
    /// so the same inputs train another adapter than version 1 did.
    fn code_version(&self) -> u32 {
        2
    }

    fn run(&self, cfg: &TrainStageConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let cfg = cfg.clone();
        // Workspace-relative when the model lives in the workspace (issue 15).
        let download = ctx.upstream_metrics::<super::download::Download>()?;
        let model_dir = super::download::model_dir(ctx, &download)?;
        let devices = cfg.device_list(super::probe::device(ctx)?)?;
        let admitted =
            super::memory::ensure_fits(Self::NAME, ctx.settings(), &model_dir, devices[0])?;
        let (memory_plan, model, precision) = (admitted.plan, admitted.model, admitted.precision);
        let root = ctx.workspace().root().to_path_buf();
        // QLoRA: the frozen base is the quantize stage's NF4 checkpoint.
        let quantized = ctx.upstream_metrics::<super::quantize::Quantize>()?;
        let nf4_dir = root.join(
            quantized
                .output_dir
                .as_deref()
                .context("quantize artifact has no metrics.output_dir")?,
        );

        let processor =
            ImageProcessor::from_config_file(model_dir.join("preprocessor_config.json"))
                .and_then(|p| p.with_pixel_bounds(model.min_pixels, model.max_pixels))
                .with_context(|| format!("image processor of {}", model_dir.display()))?;
        let prompts = PromptBuilder::from_dir(&model_dir)
            .with_context(|| format!("tokenizer of {}", model_dir.display()))?;
        let split = |name: &str| ctx.workspace().data().join(format!("splits/{name}.jsonl"));
        let read = |p: PathBuf| -> anyhow::Result<Vec<Sample>> {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .with_context(|| format!("{} line {}", p.display(), i + 1))
                })
                .collect()
        };
        let mut warnings = Vec::new();
        let limit = if cfg.max_samples == 0 {
            usize::MAX
        } else {
            cfg.max_samples
        };
        let train_rows: Vec<Sample> = read(split("train"))?.into_iter().take(limit).collect();
        let val_rows = read(split("val"))?;
        let train_set = Encoded::build(&train_rows, &root, &processor, &prompts, cfg.max_seq_len)?;
        let val_set = Encoded::build(&val_rows, &root, &processor, &prompts, cfg.max_seq_len)?;
        for (name, set) in [("train", &train_set), ("val", &val_set)] {
            if set.dropped > 0 {
                warnings.push(format!(
                    "{name}: {} of {} samples dropped as longer than max_seq_len {}",
                    set.dropped,
                    set.dropped + set.samples.len(),
                    cfg.max_seq_len
                ));
            }
        }
        if train_set.samples.is_empty() {
            bail!(
                "no training sample fits max_seq_len {} ({} dropped)",
                cfg.max_seq_len,
                train_set.dropped
            );
        }

        let tcfg = TrainConfig {
            lr: cfg.lr,
            warmup_ratio: cfg.warmup_ratio,
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            max_grad_norm: (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            weight_decay: cfg.weight_decay,
            seed: cfg.seed,
            checkpoint_every: (cfg.checkpoint_every > 0).then_some(cfg.checkpoint_every),
            eval_every: (cfg.eval_every > 0).then_some(cfg.eval_every),
            max_samples: None,
            keep_checkpoints: 2,
            recompute: cfg.recompute,
            log_every: cfg.log_every,
        };
        let ckpt_dir = ctx.workspace().checkpoints().join("train-state");
        // Resume only checkpoints made from these inputs: the trainer's own run fingerprint
        // covers the schedule, not the data, the NF4 base or the LoRA shape.
        let inputs = inputs_fingerprint(ctx, &cfg, Stage::upstream(self))?;
        if claim_checkpoints(&ckpt_dir, &inputs)? {
            warnings.push(format!(
                "discarded checkpoints in {} left by a run with other inputs",
                ctx.workspace().relative(&ckpt_dir).display()
            ));
        }
        let adapter_dir = ctx.workspace().checkpoints().join("adapter");
        let trained = run_autodiff_on_as(
            devices[0],
            precision,
            TrainJob {
                ctx,
                devices: &devices,
                precision,
                cfg: &cfg,
                tcfg: &tcfg,
                model_dir: &model_dir,
                nf4_dir: &nf4_dir,
                ckpt_dir: &ckpt_dir,
                adapter_dir: &adapter_dir,
                train_set: &train_set,
                val_set: &val_set,
            },
        )???;

        let st = &trained.state;
        let tokens: usize = st.history.iter().map(|m| m.input_tokens).sum();
        let samples: usize = st.history.iter().map(|m| m.samples).sum();
        let padded: usize = st.history.iter().map(|m| m.padding_tokens).sum();
        let padded_unbucketed: usize = st.history.iter().map(|m| m.padding_tokens_unbucketed).sum();
        let share = |pad: usize| {
            let total = tokens + pad;
            (total > 0).then(|| pad as f64 / total as f64)
        };
        let step_time: f64 = st
            .history
            .iter()
            .filter(|m| m.tokens_per_s > 0.0)
            .map(|m| m.input_tokens as f64 / m.tokens_per_s)
            .sum();
        let report = TrainingMetrics {
            adapter_dir: Some(ctx.workspace().relative(&adapter_dir).display().to_string()),
            steps: st
                .history
                .iter()
                .map(|m| TrainStep {
                    step: m.step as usize,
                    loss: m.loss,
                    lr: Some(m.lr),
                    grad_norm: (!m.skipped).then_some(m.grad_norm),
                    loss_scale: m.loss_scale,
                    skipped: m.skipped,
                })
                .collect(),
            val: st
                .validations
                .iter()
                .map(|v| ValPoint {
                    step: v.step as usize,
                    loss: v.loss,
                })
                .collect(),
            total_steps: Some(st.step as usize),
            epochs: Some(cfg.epochs as f64),
            tokens_per_s: (step_time > 0.0).then(|| tokens as f64 / step_time),
            peak_memory_bytes: trained.peak_memory_bytes,
            train_time_s: Some(trained.train_time_s),
            trainable_params: Some(trained.trainable),
        };
        let skipped = st.history.iter().filter(|m| m.skipped).count();
        if skipped > 0 {
            warnings.push(format!(
                "{skipped} of {} optimizer steps were skipped: their f16 gradients overflowed \
                 and the loss scale was halved (steps[].skipped)",
                st.history.len()
            ));
        }
        let first = st.history.first().map(|m| m.loss);
        let last = st.history.last().map(|m| m.loss);
        let best_val = st
            .validations
            .iter()
            .map(|v| v.loss)
            .fold(f64::INFINITY, f64::min);
        let mut metrics = serde_json::to_value(&report)?;
        let extra = json!({
            "base_model_dir": ctx.workspace().relative(&model_dir),
            "nf4_base_dir": ctx.workspace().relative(&nf4_dir),
            "base_quantization": format!(
                "nf4 (bitsandbytes layout, double quant); compute {precision} on {}",
                if devices[0] == Device::Cpu { "CPU".into() } else { devices[0].to_string() }
            ),
            // Data parallel: every device the micro-batches ran on, the first stepping AdamW.
            "devices": devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            // The frozen model computes in model.dtype; LoRA params, gradients, AdamW and the
            // loss stay f32.
            "compute_dtype": precision.to_string(),
            "adapter_chosen": trained.chosen,
            "total_params": trained.total_params,
            "trainable_percent": 100.0 * trained.trainable as f64 / (trained.total_params + trained.trainable).max(1) as f64,
            "samples_per_s": if step_time > 0.0 { samples as f64 / step_time } else { 0.0 },
            "train_samples": train_set.samples.len(),
            "val_samples": val_set.samples.len(),
            "dropped_too_long": train_set.dropped + val_set.dropped,
            "first_loss": first,
            "final_loss": last,
            "best_val_loss": best_val.is_finite().then_some(best_val),
            "load_s": trained.load_s,
            "resumed_from_step": trained.resumed_from_step,
            // Of the tokens the micro-batches computed on, the share that was padding, and
            // what it would have been without grouping each window's samples by length.
            "padding_fraction": share(padded),
            "padding_fraction_unbucketed": share(padded_unbucketed),
            "steps_per_s": if trained.train_time_s > 0.0 { st.step as f64 / trained.train_time_s } else { 0.0 },
            "config": tcfg,
            // The planner's prediction (for max_seq_len tokens), beside peak_memory_bytes.
            "memory_plan": memory_plan,
        });
        if let (Some(m), Some(e)) = (metrics.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        let _ = std::fs::remove_dir_all(&ckpt_dir);
        let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        Ok(StageOutput {
            metrics,
            outputs: vec![adapter_dir],
            summary: vec![
                ("steps".into(), st.step.to_string()),
                ("loss".into(), format!("{} → {}", fmt(first), fmt(last))),
                (
                    "best val loss".into(),
                    fmt(best_val.is_finite().then_some(best_val)),
                ),
                (
                    "trainable".into(),
                    format!(
                        "{} of {} params",
                        trained.trainable,
                        trained.total_params + trained.trainable
                    ),
                ),
                ("time".into(), format!("{:.1} s", trained.train_time_s)),
            ],
            warnings,
        })
    }
}

/// File in the checkpoint directory naming the inputs its checkpoints were trained from.
const INPUTS_FILE: &str = "inputs.sha256";

/// sha256 (hex) of what a training run is made from: the `[train]` section and, for each
/// upstream stage, its input hash and output content (paths and sha256).
fn inputs_fingerprint(
    ctx: &StageCtx<'_>,
    cfg: &TrainStageConfig,
    upstream: &[&str],
) -> anyhow::Result<String> {
    let mut up = serde_json::Map::new();
    for stage in upstream {
        let a = ctx.upstream(stage)?;
        let outputs: Vec<_> = a.outputs.iter().map(|o| (&o.path, &o.sha256)).collect();
        up.insert(
            stage.to_string(),
            json!({ "input_hash": a.input_hash, "outputs": outputs }),
        );
    }
    let all = json!({ "train": checkpoint_inputs(cfg)?, "upstream": up });
    Ok(crate::fs::sha256_hex(
        serde_json::to_string(&all)?.as_bytes(),
    ))
}

/// The `[train]` settings a checkpoint depends on: all but the [`OUTPUT_NEUTRAL`] ones (the
/// trainer resumes a run made under another setting of those).
fn checkpoint_inputs(cfg: &TrainStageConfig) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(cfg)?;
    if let Some(fields) = v.as_object_mut() {
        for key in OUTPUT_NEUTRAL {
            fields.remove(key);
        }
    }
    Ok(crate::json::canonical(v))
}

/// Makes `ckpt_dir` hold only checkpoints trained from `inputs`: when it exists with
/// another (or no) [`INPUTS_FILE`], it is removed. Then records `inputs` there. Returns
/// whether something was discarded.
fn claim_checkpoints(ckpt_dir: &Path, inputs: &str) -> anyhow::Result<bool> {
    let marker = ckpt_dir.join(INPUTS_FILE);
    let discarded = match std::fs::read_to_string(&marker) {
        Ok(recorded) if recorded == inputs => false,
        _ if ckpt_dir.exists() => {
            std::fs::remove_dir_all(ckpt_dir)
                .with_context(|| format!("removing stale checkpoints {}", ckpt_dir.display()))?;
            true
        }
        _ => false,
    };
    crate::fs::write_atomic(&marker, inputs.as_bytes())?;
    Ok(discarded)
}

/// What a training run on some backend hands back to the stage.
struct Trained {
    /// Parameters of the NF4 base (before LoRA).
    total_params: u64,
    /// LoRA parameters added.
    trainable: u64,
    /// Load of the base + LoRA init, s.
    load_s: f64,
    /// Training wall time, s.
    train_time_s: f64,
    /// `best validation` or `final`: which adapter was shipped.
    chosen: &'static str,
    /// The optimizer step of the checkpoint a resumed run continued from.
    resumed_from_step: Option<u64>,
    /// Peak memory of training, bytes: RSS on the CPU, the allocator's pools on a GPU.
    peak_memory_bytes: Option<u64>,
    state: TrainState,
}

/// Loads the NF4 base with fresh LoRA pairs, trains (resuming from `ckpt_dir`), and commits
/// the adapter to ship into `adapter_dir`, on the backend `run_autodiff_on` picks.
struct TrainJob<'a, 'c> {
    ctx: &'a StageCtx<'c>,
    /// The first runs the job; data parallel replicas go on the others.
    devices: &'a [Device],
    precision: Precision,
    cfg: &'a TrainStageConfig,
    tcfg: &'a TrainConfig,
    model_dir: &'a Path,
    nf4_dir: &'a Path,
    ckpt_dir: &'a Path,
    adapter_dir: &'a Path,
    train_set: &'a Encoded,
    val_set: &'a Encoded,
}

impl AutodiffJob for TrainJob<'_, '_> {
    type Output = anyhow::Result<Trained>;

    fn run<B: AutodiffKernels>(self, device: B::Device, target: Target) -> Self::Output {
        let TrainJob {
            ctx,
            devices,
            precision,
            cfg,
            tcfg,
            model_dir,
            nf4_dir,
            ckpt_dir,
            adapter_dir,
            train_set,
            val_set,
        } = self;
        let mut watch = DeviceWatch::new(DeviceMemory::for_device(target.device));
        let load_clock = Instant::now();
        let spec = LoraSpec {
            r: cfg.r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            seed: cfg.seed,
        };
        let load = |device: &B::Device| {
            Qwen25Vl::<B>::load(nf4_dir, device)
                .with_context(|| format!("loading the NF4 base {}", nf4_dir.display()))
        };
        let mut model = load(&device)?;
        // The base's parameter count as transformers reports it: NF4 codes are constants that
        // burn's `num_params` does not see, so count from the architecture instead.
        let total_params = model.config().parameter_count();
        let params_before_lora = model.num_params() as u64;
        model.add_lora(&spec, &device);
        let trainable = (model.num_params() as u64).saturating_sub(params_before_lora);
        // A replica per further device (data parallel), at the run's precision.
        let mut replicas = Vec::new();
        for &d in &devices[1..] {
            let dev = backend_device::<B>(d).with_context(|| {
                format!(
                    "train.devices: {d} is not a device of the first one's backend ({})",
                    target.backend
                )
            })?;
            precision
                .apply::<B>(&dev, d)
                .with_context(|| format!("train.devices: {d}"))?;
            let mut replica = load(&dev).with_context(|| format!("the replica on {d}"))?;
            replica.add_lora(&spec, &dev);
            replicas.push(Replica {
                model: replica,
                device: dev,
            });
        }
        // f32 LoRA weights: each kept checkpoint (plus the one being written) holds them and
        // both AdamW moments; the adapter, the best adapter and a `.partial` copy come on top.
        let lora_bytes = trainable * 4;
        let needed = lora_bytes * (3 * (tcfg.keep_checkpoints as u64 + 1) + 3);
        crate::fs::space::ensure_free(ckpt_dir, needed, "the LoRA checkpoints and adapter")?;
        let load_s = load_clock.elapsed().as_secs_f64();

        let window = cfg.batch_size * cfg.grad_accum * devices.len();
        let total = (train_set.samples.len().div_ceil(window.max(1)) * cfg.epochs) as u64;
        let bar = ctx.progress_bar(total, "train");
        let mut peak_rss = crate::bench::memory::rss_bytes().map(|r| r.1).unwrap_or(0);
        // The optimizer step of the checkpoint this run continued from (a killed run resumed).
        let mut resumed_from_step: Option<u64> = None;
        let mut on_event = |e: &TrainEvent<'_>| {
            match e {
                TrainEvent::Stepped { step } => bar.set_position(*step),
                TrainEvent::Step(m) => {
                    bar.set_message(format!("loss {:.3} lr {:.1e}", m.loss, m.lr));
                }
                TrainEvent::Resumed { step, .. } => {
                    bar.set_position(*step);
                    resumed_from_step = Some(*step);
                }
                _ => {}
            }
            if let Some((_, peak)) = crate::bench::memory::rss_bytes() {
                peak_rss = peak_rss.max(peak);
            }
            watch.after_call();
            Flow::Continue
        };
        let clock = Instant::now();
        let train_src = OnDevice::<B::InnerBackend> {
            set: train_set,
            device: device.clone(),
        };
        let val_src = OnDevice::<B::InnerBackend> {
            set: val_set,
            device: device.clone(),
        };
        let valid =
            (!val_set.samples.is_empty()).then_some(&val_src as &dyn SampleSource<B::InnerBackend>);
        let outcome = train_parallel::<B>(
            model,
            replicas,
            &train_src,
            valid,
            tcfg,
            ckpt_dir,
            &device,
            &mut on_event,
        )
        .context("training")?;
        bar.finish_and_clear();
        let train_time_s = clock.elapsed().as_secs_f64();

        // The adapter to ship: best validation when one ran, else the final weights.
        let partial = crate::fs::fresh_partial(&ctx.workspace().checkpoints().join("adapter"))?;
        let chosen = match &outcome.best_dir {
            Some(best) => {
                copy_dir(best, &partial)?;
                "best validation"
            }
            None => {
                outcome
                    .model
                    .export_adapter(Some(model_dir.display().to_string()))
                    .context("exporting the adapter")?
                    .save(&partial)
                    .context("writing the adapter")?;
                "final"
            }
        };
        commit_dir(&partial, adapter_dir)?;
        Ok(Trained {
            total_params,
            trainable,
            load_s,
            train_time_s,
            chosen,
            resumed_from_step,
            peak_memory_bytes: watch.peak_memory_bytes(None, Some(peak_rss)),
            state: outcome.state,
        })
    }
}

/// A split turned into token ids once, up front (so over-long samples are counted before
/// training). The pages are preprocessed again each time a sample is drawn: holding every
/// decoded page would cost `samples x patches x 4.7 KB` (120 GB for 5,000 pages at 1 Mpx),
/// and decoding is deterministic, so the pixels are the same each epoch.
struct Encoded {
    samples: Vec<EncodedSample>,
    dropped: usize,
    processor: ImageProcessor,
}

/// Token ids, labels and the page image.
type EncodedSample = (Vec<u32>, Vec<i64>, PathBuf);

impl Encoded {
    fn build(
        rows: &[Sample],
        root: &Path,
        processor: &ImageProcessor,
        prompts: &PromptBuilder,
        max_seq_len: usize,
    ) -> anyhow::Result<Self> {
        let mut samples = Vec::new();
        let mut dropped = 0;
        for row in rows {
            let path = root.join(&row.image);
            let px = processor
                .preprocess(&[ProcImage::Path(path.clone())])
                .with_context(|| format!("sample {}: {}", row.id, path.display()))?;
            let ex = prompts
                .encode_training(None, &row.prompt, &px.grid_thw, &row.target)
                .with_context(|| format!("sample {}: building the prompt", row.id))?;
            if ex.input_ids.len() > max_seq_len {
                dropped += 1;
                continue;
            }
            samples.push((ex.input_ids, ex.labels, path));
        }
        Ok(Self {
            samples,
            dropped,
            processor: processor.clone(),
        })
    }
}

/// An encoded split whose samples become tensors on `device`.
struct OnDevice<'a, B: Kernels> {
    set: &'a Encoded,
    device: B::Device,
}

impl<B: Kernels> SampleSource<B> for OnDevice<'_, B> {
    fn len(&self) -> usize {
        self.set.samples.len()
    }
    fn get(&self, index: usize) -> Result<TrainSample<B>, SampleError> {
        let (ids, labels, path) = self.set.samples.get(index).ok_or(SampleError {
            index,
            reason: format!("out of range ({} samples)", self.set.samples.len()),
        })?;
        let px = self
            .set
            .processor
            .preprocess(&[ProcImage::Path(path.clone())])
            .map_err(|e| SampleError {
                index,
                reason: format!("{:#}", anyhow::Error::new(e)),
            })?;
        Ok(TrainSample {
            input_ids: ids.clone(),
            labels: labels.clone(),
            images: Some(ImageInput {
                pixel_values: Tensor::<B, 1>::from_floats(px.pixel_values.as_slice(), &self.device)
                    .reshape([px.num_patches, px.patch_dim]),
                grids: px.grid_thw.iter().map(|g| g.map(|v| v as usize)).collect(),
            }),
        })
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            let bytes = std::fs::read(e.path())?;
            crate::fs::write_atomic(&dst, &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed checkpoint directory as the trainer names them.
    fn fake_checkpoint(ckpt_dir: &Path) -> PathBuf {
        let step = ckpt_dir.join("step-00000001");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("state.json"), b"{}").unwrap();
        step
    }

    #[test]
    fn checkpoints_survive_a_change_of_recompute_or_log_every_but_not_of_the_devices() {
        let base = TrainStageConfig::default();
        let layers = TrainStageConfig {
            recompute: "layers".parse().unwrap(),
            log_every: 1,
            ..base.clone()
        };
        let two = TrainStageConfig {
            devices: vec!["cpu".into(), "cpu".into()],
            ..base.clone()
        };
        let inputs = |c: &TrainStageConfig| checkpoint_inputs(c).unwrap();
        assert_eq!(inputs(&layers), inputs(&base));
        assert_ne!(
            inputs(&two),
            inputs(&base),
            "two devices take twice the samples a step"
        );
    }

    #[test]
    fn checkpoints_of_the_same_inputs_are_kept_for_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("train-state");
        assert!(
            !claim_checkpoints(&ckpt, "a").unwrap(),
            "nothing to discard"
        );
        let step = fake_checkpoint(&ckpt);
        assert!(!claim_checkpoints(&ckpt, "a").unwrap());
        assert!(step.join("state.json").exists());
    }

    #[test]
    fn checkpoints_of_other_inputs_or_of_unknown_inputs_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("train-state");
        claim_checkpoints(&ckpt, "a").unwrap();
        let step = fake_checkpoint(&ckpt);
        assert!(claim_checkpoints(&ckpt, "b").unwrap());
        assert!(!step.exists());
        assert_eq!(
            std::fs::read_to_string(ckpt.join(INPUTS_FILE)).unwrap(),
            "b"
        );

        // Left by a build that recorded no inputs: they cannot be trusted either.
        std::fs::remove_file(ckpt.join(INPUTS_FILE)).unwrap();
        let step = fake_checkpoint(&ckpt);
        assert!(claim_checkpoints(&ckpt, "b").unwrap());
        assert!(!step.exists());
    }
}
