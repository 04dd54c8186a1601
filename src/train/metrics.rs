//! What a training run measures and reports: per-step and validation metrics (recorded in the
//! checkpoint's `state.json`) and the events the trainer hands to its progress callback.
//!
//! Both `checkpoint` (which stores the metrics) and `trainer` (which produces them) depend on
//! this module, and it depends on neither.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Metrics of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based: the step just taken).
    pub step: u64,
    pub total_steps: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Token-mean cross-entropy over the accumulation window (nats).
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Global gradient L2 norm before clipping (0 on a step skipped for overflow).
    pub grad_norm: f64,
    /// The f16 loss scale the step used (`None` in f32 and bf16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Whether the step's scaled gradients overflowed in f16, so it changed nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Samples in the window.
    pub samples: usize,
    /// Unpadded input tokens in the window.
    pub input_tokens: usize,
    /// Tokens the loss counted.
    pub label_tokens: usize,
    /// Padding the window's micro-batches computed on (rows × longest row − real tokens),
    /// after grouping samples of similar length.
    #[serde(default)]
    pub padding_tokens: usize,
    /// The padding the same window would have had in its shuffled order.
    #[serde(default)]
    pub padding_tokens_unbucketed: usize,
    /// Input tokens per second of wall time (forward + backward + update), over the read
    /// interval the step belongs to (the steps between two reads share its time evenly).
    pub tokens_per_s: f64,
    /// Samples per second of wall time, over the step's read interval.
    pub samples_per_s: f64,
}

/// One validation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// Epochs done, fractional.
    pub epoch: f64,
    /// Token-mean cross-entropy over the validation set (nats).
    pub loss: f64,
    /// Tokens it averaged.
    pub tokens: usize,
    /// Whether it improved on every earlier validation (the adapter was saved as best).
    pub best: bool,
}

/// What the trainer reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum TrainEvent<'a> {
    /// Continuing from a checkpoint.
    Resumed { step: u64, dir: &'a Path },
    /// Optimizer step `step` (1-based) was launched; its metrics follow with the next read
    /// ([`TrainEvent::Step`], every `log_every` steps).
    Stepped { step: u64 },
    /// The metrics of a step, once read back from the device (in step order).
    Step(&'a StepMetrics),
    /// A validation pass finished.
    Validation(&'a ValMetrics),
    /// A checkpoint was committed.
    Checkpoint { step: u64, dir: &'a Path },
}

/// The progress callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop after the current step's validation and checkpoint (work since the last
    /// checkpoint is redone on resume).
    Stop,
}
