//! The strict configuration the model is built from (no Options; checked by
//! [`HfConfig::resolve`](super::HfConfig::resolve)).

use serde::{Deserialize, Serialize};

/// Vision rotary base: the reference's `Qwen2_5_VisionRotaryEmbedding` default (lives
/// here so `resolve` can check a config against it without importing the vision tower).
pub(crate) const VISION_ROPE_THETA: f64 = 10_000.0;

/// The decoder, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Vocabulary size (tokens).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Frequency pairs per M-RoPE axis (temporal, height, width); sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    /// Longest sequence trained for (tokens).
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`.
    pub tie_word_embeddings: bool,
}

/// The vision tower, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Heads.
    pub num_heads: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Patch side (pixels).
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LLM token.
    pub spatial_merge_size: usize,
    /// Attention window side (pixels).
    pub window_size: usize,
    /// Blocks with full (per-frame) attention.
    pub fullatt_block_indexes: Vec<usize>,
    /// Merger output width.
    pub out_hidden_size: usize,
    /// Temporal M-RoPE step per second of video.
    pub tokens_per_second: f64,
}

impl VisionConfig {
    /// Values per flattened patch row of `pixel_values` (`C * T * P * P`).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Patches per merged LLM token (`merge²`).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

/// Special token ids (never literals: read from the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// Image placeholder.
    pub image_token_id: u32,
    /// Video placeholder.
    pub video_token_id: Option<u32>,
    /// Opens a vision span.
    pub vision_start_token_id: u32,
    /// Closes a vision span.
    pub vision_end_token_id: Option<u32>,
    /// Generation stops on any of these.
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if the checkpoint names one.
    pub pad_token_id: Option<u32>,
}

/// A validated Qwen2.5-VL configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen25VlConfig {
    /// Decoder.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Special tokens.
    pub tokens: SpecialTokens,
}
