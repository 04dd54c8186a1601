//! Qwen2.5-VL configuration: `HfConfig` mirrors `config.json` (HF field names and
//! defaults) and `resolve()` checks it into the strict [`Qwen25VlConfig`] the model is
//! built from.
//!
//! Follows transformers `models/qwen2_5_vl/configuration_qwen2_5_vl.py@018c8e0394c47749c55861e11f5f7e2a577973d7`.
//! Every layout transformers 4.49–5.x writes for this model is accepted (re-saves of the
//! published 7B config by each version are in `testdata/resaved/`): text fields at top level
//! (published), at top level *and* in `text_config` (4.53–4.57), or only in `text_config`
//! (5.x); `rope_scaling` or `rope_parameters`; `torch_dtype` or `dtype`; vision `in_chans`
//! and/or `in_channels`; `layer_types`. Where two spellings of one setting are both present
//! they must agree, or the config is refused naming both ([`ConfigError::Conflict`]).
//! `generation_config.json`, when present, overrides the end-of-sequence ids.
//!
//! - `hf`: the serde mirror ([`HfConfig`], [`HfTextConfig`], [`HfVisionConfig`]);
//!   `layout`: the spellings of one setting folded into one before parsing.
//! - `resolve`: [`HfConfig::resolve`], the checks; `resolved`: the strict structs.
//! - `error`: [`ConfigError`].
//!
//! The tensor manifest and parameter count of a [`Qwen25VlConfig`] live with the loader
//! that checks checkpoints against them (`model::weights::manifest`).

mod error;
mod hf;
mod layout;
mod resolve;
mod resolved;

pub use error::ConfigError;
pub use hf::{
    HfConfig, HfGenerationConfig, HfRope, HfTextConfig, HfVisionConfig, HfVisionRope, OneOrMany,
};
pub(crate) use resolved::VISION_ROPE_THETA;
pub use resolved::{Qwen25VlConfig, SpecialTokens, TextConfig, VisionConfig};

#[cfg(test)]
mod tests;
