//! Qwen2.5-VL in burn, generic over the backend.
//!
//! - `config`: `HfConfig` mirrors config.json (published and transformers-5 layouts) and
//!   resolves into the strict [`Qwen25VlConfig`] (with [`Qwen25VlConfig::parameter_count`]).
//! - `weights`: memory-mapped safetensors (single or sharded), key remapping, strict
//!   coverage checks against the config's tensor manifest.
//! - `linear`: the one projection seam (`Proj` over `BaseProj`) for NF4/LoRA;
//!   `adapt`: attaching, exporting, freezing and merging LoRA on the whole model;
//!   `lora`: LoRA pairs and the PEFT adapter format; `dropout`: their dropout, seeded per
//!   micro-batch and site so reruns and concurrent peers draw the same masks.
//! - `vision`, `rope`, `text`: vision tower, M-RoPE, decoder; `cache`: per-layer KV cache.
//! - `processor`: the Qwen2-VL image processor; `prompt`: chat prompts and training labels.
//! - `loader`: a model directory loaded for generation (weights + adapter, timed) and its
//!   input side (processor + prompt builder → [`Request`]).
//! - `qwen`: the assembled [`Qwen25Vl`] (image embeddings merged into the sequence);
//!   `generate`: batched greedy/sampled generation with timings; `parity`: the
//!   `medpipe forward` harness.
//!
//! Weights and activations take the device's default float dtype (burn's
//! `set_default_dtypes` before [`Qwen25Vl::load`] gives a bf16 model); rotary tables and
//! norms and the attention softmax (`attend`) are computed in f32 as in the reference. On
//! the CPU (whose tensors have no bf16) a bf16 checkpoint's projections and embedding table
//! stay bf16, read in place from the memory map and widened exactly as they are used
//! (`Kernels::keeps_bf16_bits`), and NF4 codes are read in place too.
//!
//! Reference: transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`.

pub mod adapt;
mod cache;
pub mod config;
pub mod dropout;
mod error;
pub mod generate;
pub(crate) mod linear;
pub mod loader;
pub mod lora;
pub mod parity;
pub mod plan;
pub mod processor;
pub mod prompt;
pub(crate) mod qwen;
pub mod rope;
pub mod sampling;
mod text;
pub(crate) mod vision;
pub(crate) mod weights;

pub use cache::KvCache;
pub use config::{ConfigError, HfConfig, Qwen25VlConfig};
pub use error::{AdaptError, ModelError};
pub use generate::{GenerateConfig, Generation, Request, Sampling};
pub use qwen::{ForwardOutput, ImageInput, Qwen25Vl};
pub use rope::MropePositions;
