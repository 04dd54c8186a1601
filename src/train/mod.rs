//! Training primitives for QLoRA that must match PyTorch/transformers exactly and that burn
//! 0.21 does not provide in that form: AdamW with global-norm gradient clipping (burn clips
//! per tensor), HF's linear-warmup + cosine schedule (burn's cosine restarts), and the masked
//! next-token cross-entropy transformers computes; and the loop that uses them: samples and
//! batching (`batch`), resumable checkpoints (`checkpoint`), hyper-parameters (`config`),
//! what a run measures and reports (`metrics`), f16 loss scaling (`scaler`), the validation
//! pass (`validate`), data parallel peers over burn-collective (`parallel`), and the
//! trainer (`trainer`) with its errors (`error`).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
mod parallel;
#[cfg(test)]
pub(crate) mod qlora_check;
mod recompute;
pub mod scaler;
pub mod schedule;
pub mod trainer;
mod validate;
