//! The validation pass (token-mean loss without autodiff) and saving the best adapter.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::prelude::*;

use crate::fs::{commit_dir, write_json_atomic};
use crate::kernels::AutodiffKernels;
use crate::model::Qwen25Vl;
use crate::train::batch::{collate, SampleSource, TrainSample};
use crate::train::checkpoint::{BestVal, CheckpointError};
use crate::train::error::TrainError;
use crate::train::loss::causal_lm_loss;

/// Token-mean loss of `valid` under the model without autodiff, and the tokens counted.
pub(super) fn validate<B: AutodiffKernels>(
    model: &Qwen25Vl<B>,
    valid: &dyn SampleSource<B::InnerBackend>,
    batch_size: usize,
    device: &B::Device,
) -> Result<(f64, usize), TrainError> {
    let m = model.valid();
    let (mut sum, mut tokens) = (0.0, 0);
    let all: Vec<usize> = (0..valid.len()).collect();
    for idx in all.chunks(batch_size) {
        let samples: Vec<TrainSample<B::InnerBackend>> = idx
            .iter()
            .map(|&i| valid.get(i))
            .collect::<Result<_, _>>()?;
        let b = collate(&samples, idx, device)?;
        let out = m.forward(
            &b.input_ids,
            Some(&b.attention_mask),
            b.images.as_ref(),
            device,
        )?;
        let (loss, count) = causal_lm_loss(out.logits, b.labels);
        sum += loss.into_scalar().elem::<f64>() * count as f64;
        tokens += count;
    }
    Ok((sum / tokens.max(1) as f64, tokens))
}

/// Saves the current adapter as `<ckpt_dir>/best` (atomically) with `best.json`.
pub(super) fn save_best<B: AutodiffKernels>(
    model: &Qwen25Vl<B>,
    ckpt_dir: &Path,
    step: u64,
    loss: f64,
) -> Result<(), TrainError> {
    let partial = crate::fs::fresh_partial(&ckpt_dir.join("best"))?;
    model
        .export_adapter(None)?
        .save(&partial)
        .map_err(CheckpointError::from)?;
    write_json_atomic(&partial.join("best.json"), &BestVal { step, loss })?;
    commit_dir(&partial, &ckpt_dir.join("best"))?;
    Ok(())
}
