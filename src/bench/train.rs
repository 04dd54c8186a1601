//! `medpipe bench --train`: a fixed number of QLoRA optimizer steps through the trainer the
//! train stage uses, on synthetic text samples of a fixed length, reporting samples/s,
//! tokens/s and the memory the steps took beside the planner's prediction for them.
//!
//! Memory: on the CPU, the process's resident peak during the steps (`VmHWM`, reset to the
//! current size after loading through `/proc/self/clear_refs`, so the load's own peak does
//! not count); on a GPU, the allocator's reserved bytes. What the steps add over the loaded
//! model is compared with the planner's activations plus optimizer state. Run one setting
//! per process: memory a previous run freed but the allocator kept would hide the next
//! run's growth.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::bench::memory::{rss_bytes, DeviceWatch};
use crate::bench::BenchError;
use crate::device::{run_autodiff_on_as, AutodiffJob, Device, DeviceMemory, Precision, Target};
use crate::kernels::AutodiffKernels;
use crate::model::lora::LoraSpec;
use crate::model::plan::{self, Stored, Training};
use crate::model::Qwen25Vl;
use crate::train::batch::TrainSample;
use crate::train::config::{Recompute, TrainConfig};
use crate::train::loss::IGNORE_INDEX;
use crate::train::trainer::{train_parallel, Flow, Replica, TrainEvent};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBenchOptions {
    /// Measured optimizer steps (≥ 1).
    pub steps: usize,
    /// Steps run first and left out of the figures (allocator and kernel warm-up).
    pub warmup_steps: usize,
    /// Samples per micro-batch (one optimizer step is one micro-batch).
    pub micro_batch: usize,
    /// Tokens per sample (text only; the loss counts the second half, the "answer").
    pub seq_len: usize,
    pub lora_r: usize,
    pub recompute: Recompute,
    /// Seeds the sample tokens, the LoRA init and dropout.
    pub seed: u64,
    /// Data parallel peers on the device (≥ 1), one micro-batch each per step.
    pub peers: usize,
    /// Read the loss back every this many steps, as `train.log_every` (≥ 1; `warmup_steps`
    /// a multiple of it, so the measured steps start at a read). A step's time is its share
    /// of the wall time between reads.
    pub log_every: usize,
}

