//! Errors of a training run.

use std::path::PathBuf;

use crate::fs::FsError;
use crate::model::adapt::AdaptError;
use crate::model::ModelError;
use crate::train::batch::SampleError;
use crate::train::checkpoint::{CheckpointError, RunFingerprint};

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("the model has no LoRA pairs to train (attach an adapter or add fresh pairs)")]
    NoLora,
    #[error("no training samples")]
    NoSamples,
    #[error("checkpoint {dir} belongs to another run: it was {saved:?}, this run is {now:?}")]
    ResumeMismatch {
        dir: PathBuf,
        saved: Box<RunFingerprint>,
        now: Box<RunFingerprint>,
    },
    #[error(
        "checkpoint {dir}: optimizer moments for `{key}`, which is not a LoRA param of the model"
    )]
    UnknownMoment { dir: PathBuf, key: String },
    #[error("loss is {loss} at optimizer step {step}: training diverged")]
    NonFinite { step: u64, loss: f64 },
    #[error("the gradient norm is {norm} at optimizer step {step} (the loss was finite): training diverged")]
    NonFiniteGradient { step: u64, norm: f64 },
    #[error("reading the step's loss and gradient norm back from the device: {0}")]
    Readback(String),
    #[error("data parallel training: burn-collective failed {what}: {reason}")]
    Collective { what: &'static str, reason: String },
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Adapt(#[from] AdaptError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Fs(#[from] FsError),
}
