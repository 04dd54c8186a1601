//! Hyper-parameters of a LoRA fine-tune (`[train]` maps onto them in the train stage).

use serde::{Deserialize, Serialize};

/// Hyper-parameters of a LoRA fine-tune (defaults: the QLoRA recipe, Dettmers et al. 2023).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the optimizer steps spent in linear warmup (rounded up, as HF).
    pub warmup_ratio: f64,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Samples per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient L2 norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of the data order and LoRA dropout.
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps (the end of training always does).
    pub checkpoint_every: Option<u64>,
    /// Validate every this many optimizer steps (the end of each epoch always does).
    pub eval_every: Option<u64>,
    /// Use at most this many training samples (the first ones of the source).
    pub max_samples: Option<usize>,
    /// Committed checkpoints kept on disk (older ones are removed); at least 1.
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup_ratio: 0.03,
            epochs: 1,
            batch_size: 1,
            grad_accum: 4,
            max_grad_norm: Some(0.3),
            weight_decay: 0.0,
            seed: 42,
            checkpoint_every: Some(50),
            eval_every: None,
            max_samples: None,
            keep_checkpoints: 2,
        }
    }
}