impl TrainBenchOptions {
    /// # Errors
    /// [`BenchError::Invalid`] naming the first setting out of range.
    pub fn validate(&self) -> Result<(), BenchError> {
        for (name, v) in [
            ("--steps", self.steps),
            ("--micro-batch", self.micro_batch),
            ("--lora-r", self.lora_r),
            ("--peers", self.peers),
            ("--log-every", self.log_every),
        ] {
            if v == 0 {
                return Err(BenchError::Invalid {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if !self.warmup_steps.is_multiple_of(self.log_every.max(1)) {
            return Err(BenchError::Invalid {
                name: "--log-every",
                reason: format!(
                    "{} warm-up steps are not a whole number of {}-step read intervals",
                    self.warmup_steps, self.log_every
                ),
            });
        }
        if self.seq_len < 2 {
            return Err(BenchError::Invalid {
                name: "--seq-len",
                reason: format!(
                    "{} tokens: a next-token loss needs at least 2",
                    self.seq_len
                ),
            });
        }
        Ok(())
    }
}

/// The figures of one run (`--output` writes them as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBenchResult {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub recompute: String,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub lora_r: usize,
    /// Data parallel peers on the device (results written before they existed had one).
    #[serde(default = "one")]
    pub peers: usize,
    /// Steps per read-back of the loss (results written before it existed read each step).
    #[serde(default = "one")]
    pub log_every: usize,
    pub decoder_layers: usize,
    /// Measured steps (after the warm-up ones).
    pub steps: usize,
    /// Wall time of each measured step, ms.
    pub step_ms: Vec<f64>,
    pub samples_per_s: f64,
    /// Input tokens per second.
    pub tokens_per_s: f64,
    /// Final loss (nats), so a run that diverged is seen.
    pub final_loss: f64,
    /// Memory in use once the model and its LoRA pairs are loaded, bytes.
    pub memory_after_load_bytes: Option<u64>,
    /// Peak memory during the steps, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// What the steps added: peak minus after-load, bytes.
    pub work_bytes: Option<u64>,
    /// The planner's activations plus LoRA optimizer state for these steps, bytes.
    pub predicted_work_bytes: u64,
    /// Where the memory figures come from.
    pub memory_source: String,
}

/// Runs the benchmark on `device` in `precision` with the checkpoint in `dir` (dense or
/// the quantize stage's NF4 one).
///
/// # Errors
/// Invalid options, a model that does not load, a device or precision that cannot run it,
/// a training failure.
pub fn run_train_bench_as(
    device: Device,
    precision: Precision,
    dir: &Path,
    model_id: &str,
    opts: &TrainBenchOptions,
) -> Result<TrainBenchResult, BenchError> {
    opts.validate()?;
    let job = TrainBenchJob {
        dir,
        model_id,
        opts,
        precision,
    };
    run_autodiff_on_as(device, precision, job)??
}

struct TrainBenchJob<'a> {
    dir: &'a Path,
    model_id: &'a str,
    opts: &'a TrainBenchOptions,
    precision: Precision,
}

impl AutodiffJob for TrainBenchJob<'_> {
    type Output = Result<TrainBenchResult, BenchError>;

    fn run<B: AutodiffKernels>(self, device: B::Device, target: Target) -> Self::Output {
        let opts = self.opts;
        let mut watch = DeviceWatch::new(DeviceMemory::for_device(target.device));
        let spec = LoraSpec {
            r: opts.lora_r,
            alpha: 2.0 * opts.lora_r as f64,
            dropout: 0.05,
            seed: opts.seed,
        };
        let load = || -> Result<Qwen25Vl<B>, BenchError> {
            let mut model = Qwen25Vl::<B>::load(self.dir, &device)?;
            model.add_lora(&spec, &device);
            Ok(model)
        };
        let model = load()?;
        let replicas = (1..opts.peers)
            .map(|_| {
                Ok(Replica {
                    model: load()?,
                    device: device.clone(),
                })
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        let cfg = model.config().clone();
        let samples = synthetic_samples::<B::InnerBackend>(&cfg, opts);
        let tcfg = TrainConfig {
            lr: 2e-4,
            warmup_ratio: 0.0,
            epochs: 1,
            batch_size: opts.micro_batch,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            seed: opts.seed,
            checkpoint_every: None,
            eval_every: None,
            max_samples: None,
            keep_checkpoints: 1,
            recompute: opts.recompute,
            log_every: opts.log_every as u64,
        };
        // The trainer always checkpoints at its end; that goes to a directory dropped here.
        let scratch = Scratch(
            std::env::temp_dir().join(format!("medpipe-bench-train-{}", std::process::id())),
        );
        // A killed run of a process with the same pid may have left checkpoints there, which
        // the trainer would resume from, timing fewer steps.
        let _ = std::fs::remove_dir_all(&scratch.0);
        watch.after_call();
        let after_load = memory_now(&watch);
        let reset = reset_peak_rss();
        let mut steps = Vec::new();
        let mut on_event = |e: &TrainEvent<'_>| {
            if let TrainEvent::Step(m) = e {
                steps.push((
                    m.samples,
                    m.input_tokens,
                    m.samples as f64 / m.samples_per_s,
                    m.loss,
                ));
            }
            watch.after_call();
            Flow::Continue
        };
        train_parallel::<B>(
            model,
            replicas,
            &samples,
            None,
            &tcfg,
            &scratch.0,
            &device,
            &mut on_event,
        )?;
        let gpu = target.device != Device::Cpu;
        let peak = if gpu {
            watch.peak().map(|p| p.bytes_reserved)
        } else {
            rss_bytes().map(|(_, hwm)| hwm)
        };
        let measured = &steps[opts.warmup_steps.min(steps.len())..];
        let secs: f64 = measured.iter().map(|s| s.2).sum::<f64>().max(1e-9);
        let predicted = plan::training(
            &cfg,
            &[],
            Stored::F32,
            Training {
                micro_batch: opts.micro_batch,
                seq_len: opts.seq_len,
                image_pixels: 0,
                lora_r: opts.lora_r,
                recompute_every: opts.recompute.segment_len(),
            },
        );
        Ok(TrainBenchResult {
            model: self.model_id.to_string(),
            device: target.device.to_string(),
            dtype: self.precision.to_string(),
            recompute: opts.recompute.to_string(),
            micro_batch: opts.micro_batch,
            seq_len: opts.seq_len,
            lora_r: opts.lora_r,
            peers: opts.peers,
            log_every: opts.log_every,
            decoder_layers: cfg.text.num_layers,
            steps: measured.len(),
            step_ms: measured.iter().map(|s| s.2 * 1e3).collect(),
            samples_per_s: measured.iter().map(|s| s.0).sum::<usize>() as f64 / secs,
            tokens_per_s: measured.iter().map(|s| s.1).sum::<usize>() as f64 / secs,
            final_loss: steps.last().map_or(f64::NAN, |s| s.3),
            memory_after_load_bytes: after_load,
            peak_memory_bytes: peak,
            work_bytes: peak.zip(after_load).map(|(p, a)| p.saturating_sub(a)),
            // Each peer holds its micro-batch's activations; AdamW lives on the first.
            predicted_work_bytes: predicted.activations * opts.peers as u64 + predicted.optimizer,
            memory_source: if gpu {
                "allocator bytes reserved".into()
            } else if reset {
                "process resident peak (VmHWM), reset after loading".into()
            } else {
                "process resident peak (VmHWM), including loading: /proc/self/clear_refs \
                 could not be written"
                    .into()
            },
        })
    }
}

fn one() -> usize {
    1
}

/// A directory removed when dropped (the trainer's closing checkpoint goes there).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Memory in use now: the allocator's reserved bytes on a GPU, the resident set on the CPU.
fn memory_now(watch: &DeviceWatch) -> Option<u64> {
    match watch.peak() {
        Some(p) => Some(p.bytes_reserved),
        None => rss_bytes().map(|(now, _)| now),
    }
}

/// Resets the process's resident peak to its current size (Linux 4.0+); false where the
/// kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `warmup + steps` micro-batches of `seq_len` random text tokens (below every special id),
/// the loss on each sample's second half.
fn synthetic_samples<B: crate::kernels::Kernels>(
    cfg: &crate::model::Qwen25VlConfig,
    opts: &TrainBenchOptions,
) -> Vec<TrainSample<B>> {
    let t = &cfg.tokens;
    let limit = [
        Some(t.image_token_id),
        Some(t.vision_start_token_id),
        t.video_token_id,
        t.vision_end_token_id,
    ]
    .into_iter()
    .flatten()
    .chain([cfg.text.vocab_size as u32])
    .min()
    .unwrap_or(1)
    .max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    // Each step takes one micro-batch per peer.
    let n = (opts.warmup_steps + opts.steps) * opts.micro_batch * opts.peers;
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..opts.seq_len)
                .map(|_| rng.random_range(0..limit))
                .collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    if i < opts.seq_len / 2 {
                        IGNORE_INDEX
                    } else {
                        id as i64
                    }
                })
                .collect();
            TrainSample {
                input_ids: ids,
                labels,
                images: None,
            }
        })
        .collect()
}

