//! The LoRA training loop: seeded per-epoch shuffle, micro-batches with gradient
//! accumulation, global-norm clipping, AdamW with warmup + cosine, validation with
//! best-adapter tracking, and atomic checkpoints that a run resumes from bit-identically.
//!
//! Follows the semantics of transformers' `Trainer` (trainer.py `_inner_training_loop`): the
//! loss of an accumulation window is the token sum over the window divided by the window's
//! counted tokens (`num_items_in_batch`), so accumulation equals one large batch; the
//! learning rate of optimizer step `s` is `lr(s)` of `get_cosine_schedule_with_warmup`.
//!
//! Determinism: the data order of epoch `e` is a Fisher-Yates shuffle by ChaCha8 seeded with
//! `(seed, e)`; each micro-batch's LoRA dropout masks are a function of `(seed, step,
//! micro-batch, site)` ([`crate::model::dropout`]), which also lets layer recomputation
//! (`recompute`) rerun a layer with the masks of its first run. Both are functions of
//! counters saved in the checkpoint, so a resumed run replays exactly what an uninterrupted
//! one computes.
//!
//! Data parallel ([`train_parallel`]): with `D` devices an optimizer step takes
//! `batch_size × grad_accum × D` samples; micro-batch `k` of the window runs on device
//! `k mod D` (a replica of the model there), with the dropout masks micro-batch `k` has on
//! one device. The replicas' gradients are summed onto the first device by burn-collective's
//! `reduce` (one call per LoRA tensor per step), AdamW steps there, and the replicas take the
//! new LoRA weights before the next step. So `D` devices compute what one device computes
//! with `grad_accum × D` micro-batches (the sum in another order), and the checkpoint format
//! and resume do not change.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::DType;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::fs::recover_dir;
use crate::kernels::{AutodiffKernels, Kernels};
use crate::model::{ImageInput, Qwen25Vl};
use crate::train::batch::{collate, Batch, SampleError, SampleSource, TrainSample};
use crate::train::checkpoint::{self, BestVal, RunFingerprint, TrainState};
pub use crate::train::config::TrainConfig;
pub use crate::train::error::TrainError;
pub use crate::train::metrics::{Flow, StepMetrics, TrainEvent, ValMetrics};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::Peers;
use crate::train::recompute::{AdBatch, Pass};
use crate::train::scaler::{DeviceScaler, LossScaler};
use crate::train::schedule::WarmupCosine;
use crate::train::validate::{save_best, validate};

/// The result of [`train`].
#[derive(Debug)]
pub struct TrainOutcome<B: Kernels> {
    /// The model with its trained LoRA pairs.
    pub model: Qwen25Vl<B>,
    /// Final position, best validation, and the metrics of the whole run (resumes included).
    pub state: TrainState,
    /// False when the progress callback stopped the run early.
    pub completed: bool,
    /// `<checkpoint dir>/best`, the adapter of the best validation, when one ran.
    pub best_dir: Option<PathBuf>,
    /// Times the step metrics were read back from the device (each read waits for the
    /// device to finish): one per `log_every` steps, plus one before each validation,
    /// checkpoint, epoch end and stop.
    pub reads: u64,
}

/// A copy of the model on another device, for data parallel training ([`train_parallel`]).
/// Its LoRA pairs are replaced by the first device's before every step, so only its base
/// matters: load it from the same checkpoint as the first device's model.
pub struct Replica<B: Kernels> {
    pub model: Qwen25Vl<B>,
    pub device: B::Device,
}

