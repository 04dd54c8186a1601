//! Training checkpoints: everything a run needs to continue bit-identically after an
//! interruption, written atomically (built in `step-N.partial/`, then renamed, with
//! `pipeline::fs::commit_dir`).
//!
//! Layout of `<checkpoint dir>/step-00000012/`:
//! - `adapter/`: the LoRA weights in peft's format (loadable by peft as they are);
//! - `optimizer.safetensors`: AdamW's `exp_avg` / `exp_avg_sq` per LoRA param, keyed
//!   `<peft key>.exp_avg` as in torch's optimizer state;
//! - `state.json`: [`TrainState`] (optimizer step, epoch, data-order cursor, RNG seed,
//!   best validation, metrics so far, and the run's fingerprint).
//!
//! The random state needs no snapshot: the data order of epoch `e` is a pure function of
//! `(seed, e)` and LoRA dropout is reseeded from `(seed, step, micro-batch)` (see
//! `trainer.rs`), so the seed and the counters restore it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fs::{commit_dir, write_atomic, write_json_atomic, FsError};
use crate::kernels::Kernels;
use crate::model::lora::{Adapter, LoraError};
use crate::train::metrics::{StepMetrics, ValMetrics};
use crate::train::optim::{AdamW, Moments};
use crate::train::scaler::LossScaler;

/// Version of the checkpoint layout.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Adapter(#[from] LoraError),
    #[error("checkpoint file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What identifies a run: resuming with a different one would not continue it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFingerprint {
    /// Training samples used (after `max_samples`).
    pub samples: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step: `grad_accum × devices` (data parallel), so one
    /// device resumes a run of several that took the same steps.
    pub grad_accum: usize,
    pub epochs: usize,
    pub seed: u64,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub total_steps: u64,
}

/// The best validation loss so far and where it was reached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestVal {
    /// Optimizer step of the evaluation.
    pub step: u64,
    /// Token-mean validation loss.
    pub loss: f64,
}

/// The trainer's position and history (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch in progress (0-based; `epochs` when finished).
    pub epoch: usize,
    /// Position in the epoch's shuffled order of the next sample to train on.
    pub next_sample: usize,
    /// Seed of the data order and of LoRA dropout.
    pub seed: u64,
    pub fingerprint: RunFingerprint,
    pub best: Option<BestVal>,
    /// Per-step training metrics from step 1.
    pub history: Vec<StepMetrics>,
    /// Every validation run.
    pub validations: Vec<ValMetrics>,
    /// The loss scale of an f16 run (`None` in f32 and bf16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// `step-00000012`
fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes a checkpoint for `state.step` under `root` atomically and returns its directory.
/// `lora_keys` maps LoRA param ids to their peft keys (`Qwen25Vl::lora_params`).
///
/// # Errors
/// I/O failures, naming the path.
pub fn save<B: Kernels>(
    root: &Path,
    state: &TrainState,
    adapter: &Adapter,
    opt: &AdamW<B>,
    lora_keys: &[(ParamId, String)],
) -> Result<PathBuf, CheckpointError> {
    let dir = root.join(step_dir_name(state.step));
    let partial = crate::fs::fresh_partial(&dir)?;
    adapter.save(&partial.join("adapter"))?;
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (id, key) in lora_keys {
        if let Some(Moments { m, v }) = opt.moments.get(id) {
            for (suffix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let data = t.clone().into_data().convert::<f32>();
                let bytes: Vec<u8> = data
                    .to_vec::<f32>()
                    .map_err(|e| invalid(&partial, format!("reading moments of {key}: {e:?}")))?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                tensors.push((format!("{key}.{suffix}"), bytes, t.dims().to_vec()));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, b, s)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("byte length is 4 x the shape's element count by construction");
            (k.clone(), view)
        })
        .collect();
    let meta = HashMap::from([("step".to_string(), opt.steps().to_string())]);
    let opt_path = partial.join("optimizer.safetensors");
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| invalid(&opt_path, format!("serializing: {e}")))?;
    write_atomic(&opt_path, &bytes)?;
    write_json_atomic(&partial.join("state.json"), state)?;
    commit_dir(&partial, &dir)?;
    Ok(dir)
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Loaded<B: Kernels> {
    pub dir: PathBuf,
    pub state: TrainState,
    pub adapter: Adapter,
    /// Optimizer step count and moments keyed by peft key.
    pub opt_step: u64,
    pub moments: BTreeMap<String, Moments<B>>,
}

/// Committed checkpoint directories under `root`, oldest first (`.partial` ones ignored).
///
/// # Errors
/// `root` exists but cannot be listed.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(FsError {
                action: "listing",
                path: root.to_path_buf(),
                source,
            }
            .into())
        }
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Loads the newest committed checkpoint under `root`, if any.
///
/// # Errors
/// Unreadable or inconsistent files, naming them.
pub fn load_latest<B: Kernels>(
    root: &Path,
    device: &B::Device,
) -> Result<Option<Loaded<B>>, CheckpointError> {
    let Some((_, dir)) = list(root)?.pop() else {
        return Ok(None);
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read(&state_path).map_err(|source| FsError {
        action: "reading",
        path: state_path.clone(),
        source,
    })?;
    let state: TrainState =
        serde_json::from_slice(&text).map_err(|e| invalid(&state_path, e.to_string()))?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(invalid(
            &state_path,
            format!(
                "format {}, this build reads {CHECKPOINT_FORMAT}",
                state.format
            ),
        ));
    }
    let adapter = Adapter::load(&dir.join("adapter"))?;
    let opt_path = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt_path).map_err(|source| FsError {
        action: "reading",
        path: opt_path.clone(),
        source,
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(&opt_path, e.to_string()))?;
    let opt_step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(&opt_path, "metadata lacks the optimizer `step`"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(&opt_path, e.to_string()))?;
    let mut halves: BTreeMap<String, [Option<Tensor<B, 1>>; 2]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (key, slot) = if let Some(k) = name.strip_suffix(".exp_avg_sq") {
            (k, 1)
        } else if let Some(k) = name.strip_suffix(".exp_avg") {
            (k, 0)
        } else {
            return Err(invalid(&opt_path, format!("unexpected tensor `{name}`")));
        };
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(invalid(
                &opt_path,
                format!("`{name}` has dtype {:?}, expected F32", view.dtype()),
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = data.len();
        // f32 like the LoRA params they belong to, whatever the device computes in.
        halves.entry(key.to_string()).or_default()[slot] = Some(Tensor::from_data(
            burn::tensor::TensorData::new(data, [n]),
            (device, burn::tensor::DType::F32),
        ));
    }
    let mut moments = BTreeMap::new();
    for (key, [m, v]) in halves {
        match (m, v) {
            (Some(m), Some(v)) => {
                moments.insert(key, Moments { m, v });
            }
            _ => {
                return Err(invalid(
                    &opt_path,
                    format!("`{key}` lacks exp_avg or exp_avg_sq"),
                ))
            }
        }
    }
    Ok(Some(Loaded {
        dir,
        state,
        adapter,
        opt_step,
        moments,
    }))
}

/// Removes all but the newest `keep` committed checkpoints under `root`.
///
/// # Errors
/// A directory that cannot be removed.
pub fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let all = list(root)?;
    let old = all.len().saturating_sub(keep);
    for (_, dir) in &all[..old] {
        std::fs::remove_dir_all(dir).map_err(|source| FsError {
            action: "removing old checkpoint",
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}
