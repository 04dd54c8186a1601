//! Qwen2.5-VL in burn, generic over the backend: configuration (`config`), checkpoint
//! loading (`weights`), the linear seam for NF4/LoRA (`linear`), vision tower
//! (`vision`), M-RoPE (`rope`), decoder (`text`), KV cache (`cache`), the assembled model
//! (`qwen`), generation (`generate`) and the forward parity harness (`parity`).
//!
//! Reference: transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`.

pub mod cache;
pub mod config;
mod error;
pub mod generate;
pub mod linear;
pub mod parity;
mod qwen;
pub mod rope;
mod text;
pub mod vision;
pub(crate) mod weights;

pub use cache::KvCache;
pub use config::{ConfigError, HfConfig, Qwen25VlConfig};
pub use error::ModelError;
pub use generate::{GenerateConfig, Generation, Request, Sampling};
pub use qwen::{ForwardOutput, ImageInput, Qwen25Vl};