/// The result as a Markdown table.
pub fn markdown(r: &TrainBenchResult) -> String {
    let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let mean = r.step_ms.iter().sum::<f64>() / r.step_ms.len().max(1) as f64;
    let rows = [
        ("model", r.model.clone()),
        ("device", format!("{} ({})", r.device, r.dtype)),
        ("decoder layers", r.decoder_layers.to_string()),
        ("recompute", r.recompute.clone()),
        ("data parallel peers", r.peers.to_string()),
        (
            "micro-batch × tokens",
            format!("{} × {}", r.micro_batch, r.seq_len),
        ),
        ("LoRA rank", r.lora_r.to_string()),
        ("measured steps", r.steps.to_string()),
        ("loss read back", format!("every {} step(s)", r.log_every)),
        ("step time (mean)", format!("{mean:.1} ms")),
        (
            "throughput",
            format!(
                "{:.2} samples/s, {:.0} tokens/s",
                r.samples_per_s, r.tokens_per_s
            ),
        ),
        ("final loss", format!("{:.4} nats", r.final_loss)),
        ("memory after load", mib(r.memory_after_load_bytes)),
        ("peak during steps", mib(r.peak_memory_bytes)),
        ("added by the steps", mib(r.work_bytes)),
        (
            "planner: activations + optimizer",
            mib(Some(r.predicted_work_bytes)),
        ),
    ];
    let mut out = String::from("| | |\n| --- | --- |\n");
    for (k, v) in rows {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    out.push_str(&format!("\nMemory: {}.\n", r.memory_source));
    out
}