/// The sample order of `epoch`: a seeded shuffle of `0..n`.
pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// The seed of micro-batch `micro` of optimizer step `step` (each layer's LoRA dropout
/// mixes its index in).
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    seed ^ (step + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (micro as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
}

/// Trains the LoRA pairs of `model` on `train` (everything else is frozen), validating on
/// `valid`, checkpointing under `ckpt_dir`. When `ckpt_dir` holds a checkpoint of the same
/// run, training resumes from the newest one.
///
/// # Errors
/// Invalid config, no LoRA pairs, no samples, malformed samples, model errors, a checkpoint
/// of another run, I/O failures, a non-finite loss.
pub fn train<B: AutodiffKernels>(
    model: Qwen25Vl<B>,
    train: &dyn SampleSource<B::InnerBackend>,
    valid: Option<&dyn SampleSource<B::InnerBackend>>,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    device: &B::Device,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<TrainOutcome<B>, TrainError> {
    train_parallel(model, vec![], train, valid, cfg, ckpt_dir, device, progress)
}

/// [`train`] with data parallelism: `model` on `device` and one [`Replica`] per further
/// device, micro-batches spread over them and gradients summed with burn-collective (see
/// the module doc). Validation and checkpoints run on `device`.
///
/// # Errors
/// As [`train`]; [`TrainError::Collective`] when burn-collective fails.
#[allow(clippy::too_many_arguments)]
pub fn train_parallel<B: AutodiffKernels>(
    model: Qwen25Vl<B>,
    replicas: Vec<Replica<B>>,
    train: &dyn SampleSource<B::InnerBackend>,
    valid: Option<&dyn SampleSource<B::InnerBackend>>,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    device: &B::Device,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<TrainOutcome<B>, TrainError> {
    let mut devices = vec![device.clone()];
    devices.extend(replicas.iter().map(|r| r.device.clone()));
    let replicas = replicas.into_iter().map(|r| r.model).collect();
    let ctx = Ctx::new(cfg, train, valid, ckpt_dir, devices)?;
    // Registers the peers with burn-collective for the run (none on one device).
    let _peers = Peers::<B::InnerBackend>::register(&ctx.devices)?;
    let (mut run, flow) = resume_or_init(model, replicas, &ctx, progress)?;
    if flow == Flow::Stop {
        return Ok(run.finish(false, ckpt_dir));
    }
    // The next window's samples (pages decoded and preprocessed) load on another thread
    // while a step computes; what it loads depends only on the order, so results are the
    // same as loading in line.
    std::thread::scope(|scope| {
        let mut prefetch: Option<(Vec<usize>, Loading<'_, B>)> = None;
        while run.state.epoch < cfg.epochs {
            let order = epoch_order(cfg.seed, run.state.epoch, ctx.n);
            while run.state.next_sample < ctx.n {
                let start = run.state.next_sample;
                let indices = order[start..(start + ctx.window).min(ctx.n)].to_vec();
                let samples = match prefetch.take() {
                    Some((next, loading)) if next == indices => loading
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
                    _ => load(ctx.train, &indices)?,
                };
                let ahead = window_after(run.state.epoch, start, &order, ctx.window, cfg);
                if let Some(next) = ahead {
                    let source = ctx.train;
                    let spawned = next.clone();
                    prefetch = Some((next, scope.spawn(move || load(source, &spawned))));
                }
                run = optimizer_step(run, &indices, samples, &ctx)?;
                let step = run.state.step;
                let mut stop = progress(&TrainEvent::Stepped { step }) == Flow::Stop;
                let epoch_done = end_epoch_if_done(&mut run.state, ctx.n);
                let finished = run.state.epoch >= cfg.epochs;
                let validate = validation_due(&run.state, epoch_done, &ctx);
                let checkpoint = checkpoint_due(&run.state, finished, &ctx);
                // The metrics are read back at logging intervals, and whenever the host needs
                // the state: before validating, checkpointing, an epoch's end and stopping.
                if stop
                    || validate
                    || checkpoint
                    || epoch_done
                    || finished
                    || step.is_multiple_of(cfg.log_every)
                {
                    stop |= read_metrics(&mut run, progress)? == Flow::Stop;
                }
                if validate {
                    stop |= run_validation(&mut run, &ctx, progress)? == Flow::Stop;
                }
                if checkpoint {
                    stop |= save_checkpoint(&run, &ctx, progress)? == Flow::Stop;
                }
                if validate || checkpoint {
                    // The next interval's clock leaves validation and checkpoint time out.
                    run.interval_start = Instant::now();
                }
                if stop && !finished {
                    return Ok(run.finish(false, ckpt_dir));
                }
                if epoch_done {
                    break;
                }
            }
        }
        Ok(run.finish(true, ckpt_dir))
    })
}

/// A window's samples being loaded on another thread.
type Loading<'scope, B> = std::thread::ScopedJoinHandle<
    'scope,
    Result<
        Vec<TrainSample<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend>>,
        SampleError,
    >,
>;

/// Samples `indices` of `source`, in order.
fn load<B: Kernels>(
    source: &dyn SampleSource<B>,
    indices: &[usize],
) -> Result<Vec<TrainSample<B>>, SampleError> {
    indices.iter().map(|&i| source.get(i)).collect()
}

/// The window after the one of `epoch` starting at `start` of `order` (`window` samples per
/// step over `order.len()`): the rest of this epoch, or the start of the next epoch's order;
/// `None` after the last.
fn window_after(
    epoch: usize,
    start: usize,
    order: &[usize],
    window: usize,
    cfg: &TrainConfig,
) -> Option<Vec<usize>> {
    let n = order.len();
    let end = (start + window).min(n);
    if end < n {
        return Some(order[end..(end + window).min(n)].to_vec());
    }
    (epoch + 1 < cfg.epochs).then(|| epoch_order(cfg.seed, epoch + 1, n)[..window.min(n)].to_vec())
}

/// What stays fixed for a whole run: the config, the sample sources, where checkpoints go,
/// and the quantities derived from them.
struct Ctx<'a, B: AutodiffKernels> {
    cfg: &'a TrainConfig,
    train: &'a dyn SampleSource<B::InnerBackend>,
    valid: Option<&'a dyn SampleSource<B::InnerBackend>>,
    ckpt_dir: &'a Path,
    /// The devices micro-batches run on; the first holds the model that AdamW steps,
    /// validates and checkpoints.
    devices: Vec<B::Device>,
    /// Training samples used (after `max_samples`).
    n: usize,
    /// Samples per optimizer step (`batch_size × grad_accum × devices`).
    window: usize,
    /// Learning rate per optimizer step; `total_steps` is the run's length.
    sched: WarmupCosine,
    /// Identifies the run: a checkpoint with another fingerprint is not resumed.
    fingerprint: RunFingerprint,
}

impl<'a, B: AutodiffKernels> Ctx<'a, B> {
    /// The first device (where AdamW steps, validation and checkpoints run).
    fn device(&self) -> &B::Device {
        &self.devices[0]
    }

    /// Checks the config and derives the schedule, so a bad config fails before any I/O.
    fn new(
        cfg: &'a TrainConfig,
        train: &'a dyn SampleSource<B::InnerBackend>,
        valid: Option<&'a dyn SampleSource<B::InnerBackend>>,
        ckpt_dir: &'a Path,
        devices: Vec<B::Device>,
    ) -> Result<Self, TrainError> {
        if cfg.batch_size == 0
            || cfg.grad_accum == 0
            || cfg.epochs == 0
            || cfg.keep_checkpoints == 0
            || cfg.log_every == 0
        {
            return Err(TrainError::Config(format!(
                "batch_size {}, grad_accum {}, epochs {}, keep_checkpoints {}, log_every {} \
                 must all be at least 1",
                cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.keep_checkpoints, cfg.log_every
            )));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0 && (0.0..=1.0).contains(&cfg.warmup_ratio)) {
            return Err(TrainError::Config(format!(
                "lr {} must be positive and warmup_ratio {} within [0, 1]",
                cfg.lr, cfg.warmup_ratio
            )));
        }
        let n = cfg.max_samples.map_or(train.len(), |m| m.min(train.len()));
        if n == 0 {
            return Err(TrainError::NoSamples);
        }
        // One device with `grad_accum × D` micro-batches takes the same steps (and can resume
        // the run).
        let micro_batches = cfg.grad_accum * devices.len();
        let window = cfg.batch_size * micro_batches;
        let steps_per_epoch = n.div_ceil(window) as u64;
        let total_steps = steps_per_epoch * cfg.epochs as u64;
        let sched = WarmupCosine {
            peak_lr: cfg.lr,
            warmup_steps: (total_steps as f64 * cfg.warmup_ratio).ceil() as u64,
            total_steps,
        };
        let fingerprint = RunFingerprint {
            samples: n,
            batch_size: cfg.batch_size,
            grad_accum: micro_batches,
            epochs: cfg.epochs,
            seed: cfg.seed,
            lr: cfg.lr,
            warmup_ratio: cfg.warmup_ratio,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            total_steps,
        };
        Ok(Self {
            cfg,
            train,
            valid,
            ckpt_dir,
            devices,
            n,
            window,
            sched,
            fingerprint,
        })
    }
}

/// What a run changes as it goes: the model (LoRA pairs trainable), AdamW, and the position.
struct Run<B: AutodiffKernels> {
    model: Qwen25Vl<B>,
    /// The models of devices 1.. (data parallel), LoRA pairs taken from `model` each step.
    replicas: Vec<Qwen25Vl<B>>,
    opt: AdamW<B::InnerBackend>,
    /// The f16 loss scale, on the device; `state.loss_scaler` is its value at the last read.
    scaler: Option<DeviceScaler<B::InnerBackend>>,
    /// Steps taken since the last read, their figures still on the device.
    unread: Vec<Unread<B::InnerBackend>>,
    /// When the steps in `unread` started (after the last read, validation or checkpoint).
    interval_start: Instant,
    /// Times the metrics were read back from the device.
    reads: u64,
    state: TrainState,
}

/// A step whose metrics are partly on the device until the next read ([`read_metrics`]).
struct Unread<B: Backend> {
    /// Everything the host knows: loss, gradient norm, loss scale, skip and timing are
    /// filled in when read.
    metrics: StepMetrics,
    /// `[loss, grad_norm, loss_scale]` (f32; the scale is 1 without one).
    values: Tensor<B, 1>,
}

impl<B: AutodiffKernels> Run<B> {
    /// Hands the model and state back to the caller, with the best adapter's folder if any.
    fn finish(self, completed: bool, ckpt_dir: &Path) -> TrainOutcome<B> {
        let best_dir = self.state.best.map(|_| ckpt_dir.join("best"));
        TrainOutcome {
            model: self.model,
            state: self.state,
            completed,
            best_dir,
            reads: self.reads,
        }
    }
}

/// Starts from the newest checkpoint of this run when there is one, so an interrupted run
/// continues bit-identically; otherwise from step 0. Also returns the callback's answer to
/// `Resumed` (`Continue` on a fresh start), so a stop is honoured before the first step.
fn resume_or_init<B: AutodiffKernels>(
    model: Qwen25Vl<B>,
    replicas: Vec<Qwen25Vl<B>>,
    ctx: &Ctx<'_, B>,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<(Run<B>, Flow), TrainError> {
    // A kill while the best adapter was being replaced leaves it beside its place.
    recover_dir(&ctx.ckpt_dir.join("best"))?;
    let mut model = model.freeze_except_lora();
    if model.lora_params().is_empty() {
        return Err(TrainError::NoLora);
    }
    let replicas = replicas
        .into_iter()
        .map(|r| r.freeze_except_lora())
        .collect();
    let mut opt = AdamW::<B::InnerBackend>::new(AdamWConfig {
        weight_decay: ctx.cfg.weight_decay,
        max_grad_norm: ctx.cfg.max_grad_norm,
        ..AdamWConfig::default()
    });
    let fresh = TrainState {
        format: checkpoint::CHECKPOINT_FORMAT,
        step: 0,
        epoch: 0,
        next_sample: 0,
        seed: ctx.cfg.seed,
        fingerprint: ctx.fingerprint.clone(),
        best: None,
        history: vec![],
        validations: vec![],
        // f16 flushes small gradients to zero: scale the loss (bf16 and f32 need not).
        loss_scaler: (crate::device::float_dtype::<B>(ctx.device()) == burn::tensor::DType::F16)
            .then(LossScaler::default),
    };
    let run = |model, opt, state: TrainState| Run {
        model,
        replicas,
        opt,
        scaler: state
            .loss_scaler
            .map(|s| DeviceScaler::new(s, ctx.device())),
        unread: Vec::new(),
        interval_start: Instant::now(),
        reads: 0,
        state,
    };
    let Some(saved) = checkpoint::load_latest::<B::InnerBackend>(ctx.ckpt_dir, ctx.device())?
    else {
        return Ok((run(model, opt, fresh), Flow::Continue));
    };
    if saved.state.fingerprint != ctx.fingerprint {
        return Err(TrainError::ResumeMismatch {
            dir: saved.dir,
            saved: Box::new(saved.state.fingerprint),
            now: Box::new(ctx.fingerprint.clone()),
        });
    }
    model.attach_adapter(&saved.adapter, ctx.device())?;
    model = model.freeze_except_lora();
    let ids = model.lora_params();
    for (key, m) in saved.moments {
        let id = ids
            .iter()
            .find(|(_, k)| *k == key)
            .map(|(id, _)| *id)
            .ok_or_else(|| TrainError::UnknownMoment {
                dir: saved.dir.clone(),
                key: key.clone(),
            })?;
        opt.moments.insert(id, m);
    }
    opt.resume_at(saved.opt_step);
    let state = saved.state;
    tracing::info!(step = state.step, dir = %saved.dir.display(), "resuming training");
    let flow = progress(&TrainEvent::Resumed {
        step: state.step,
        dir: &saved.dir,
    });
    Ok((run(model, opt, state), flow))
}

/// Takes one optimizer step on the next window of `order` (the unit checkpoints and the
/// schedule count), leaving its loss and gradient norm on the device ([`Run::unread`]):
/// nothing in a step waits for the device.
fn optimizer_step<B: AutodiffKernels>(
    run: Run<B>,
    indices: &[usize],
    samples: Vec<TrainSample<B::InnerBackend>>,
    ctx: &Ctx<'_, B>,
) -> Result<Run<B>, TrainError> {
    let Run {
        model,
        mut replicas,
        mut opt,
        mut scaler,
        mut unread,
        interval_start,
        reads,
        mut state,
    } = run;
    let (cfg, n) = (ctx.cfg, ctx.n);
    let end = state.next_sample + indices.len();
    let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    let by_length = bucket_by_length(&lens);
    let padding_unbucketed = padding(&lens, &(0..lens.len()).collect::<Vec<_>>(), cfg.batch_size);
    let padding_tokens = padding(&lens, &by_length, cfg.batch_size);
    let mut slots: Vec<Option<_>> = samples.into_iter().map(Some).collect();
    let (samples, indices): (Vec<_>, Vec<usize>) = by_length
        .iter()
        .map(|&k| (slots[k].take().expect("a permutation"), indices[k]))
        .unzip();
    // Micro-batch `k` runs on device `k mod D`.
    let batches = samples
        .chunks(cfg.batch_size)
        .zip(indices.chunks(cfg.batch_size))
        .enumerate()
        .map(|(k, (s, i))| collate(s, i, &ctx.devices[k % ctx.devices.len()]))
        .collect::<Result<Vec<_>, _>>()?;
    let window_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
    let input_tokens: usize = batches.iter().map(|b| b.input_tokens).sum();
    for (replica, device) in replicas.iter_mut().zip(&ctx.devices[1..]) {
        replica.take_lora_from(&model, device);
    }
    let models: Vec<&Qwen25Vl<B>> = std::iter::once(&model).chain(&replicas).collect();
    let scale = scaler.as_ref().map(DeviceScaler::scale);
    let inputs = StepInputs {
        step: state.step,
        window_tokens,
        loss_scale: scale.clone(),
    };
    let PeerSum { grads, loss } = accumulate_gradients(&models, batches, inputs, ctx)?;
    let lr = ctx.sched.lr(state.step);
    let unscale = scale.clone().map(|s| s.recip());
    let (model, stepped) = opt.step_on_device(lr, model, grads, unscale);
    let device = ctx.device();
    let zero = || Tensor::<B::InnerBackend, 1>::zeros([1], device).cast(DType::F32);
    let (grad_norm, applied) = match stepped {
        Some(s) => (s.grad_norm, Some(s.applied)),
        None => (zero(), None),
    };
    if let (Some(scaler), Some(applied)) = (&mut scaler, applied) {
        // An overflow of the scaled gradients: the step changed nothing; like HF's Trainer,
        // it still counts, on a smaller scale next time.
        scaler.update(applied);
    }
    let values = Tensor::cat(
        vec![
            loss.map_or_else(zero, |l| l.cast(DType::F32)),
            grad_norm,
            scale.unwrap_or_else(|| zero().add_scalar(1.0)),
        ],
        0,
    );
    state.step += 1;
    state.next_sample = end;
    let metrics = StepMetrics {
        step: state.step,
        total_steps: ctx.sched.total_steps,
        epoch: state.epoch as f64 + end as f64 / n as f64,
        loss: f64::NAN,
        lr,
        grad_norm: f64::NAN,
        loss_scale: None,
        skipped: false,
        samples: indices.len(),
        input_tokens,
        label_tokens: window_tokens,
        padding_tokens,
        padding_tokens_unbucketed: padding_unbucketed,
        tokens_per_s: f64::NAN,
        samples_per_s: f64::NAN,
    };
    unread.push(Unread { metrics, values });
    Ok(Run {
        model,
        replicas,
        opt,
        scaler,
        unread,
        interval_start,
        reads,
        state,
    })
}

/// Reads back the figures of the steps taken since the last read, in one transfer with
/// AdamW's count of applied steps and the loss scale; records the steps' metrics and
/// reports them. The wall time since the interval started is shared out evenly among the
/// steps (the device ran them back to back). Returns the callback's answer (`Stop` if any
/// step's was).
///
/// # Errors
/// A non-finite loss, or a non-finite gradient without loss scaling, naming the first step
/// that had it (the step changed nothing; the run stops before any later checkpoint).
fn read_metrics<B: AutodiffKernels>(
    run: &mut Run<B>,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<Flow, TrainError> {
    let unread = std::mem::take(&mut run.unread);
    if unread.is_empty() {
        return Ok(Flow::Continue);
    }
    let mut values: Vec<Tensor<B::InnerBackend, 1>> =
        unread.iter().map(|u| u.values.clone()).collect();
    let applied = run.opt.unsettled();
    if let Some(a) = &applied {
        values.push(a.clone().float().cast(DType::F32));
    }
    if let Some(s) = &run.scaler {
        values.push(s.values());
    }
    let read = read_back(values)?;
    run.reads += 1;
    let (steps, rest) = read.split_at(3 * unread.len());
    let mut rest = rest.iter().copied();
    if applied.is_some() {
        run.opt.settle(rest.next().unwrap_or(0.0) as u64);
    }
    if run.scaler.is_some() {
        let v = [rest.next().unwrap_or(0.0), rest.next().unwrap_or(0.0)];
        run.state.loss_scaler = Some(DeviceScaler::<B::InnerBackend>::read(v));
    }
    let secs = run.interval_start.elapsed().as_secs_f64().max(1e-9) / unread.len() as f64;
    run.interval_start = Instant::now();
    let mut flow = Flow::Continue;
    for (u, v) in unread.into_iter().zip(steps.chunks_exact(3)) {
        let (loss, grad_norm, scale) = (v[0], v[1], v[2]);
        let mut m = u.metrics;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { step: m.step, loss });
        }
        let applied = grad_norm.is_finite();
        if !applied && run.scaler.is_none() {
            return Err(TrainError::NonFiniteGradient {
                step: m.step,
                norm: grad_norm,
            });
        }
        m.loss = loss;
        m.grad_norm = if applied { grad_norm } else { 0.0 };
        m.loss_scale = run.scaler.is_some().then_some(scale);
        m.skipped = !applied;
        m.tokens_per_s = m.input_tokens as f64 / secs;
        m.samples_per_s = m.samples as f64 / secs;
        tracing::debug!(step = m.step, loss, lr = m.lr, grad_norm, "train step");
        if progress(&TrainEvent::Step(&m)) == Flow::Stop {
            flow = Flow::Stop;
        }
        run.state.history.push(m);
    }
    Ok(flow)
}

/// The order in which a window's samples (of `lens` tokens) fill its micro-batches: by
/// length, ties in window order, so each micro-batch pads to a length close to its rows'.
/// The window's gradient does not depend on the grouping (each micro-batch's loss is its
/// token sum over the window's tokens), and the order is a function of the window, so a
/// resumed run groups as the uninterrupted one did.
fn bucket_by_length(lens: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&k| lens[k]); // stable
    order
}

/// Padding tokens of micro-batches of `batch` rows taken from `lens` in `order`.
fn padding(lens: &[usize], order: &[usize], batch: usize) -> usize {
    order
        .chunks(batch.max(1))
        .map(|c| {
            let longest = c.iter().map(|&k| lens[k]).max().unwrap_or(0);
            c.iter().map(|&k| longest - lens[k]).sum::<usize>()
        })
        .sum()
}

/// What every micro-batch of one optimizer step shares.
#[derive(Debug, Clone)]
struct StepInputs<B: Backend> {
    /// Optimizer step being taken (0-based; seeds the dropout).
    step: u64,
    /// Counted label tokens of the whole window.
    window_tokens: usize,
    /// f16 loss scale (`[1]` on the first device; `None` without scaling).
    loss_scale: Option<Tensor<B, 1>>,
}

/// Gradients and loss (`None`: no micro-batch) summed over micro-batches, left on the
/// device: one device's part of a step, or the whole step's.
struct PeerSum<B: Kernels> {
    grads: GradientsParams,
    loss: Option<Tensor<B, 1>>,
}

/// Forward and backward over the micro-batches of one window, summing their gradients, so
/// gradient accumulation equals one large batch; returns the gradients and the window's loss
/// (on the first device).
///
/// `models[p]` is device `p`'s model (`models[0]` the one AdamW steps). With more than one,
/// micro-batch `k` runs on device `k mod D`, each device on its own thread, and
/// burn-collective then sums the peers' gradients onto the first device. The reduction starts
/// only once every peer has succeeded, so an error on one cannot leave the others waiting in
/// a collective call.
fn accumulate_gradients<B: AutodiffKernels>(
    models: &[&Qwen25Vl<B>],
    batches: Vec<Batch<B::InnerBackend>>,
    inputs: StepInputs<B::InnerBackend>,
    ctx: &Ctx<'_, B>,
) -> Result<PeerSum<B::InnerBackend>, TrainError> {
    let peers = models.len();
    let mut shares: Vec<Vec<_>> = (0..peers).map(|_| Vec::new()).collect();
    for (k, batch) in batches.into_iter().enumerate() {
        shares[k % peers].push((k, batch));
    }
    let sums = if peers == 1 {
        let micro = shares.pop().unwrap_or_default();
        vec![peer_pass(
            models[0],
            ctx.device(),
            micro,
            inputs,
            false,
            ctx,
        )?]
    } else {
        let results: Vec<_> = std::thread::scope(|scope| {
            let running: Vec<_> = models
                .iter()
                .zip(&ctx.devices)
                .zip(shares)
                .map(|((m, device), micro)| {
                    let inputs = inputs.clone();
                    scope.spawn(move || peer_pass(m, device, micro, inputs, true, ctx))
                })
                .collect();
            running
                .into_iter()
                .map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        results.into_iter().collect::<Result<Vec<_>, _>>()?
    };
    // The peers' losses summed on the first device, in peer order.
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut grads = Vec::with_capacity(peers);
    for sum in sums {
        grads.push(sum.grads);
        if let Some(loss) = sum.loss {
            let loss = loss.to_device(ctx.device());
            loss_sum = Some(loss_sum.map_or(loss.clone(), |s| s + loss));
        }
    }
    let grads = if peers == 1 {
        grads.pop().unwrap_or_default()
    } else {
        Peers::<B::InnerBackend>::reduce(grads, &models[0].lora_params(), &ctx.devices)?
    };
    Ok(PeerSum {
        grads,
        loss: loss_sum,
    })
}

/// Values left on the device, read back in one transfer as f64 (in order).
fn read_back<B: Backend>(values: Vec<Tensor<B, 1>>) -> Result<Vec<f64>, TrainError> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let values = values.into_iter().map(|t| t.cast(DType::F32)).collect();
    let read = Tensor::cat(values, 0)
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| TrainError::Readback(format!("{e:?}")))?;
    Ok(read.into_iter().map(f64::from).collect())
}

/// The micro-batches `micro` (window index, batch) of one device through `model` there.
fn peer_pass<B: AutodiffKernels>(
    model: &Qwen25Vl<B>,
    device: &B::Device,
    micro: Vec<(usize, Batch<B::InnerBackend>)>,
    inputs: StepInputs<B::InnerBackend>,
    concurrent: bool,
    ctx: &Ctx<'_, B>,
) -> Result<PeerSum<B::InnerBackend>, TrainError> {
    let pass = Pass {
        model,
        device,
        recompute: ctx.cfg.recompute,
        window_tokens: inputs.window_tokens,
        loss_scale: inputs.loss_scale,
        concurrent,
    };
    let mut accum = GradientsAccumulator::<Qwen25Vl<B>>::new();
    let mut loss: Option<Tensor<B::InnerBackend, 1>> = None;
    for (k, batch) in micro {
        let seed = dropout_seed(ctx.cfg.seed, inputs.step, k);
        let l = pass.run(to_autodiff::<B>(batch), seed, &mut accum)?;
        loss = Some(match loss {
            Some(sum) => sum + l,
            None => l,
        });
    }
    Ok(PeerSum {
        grads: accum.grads(),
        loss,
    })
}

/// Moves the cursor to the next epoch once this one's samples are used up; returns whether
/// it did (an epoch end is when validation is always due).
fn end_epoch_if_done(state: &mut TrainState, n: usize) -> bool {
    let epoch_done = state.next_sample >= n;
    if epoch_done {
        state.epoch += 1;
        state.next_sample = 0;
    }
    epoch_done
}

/// Whether a validation runs after this step: at each epoch end and every `eval_every`
/// steps, when there are validation samples.
fn validation_due<B: AutodiffKernels>(
    state: &TrainState,
    epoch_done: bool,
    ctx: &Ctx<'_, B>,
) -> bool {
    let eval_due = ctx
        .cfg
        .eval_every
        .is_some_and(|e| e > 0 && state.step.is_multiple_of(e));
    ctx.valid.is_some_and(|v| !v.is_empty()) && (epoch_done || eval_due)
}

/// Validates, keeping the best adapter so far on disk; returns the callback's answer.
fn run_validation<B: AutodiffKernels>(
    run: &mut Run<B>,
    ctx: &Ctx<'_, B>,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<Flow, TrainError> {
    let Some(valid) = ctx.valid else {
        return Ok(Flow::Continue);
    };
    let state = &mut run.state;
    let (loss, tokens) = validate(&run.model, valid, ctx.cfg.batch_size, ctx.device())?;
    let best = state.best.is_none_or(|b| loss < b.loss);
    if best {
        save_best(&run.model, ctx.ckpt_dir, state.step, loss)?;
        state.best = Some(BestVal {
            step: state.step,
            loss,
        });
    }
    let v = ValMetrics {
        step: state.step,
        epoch: state.epoch as f64 + state.next_sample as f64 / ctx.n as f64,
        loss,
        tokens,
        best,
    };
    let flow = progress(&TrainEvent::Validation(&v));
    state.validations.push(v);
    Ok(flow)
}

/// Whether a checkpoint is committed after this step: every `checkpoint_every` steps and at
/// the end, so a killed run loses little.
fn checkpoint_due<B: AutodiffKernels>(
    state: &TrainState,
    finished: bool,
    ctx: &Ctx<'_, B>,
) -> bool {
    finished
        || ctx
            .cfg
            .checkpoint_every
            .is_some_and(|c| c > 0 && state.step.is_multiple_of(c))
}

/// Commits a checkpoint (pruning to the newest `keep_checkpoints`); returns the callback's
/// answer. The metrics must have been read ([`read_metrics`]): the state saved is the host's.
fn save_checkpoint<B: AutodiffKernels>(
    run: &Run<B>,
    ctx: &Ctx<'_, B>,
    progress: &mut dyn FnMut(&TrainEvent<'_>) -> Flow,
) -> Result<Flow, TrainError> {
    let adapter = run.model.export_adapter(None)?;
    let dir = checkpoint::save(
        ctx.ckpt_dir,
        &run.state,
        &adapter,
        &run.opt,
        &run.model.lora_params(),
    )?;
    checkpoint::prune(ctx.ckpt_dir, ctx.cfg.keep_checkpoints)?;
    Ok(progress(&TrainEvent::Checkpoint {
        step: run.state.step,
        dir: &dir,
    }))
}

fn to_autodiff<B: AutodiffKernels>(b: Batch<B::InnerBackend>) -> AdBatch<B> {
    AdBatch {
        ids: b.input_ids,
        valid: b.attention_mask,
        labels: Tensor::from_inner(b.labels),
        images: b.images.map(|i| ImageInput {
            pixel_values: Tensor::from_inner(i.pixel_values),
            grids: i.grids,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraSpec;
    use crate::model::qwen::tests::{image, reference};
    use crate::test_util::{fixture, TB};
    use crate::train::batch::TrainSample;
    use crate::train::config::Recompute;
    use crate::train::loss::IGNORE_INDEX;
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    use std::collections::{BTreeMap, HashSet};

    type AD = burn::backend::Autodiff<TB>;

    fn model() -> Qwen25Vl<AD> {
        model_on::<AD>(&Default::default(), 0.0)
    }

    /// The tiny fixture with fresh LoRA pairs (r 4) on `dev` of backend `A`.
    fn model_on<A: AutodiffKernels>(dev: &A::Device, dropout: f64) -> Qwen25Vl<A> {
        let mut m = Qwen25Vl::<A>::load(&fixture("qwen2_5_vl_tiny"), dev).unwrap();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout,
            seed: 11,
        };
        m.add_lora(&spec, dev);
        m
    }

    /// Every LoRA pair's A and B values, in site order.
    fn adapter_values<A: AutodiffKernels>(m: &Qwen25Vl<A>) -> Vec<Vec<f32>> {
        let adapter = m.export_adapter(None).unwrap();
        adapter
            .pairs
            .into_values()
            .flat_map(|w| [w.a, w.b])
            .collect()
    }

    /// A text sample: `len` tokens from `start`, the loss on the last half.
    fn text(start: u32, len: usize) -> TrainSample<TB> {
        let ids: Vec<u32> = (0..len as u32)
            .map(|i| 100 + (start + 37 * i) % 1800)
            .collect();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < len / 2 { IGNORE_INDEX } else { t as i64 })
            .collect();
        TrainSample {
            input_ids: ids,
            labels,
            images: None,
        }
    }

    /// The fixture prompt with its image; the loss on the last 12 tokens.
    fn with_image() -> TrainSample<TB> {
        let r = reference();
        let n = r.input_ids.len();
        let labels = r
            .input_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < n - 12 { IGNORE_INDEX } else { t as i64 })
            .collect();
        TrainSample {
            input_ids: r.input_ids.clone(),
            labels,
            images: Some(image(&r)),
        }
    }

    fn config() -> TrainConfig {
        TrainConfig {
            lr: 1e-2,
            warmup_ratio: 0.25,
            epochs: 2,
            batch_size: 2,
            grad_accum: 2,
            max_grad_norm: Some(1.0),
            weight_decay: 0.01,
            seed: 7,
            checkpoint_every: Some(1),
            eval_every: None,
            max_samples: None,
            keep_checkpoints: 2,
            recompute: Default::default(),
            log_every: 1,
        }
    }

    fn run(
        samples: &dyn SampleSource<TB>,
        valid: Option<&dyn SampleSource<TB>>,
        cfg: &TrainConfig,
        dir: &Path,
        stop_at: Option<u64>,
    ) -> TrainOutcome<AD> {
        let mut cb = |e: &TrainEvent<'_>| match e {
            TrainEvent::Checkpoint { step, .. } if Some(*step) == stop_at => Flow::Stop,
            _ => Flow::Continue,
        };
        let _rng = crate::test_util::backend_rng();
        train(
            model(),
            samples,
            valid,
            cfg,
            dir,
            &Default::default(),
            &mut cb,
        )
        .unwrap()
    }

    /// Every float param except the LoRA ones, by id.
    fn frozen_params(m: &Qwen25Vl<AD>) -> BTreeMap<String, Vec<f32>> {
        struct Collect {
            skip: HashSet<ParamId>,
            out: BTreeMap<String, Vec<f32>>,
        }
        impl ModuleVisitor<AD> for Collect {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AD, D>>) {
                if !self.skip.contains(&p.id) {
                    let v = p.val().into_data().to_vec::<f32>().unwrap();
                    self.out.insert(p.id.to_string(), v);
                }
            }
        }
        let mut c = Collect {
            skip: m.lora_params().into_iter().map(|(id, _)| id).collect(),
            out: BTreeMap::new(),
        };
        m.visit(&mut c);
        c.out
    }

    #[test]
    fn a_run_interrupted_after_checkpoints_and_resumed_ends_with_the_identical_adapter() {
        let img = with_image();
        for (label, samples) in [
            (
                "text only",
                (0..6)
                    .map(|i| text(i * 50, 10 + i as usize))
                    .collect::<Vec<_>>(),
            ),
            (
                "with image",
                vec![text(1, 12), img.clone(), text(2, 9), img, text(3, 14)],
            ),
        ] {
            let cfg = config();
            let whole = tempfile::tempdir().unwrap();
            let straight = run(&samples, None, &cfg, whole.path(), None);
            assert!(straight.completed);
            assert_eq!(straight.state.step, 4, "{label}: 2 epochs x 2 windows");
            let parts = tempfile::tempdir().unwrap();
            // Stop mid-epoch (step 1), at an epoch boundary (step 2), then finish.
            let first = run(&samples, None, &cfg, parts.path(), Some(1));
            assert!(!first.completed);
            assert_eq!(first.state.step, 1);
            let second = run(&samples, None, &cfg, parts.path(), Some(2));
            assert_eq!(second.state.step, 2);
            let last = run(&samples, None, &cfg, parts.path(), None);
            assert!(last.completed, "{label}");
            let a = straight.model.export_adapter(None).unwrap();
            let b = last.model.export_adapter(None).unwrap();
            assert!(
                a.pairs.values().any(|w| w.b.iter().any(|&x| x != 0.0)),
                "{label}: training moved the adapter"
            );
            assert_eq!(a.pairs, b.pairs, "{label}: bit-identical LoRA weights");
            let losses =
                |o: &TrainOutcome<AD>| o.state.history.iter().map(|m| m.loss).collect::<Vec<_>>();
            assert_eq!(
                losses(&straight),
                losses(&last),
                "{label}: same per-step losses"
            );
            let opt =
                |d: &Path| std::fs::read(d.join("step-00000004/optimizer.safetensors")).unwrap();
            assert_eq!(
                opt(whole.path()),
                opt(parts.path()),
                "{label}: same AdamW moments"
            );
            let kept: Vec<u64> = checkpoint::list(parts.path())
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(
                kept,
                vec![3, 4],
                "{label}: the newest two checkpoints are kept"
            );
        }
    }

    /// Reading the metrics every 3 steps instead of every step changes when the host
    /// learns them, not what is computed: the same losses, norms, adapter and AdamW state,
    /// bit for bit, with 3 reads instead of 7, and every step reported in order.
    #[test]
    fn reading_metrics_every_third_step_trains_exactly_what_reading_each_step_does() {
        let samples: Vec<_> = (0..7).map(|i| text(i * 31, 8 + i as usize)).collect();
        let outcome = |log_every: u64, dir: &Path| {
            let cfg = TrainConfig {
                epochs: 1,
                batch_size: 1,
                grad_accum: 1,
                checkpoint_every: None,
                log_every,
                ..config()
            };
            let mut events = Vec::new();
            let mut cb = |e: &TrainEvent<'_>| {
                match e {
                    TrainEvent::Stepped { step } => events.push(format!("stepped {step}")),
                    TrainEvent::Step(m) => events.push(format!("metrics {}", m.step)),
                    _ => {}
                }
                Flow::Continue
            };
            let _rng = crate::test_util::backend_rng();
            let out = train(
                model(),
                &samples,
                None,
                &cfg,
                dir,
                &Default::default(),
                &mut cb,
            )
            .unwrap();
            (out, events)
        };
        let figures = |o: &TrainOutcome<AD>| {
            o.state
                .history
                .iter()
                .map(|m| (m.step, m.loss, m.grad_norm, m.lr, m.samples, m.skipped))
                .collect::<Vec<_>>()
        };
        let (each, third_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, a_events) = outcome(1, each.path());
        let (b, b_events) = outcome(3, third_dir.path());
        assert_eq!(figures(&a), figures(&b));
        assert!(figures(&a).iter().all(|f| f.1.is_finite() && f.2 > 0.0));
        assert_eq!(adapter_values(&a.model), adapter_values(&b.model));
        let opt = |d: &Path| std::fs::read(d.join("step-00000007/optimizer.safetensors")).unwrap();
        assert_eq!(
            opt(each.path()),
            opt(third_dir.path()),
            "AdamW moments and count"
        );
        assert_eq!(
            (a.reads, b.reads),
            (7, 3),
            "reads at steps 3, 6 and the end"
        );
        let interleaved: Vec<String> = (1..=7)
            .flat_map(|s| [format!("stepped {s}"), format!("metrics {s}")])
            .collect();
        assert_eq!(a_events, interleaved);
        let grouped = [
            "stepped 1",
            "stepped 2",
            "stepped 3",
            "metrics 1",
            "metrics 2",
            "metrics 3",
            "stepped 4",
            "stepped 5",
            "stepped 6",
            "metrics 4",
            "metrics 5",
            "metrics 6",
            "stepped 7",
            "metrics 7",
        ];
        assert_eq!(b_events, grouped);
        // Each step's time is its share of its interval: all three of an interval agree.
        let rate: Vec<f64> = b.state.history.iter().map(|m| m.samples_per_s).collect();
        assert!(rate.iter().all(|r| r.is_finite() && *r > 0.0));
        assert_eq!((rate[0], rate[3]), (rate[2], rate[5]));
    }

    #[test]
    fn loss_falls_on_an_overfit_set_and_frozen_weights_stay_byte_identical() {
        let samples = vec![text(5, 12), with_image()];
        let valid = samples.clone();
        let cfg = TrainConfig {
            lr: 2e-2,
            warmup_ratio: 0.0,
            epochs: 8,
            batch_size: 2,
            grad_accum: 1,
            checkpoint_every: None,
            eval_every: Some(4),
            ..config()
        };
        let dir = tempfile::tempdir().unwrap();
        let m = model();
        let before = frozen_params(&m);
        let mut events = Vec::new();
        let mut cb = |e: &TrainEvent<'_>| {
            events.push(format!("{e:?}"));
            Flow::Continue
        };
        let _rng = crate::test_util::backend_rng();
        let out = train(
            m,
            &samples,
            Some(&valid as &dyn SampleSource<TB>),
            &cfg,
            dir.path(),
            &Default::default(),
            &mut cb,
        )
        .unwrap();
        let h = &out.state.history;
        assert_eq!(h.len(), 8);
        let (first, last) = (h[0].loss, h[7].loss);
        // Measured 7.87 -> 5.14 nats (0.65x) in 8 clipped steps; a frozen adapter (no update
        // reaching the LoRA params) keeps the ratio at 1.
        assert!(last < 0.8 * first, "loss {first} -> {last}");
        assert!(h.iter().all(|m| m.grad_norm > 0.0 && m.tokens_per_s > 0.0));
        assert_eq!(
            h[0].label_tokens,
            6 + 12,
            "half of 12 text tokens + 12 answer tokens"
        );
        // validation at each epoch end (8) plus every 4 steps (coinciding): 8 passes
        assert_eq!(out.state.validations.len(), 8);
        let best = out.state.best.unwrap();
        let min = out
            .state
            .validations
            .iter()
            .map(|v| v.loss)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(best.loss, min);
        let best_dir = out.best_dir.clone().unwrap();
        let saved: BestVal =
            serde_json::from_slice(&std::fs::read(best_dir.join("best.json")).unwrap()).unwrap();
        assert_eq!(saved, best);
        crate::model::lora::Adapter::load(&best_dir).unwrap();
        assert!(events.iter().any(|e| e.starts_with("Validation")));
        let after = frozen_params(&out.model);
        assert_eq!(after.len(), before.len());
        let changed = before
            .iter()
            .filter(|(id, v)| after.get(*id) != Some(v))
            .count();
        assert_eq!(
            changed, 0,
            "frozen params (bases, vision, norms, embeddings) changed"
        );
    }

    #[test]
    fn resuming_with_another_batch_size_is_refused_naming_the_checkpoint() {
        let samples: Vec<_> = (0..4).map(|i| text(i, 8)).collect();
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig {
            epochs: 1,
            ..config()
        };
        run(&samples, None, &cfg, dir.path(), Some(1));
        let other = TrainConfig {
            batch_size: 1,
            ..cfg
        };
        let e = train(
            model(),
            &samples,
            None,
            &other,
            dir.path(),
            &Default::default(),
            &mut |_| Flow::Continue,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("step-00000001") && e.contains("batch_size: 2"),
            "{e}"
        );
    }

    /// Trains on 7 text samples (the last window short) with LoRA dropout 0.2, on one device
    /// or on `peers` CPU peers (one replica each), stopping after checkpoint `stop_at`;
    /// returns the outcome and the adapter's pairs.
    fn parallel_run(
        peers: usize,
        grad_accum: usize,
        dir: &Path,
        stop_at: Option<u64>,
    ) -> (TrainOutcome<AD>, Vec<Vec<f32>>) {
        parallel_run_on::<AD>(&Default::default(), peers, grad_accum, dir, stop_at)
    }

    /// [`parallel_run`] on `device` of backend `A` (every peer on that device).
    fn parallel_run_on<A: AutodiffKernels>(
        device: &A::Device,
        peers: usize,
        grad_accum: usize,
        dir: &Path,
        stop_at: Option<u64>,
    ) -> (TrainOutcome<A>, Vec<Vec<f32>>) {
        let samples: Vec<TrainSample<A::InnerBackend>> = (0..7)
            .map(|i| {
                let t = text(i * 31, 8 + 3 * i as usize);
                TrainSample {
                    input_ids: t.input_ids,
                    labels: t.labels,
                    images: None,
                }
            })
            .collect();
        let cfg = TrainConfig {
            grad_accum,
            epochs: 2,
            checkpoint_every: Some(1),
            keep_checkpoints: 1,
            ..config()
        };
        let model = || model_on::<A>(device, 0.2);
        let replicas = (1..peers)
            .map(|_| Replica {
                model: model(),
                device: device.clone(),
            })
            .collect();
        let mut cb = |e: &TrainEvent<'_>| match e {
            TrainEvent::Checkpoint { step, .. } if Some(*step) == stop_at => Flow::Stop,
            _ => Flow::Continue,
        };
        let _rng = crate::test_util::backend_rng();
        let out = train_parallel(
            model(),
            replicas,
            &samples,
            None,
            &cfg,
            dir,
            device,
            &mut cb,
        )
        .unwrap();
        let pairs = adapter_values(&out.model);
        (out, pairs)
    }

    /// Two peers on lavapipe's one device: the fused backend runs a dropout draw lazily, so
    /// this proves the draws of concurrent peers keep their own seeds there too (a wrong
    /// mask at dropout 0.2 moves the loss by percents). Not bit for bit, unlike the CPU:
    /// both peers' ops share the device's fusion streams, and where one peer's sync cuts the
    /// other's fused blocks depends on timing, which can move the last bits of a gradient.
    #[test]
    fn two_wgpu_peers_end_with_the_adapter_of_one_wgpu_device() {
        type W = burn::backend::Autodiff<burn::backend::Wgpu>;
        if !crate::test_util::wgpu_available(
            "two_wgpu_peers_end_with_the_adapter_of_one_wgpu_device",
        ) {
            return;
        }
        let dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
        let dir = tempfile::tempdir().unwrap();
        let (one, one_pairs) = parallel_run_on::<W>(&dev, 1, 2, &dir.path().join("one"), None);
        let (two, two_pairs) = parallel_run_on::<W>(&dev, 2, 1, &dir.path().join("two"), None);
        assert_eq!(two.state.history.len(), one.state.history.len());
        for (a, b) in two.state.history.iter().zip(&one.state.history) {
            assert!(
                (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
                "{a:?} vs {b:?}"
            );
        }
        let (x, y) = (two_pairs.concat(), one_pairs.concat());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_abs_diff(&x, &y) <= 1e-5 * scale,
            "{}",
            max_abs_diff(&x, &y)
        );
    }

    #[test]
    fn two_devices_end_with_the_adapter_of_one_device_running_both_micro_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (one, one_pairs) = parallel_run(1, 2, &dir.path().join("one"), None);
        let (two, two_pairs) = parallel_run(2, 1, &dir.path().join("two"), None);
        // Each step: micro-batch 0 on device 0, micro-batch 1 on device 1, with the dropout
        // masks each has on one device; the sum of two gradients is the same in any order,
        // so every bit agrees: losses, gradient norms, adapter, AdamW moments.
        let h = |o: &TrainOutcome<AD>| -> Vec<(f64, f64, usize)> {
            o.state
                .history
                .iter()
                .map(|m| (m.loss, m.grad_norm, m.samples))
                .collect()
        };
        assert_eq!(h(&two), h(&one));
        // 7 samples, 4 per step: a full and a short window per epoch.
        assert_eq!(two.state.history.len(), 4);
        assert_eq!(two.state.history[1].samples, 3);
        assert_eq!(two_pairs, one_pairs);
        let moments = |d: &Path| {
            let (step, ckpt) = checkpoint::list(d).unwrap().pop().unwrap();
            (
                step,
                std::fs::read(ckpt.join("optimizer.safetensors")).unwrap(),
            )
        };
        assert_eq!(
            moments(&dir.path().join("two")),
            moments(&dir.path().join("one"))
        );
        // The update is real: the adapter moved from its initialization.
        let fresh = adapter_values(&model_on::<AD>(&Default::default(), 0.2));
        assert_eq!(fresh.len(), one_pairs.len());
        assert_ne!(fresh, one_pairs);
    }

    #[test]
    fn two_devices_with_accumulation_match_one_device_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (one, one_pairs) = parallel_run(1, 4, &dir.path().join("one"), None);
        let (two, two_pairs) = parallel_run(2, 2, &dir.path().join("two"), None);
        // 7 samples, 8 per step: one window of four micro-batches per epoch. Two micro-batches
        // per device: the peers sum (0 + 2) and (1 + 3), one device
        // ((0 + 1) + 2) + 3, so the results agree to rounding, not bit for bit.
        assert_eq!(two.state.history.len(), one.state.history.len());
        for (a, b) in two.state.history.iter().zip(&one.state.history) {
            assert!(
                (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
                "{a:?} vs {b:?}"
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-5 * b.grad_norm,
                "{a:?} vs {b:?}"
            );
        }
        let flat = |p: &[Vec<f32>]| p.concat();
        let (x, y) = (flat(&two_pairs), flat(&one_pairs));
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_abs_diff(&x, &y) <= 1e-5 * scale,
            "{}",
            max_abs_diff(&x, &y)
        );

        // Interrupted after step 1 and resumed, on two devices: the same bits as the
        // uninterrupted two-device run.
        let resumed = dir.path().join("resumed");
        let (stopped, _) = parallel_run(2, 2, &resumed, Some(1));
        assert!(!stopped.completed);
        let (again, again_pairs) = parallel_run(2, 2, &resumed, None);
        assert!(again.completed);
        assert_eq!(again_pairs, two_pairs);
        let losses =
            |o: &TrainOutcome<AD>| o.state.history.iter().map(|m| m.loss).collect::<Vec<_>>();
        assert_eq!(losses(&again), losses(&two));
        // And one device, told to accumulate what the two devices did, resumes that run.
        let (stopped, _) = parallel_run(2, 2, &dir.path().join("mixed"), Some(1));
        assert!(!stopped.completed);
        let (finished, _) = parallel_run(1, 4, &dir.path().join("mixed"), None);
        assert_eq!(
            finished.state.history.len(),
            2,
            "one 7-sample window per epoch"
        );
        assert_eq!(finished.state.history[0].loss, two.state.history[0].loss);
    }

    #[test]
    fn a_model_without_lora_pairs_is_refused() {
        let m = Qwen25Vl::<AD>::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let samples = vec![text(0, 8)];
        let e = train(
            m,
            &samples,
            None,
            &config(),
            dir.path(),
            &Default::default(),
            &mut |_| Flow::Continue,
        )
        .unwrap_err();
        assert!(matches!(e, TrainError::NoLora), "{e}");
    }

    #[test]
    fn each_epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(7, 0, 10);
        assert_eq!(a, epoch_order(7, 0, 10));
        assert_ne!(a, epoch_order(7, 1, 10));
        assert_ne!(a, epoch_order(8, 0, 10));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_run_with_recomputed_layers_ends_where_a_plain_one_does_even_resumed_without() {
        let samples = vec![
            text(1, 12),
            with_image(),
            text(2, 9),
            text(3, 14),
            text(4, 7),
        ];
        let plain = config();
        let recomputed = TrainConfig {
            recompute: "layers".parse().unwrap(),
            ..config()
        };
        let a_dir = tempfile::tempdir().unwrap();
        let a = run(&samples, None, &plain, a_dir.path(), None);
        // The setting is not part of the run: a checkpoint of one resumes under the other.
        let b_dir = tempfile::tempdir().unwrap();
        let first = run(&samples, None, &recomputed, b_dir.path(), Some(2));
        assert_eq!(first.state.step, 2);
        let b = run(&samples, None, &plain, b_dir.path(), None);
        assert!(b.completed && b.state.step == a.state.step);
        for (x, y) in a.state.history.iter().zip(&b.state.history) {
            assert!(
                (x.loss - y.loss).abs() <= 1e-6 * x.loss.abs(),
                "step {}",
                x.step
            );
        }
        let (a, b) = (
            a.model.export_adapter(None).unwrap(),
            b.model.export_adapter(None).unwrap(),
        );
        for (site, w) in &a.pairs {
            let v = &b.pairs[site];
            for (x, y) in [(&w.a, &v.a), (&w.b, &v.b)] {
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
                let d = max_abs_diff(x, y);
                assert!(d <= 1e-5 * scale, "{site:?}: {d} of {scale}");
            }
        }
    }

    /// A 5-layer builtin model (so `every_n:2` makes uneven segments) with LoRA pairs under
    /// dropout 0.2, and one micro-batch of two text rows, the shorter one padded.
    fn five_layers() -> (tempfile::TempDir, Qwen25Vl<AD>, Batch<TB>) {
        use crate::builtin::{self, spec::TinySpec};
        let tmp = tempfile::tempdir().unwrap();
        let corpus = builtin::tokenizer_corpus(0, 100);
        let dir = builtin::materialize_with(&tmp.path().join("m"), 3, &corpus, |vocab| {
            let mut s = TinySpec::tiny(vocab);
            s.num_hidden_layers = 5;
            s
        })
        .unwrap()
        .dir;
        let dev = Default::default();
        let mut m = Qwen25Vl::<AD>::load(&dir, &dev).unwrap();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.2,
            seed: 11,
        };
        m.add_lora(&spec, &dev);
        let m = m.freeze_except_lora();
        let vocab = m.config().text.vocab_size as u32;
        let rows = [text(5, 20), text(9, 33)].map(|mut r| {
            r.input_ids.iter_mut().for_each(|t| *t %= vocab);
            r.labels
                .iter_mut()
                .filter(|l| **l >= 0)
                .for_each(|l| *l %= vocab as i64);
            r
        });
        let batch = collate(&rows, &[0, 1], &dev).unwrap();
        (tmp, m, batch)
    }

    /// One micro-batch's loss and LoRA gradients (by param id) under `recompute`.
    fn gradients(
        m: &Qwen25Vl<AD>,
        batch: &Batch<TB>,
        recompute: Recompute,
        seed: u64,
    ) -> (f64, BTreeMap<ParamId, Vec<f32>>) {
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: BTreeMap<ParamId, Vec<f32>>,
        }
        impl ModuleVisitor<AD> for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AD, D>>) {
                if let Some(g) = self.grads.get::<TB, D>(p.id) {
                    self.out
                        .insert(p.id, g.into_data().to_vec::<f32>().unwrap());
                }
            }
        }
        let pass = Pass {
            model: m,
            device: &Default::default(),
            recompute,
            window_tokens: batch.label_tokens,
            loss_scale: None,
            concurrent: false,
        };
        let mut accum = GradientsAccumulator::<Qwen25Vl<AD>>::new();
        let loss = pass
            .run(to_autodiff::<AD>(batch.clone()), seed, &mut accum)
            .unwrap()
            .into_scalar()
            .elem::<f64>();
        let grads = accum.grads();
        let mut c = Collect {
            grads: &grads,
            out: BTreeMap::new(),
        };
        m.visit(&mut c);
        (loss, c.out)
    }

    #[test]
    fn recomputed_layers_give_the_gradients_of_a_plain_backward_dropout_included() {
        let _rng = crate::test_util::backend_rng();
        let (_tmp, m, batch) = five_layers();
        let (loss, plain) = gradients(&m, &batch, Recompute::None, 21);
        // Every LoRA pair of the 5 layers (7 targets, A and B) has a gradient, and nothing
        // else does: the base stays frozen.
        assert_eq!(plain.len(), 5 * 7 * 2);
        // Dropout is live: another seed draws other masks and other gradients, so equal
        // gradients below mean the reruns drew the masks of the first run.
        let (_, reseeded) = gradients(&m, &batch, Recompute::None, 22);
        let moved = plain
            .iter()
            .map(|(id, g)| max_abs_diff(g, &reseeded[id]))
            .fold(0.0, f32::max);
        assert!(moved > 1e-4, "dropout changed nothing ({moved})");
        for setting in ["layers", "every_n:2", "every_n:5"] {
            let r: Recompute = setting.parse().unwrap();
            let (l, got) = gradients(&m, &batch, r, 21);
            assert!(
                (l - loss).abs() <= 1e-6 * loss.abs(),
                "{setting}: loss {l} vs {loss}"
            );
            assert_eq!(got.len(), plain.len(), "{setting}");
            for (id, want) in &plain {
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-12);
                let d = max_abs_diff(&got[id], want);
                assert!(d <= 1e-6 * scale, "{setting}: param {id}: {d} of {scale}");
            }
        }
    }

    #[test]
    fn a_windows_micro_batches_group_samples_of_similar_length() {
        // Shuffled lengths, micro-batches of 2: in window order every pair pads a lot.
        let lens = [10, 300, 12, 290, 11, 305];
        let order = bucket_by_length(&lens);
        assert_eq!(order, vec![0, 4, 2, 3, 1, 5]);
        assert_eq!(padding(&lens, &[0, 1, 2, 3, 4, 5], 2), 290 + 278 + 294);
        assert_eq!(padding(&lens, &order, 2), 1 + 278 + 5);
        // Equal lengths keep the window order.
        assert_eq!(bucket_by_length(&[7, 7, 7]), vec![0, 1, 2]);
    }

    #[test]
    fn the_window_loaded_ahead_is_the_one_the_next_step_takes_across_epochs() {
        let cfg = TrainConfig {
            epochs: 3,
            ..config()
        };
        let (n, window) = (7, 3);
        let mut taken = Vec::new();
        for epoch in 0..cfg.epochs {
            let order = epoch_order(cfg.seed, epoch, n);
            for start in (0..n).step_by(window) {
                let ahead = window_after(epoch, start, &order, window, &cfg);
                taken.push((order[start..(start + window).min(n)].to_vec(), ahead));
            }
        }
        for pair in taken.windows(2) {
            assert_eq!(pair[0].1.as_ref(), Some(&pair[1].0));
        }
        assert_eq!(
            taken.last().unwrap().1,
            None,
            "nothing is loaded after the last step"
        );
        assert_eq!(taken.len(), 3 * 3);
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
