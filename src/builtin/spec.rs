//! Dimensions of the embedded `builtin:tiny` model and the HF JSON files they become.
//!
//! The files follow the published Qwen2.5-VL layout (transformers
//! `models/qwen2_5_vl/configuration_qwen2_5_vl.py`, and the `config.json`,
//! `preprocessor_config.json` and `generation_config.json` of `Qwen/Qwen2.5-VL-7B-Instruct`):
//! text fields at the top level, `vision_config` nested, `rope_scaling.mrope_section`.
//! The dimensions are the 7B's scaled down so the whole pipeline, training included, runs in
//! minutes on two CPU cores.

use serde::Deserialize;
use serde_json::{json, Value};

/// Shapes of a Qwen2.5-VL model: everything needed to lay out its tensors and write its
/// `config.json`. Field names are the HF `config.json` names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TinySpec {
    /// Rows of `embed_tokens` and `lm_head` (tokens).
    pub vocab_size: usize,
    /// Text model width.
    pub hidden_size: usize,
    /// Width of the text MLP (gate/up output).
    pub intermediate_size: usize,
    /// Text decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Whether `lm_head` shares `embed_tokens` (no `lm_head.weight` tensor then).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The vision tower.
    pub vision_config: TinyVisionSpec,
}

/// Shapes of the Qwen2.5-VL vision tower (`vision_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TinyVisionSpec {
    /// Vision blocks.
    pub depth: usize,
    /// Vision width.
    pub hidden_size: usize,
    /// Width of the vision MLP.
    pub intermediate_size: usize,
    /// Vision attention heads.
    pub num_heads: usize,
    /// Input channels (3: RGB).
    pub in_chans: usize,
    /// Width after the patch merger; equals the text `hidden_size`.
    pub out_hidden_size: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Patches merged per side by the merger.
    pub spatial_merge_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
}

/// Token ids the config must name; they come from the trained tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `<|endoftext|>`: bos and pad.
    pub endoftext: u32,
    /// `<|im_end|>`: end of a chat turn (eos).
    pub im_end: u32,
    /// `<|vision_start|>`.
    pub vision_start: u32,
    /// `<|vision_end|>`.
    pub vision_end: u32,
    /// `<|vision_pad|>`.
    pub vision_pad: u32,
    /// `<|image_pad|>`: one per merged image patch.
    pub image_pad: u32,
    /// `<|video_pad|>`.
    pub video_pad: u32,
}

/// Half the text head dim split over the (temporal, height, width) M-RoPE axes, in the
/// 7B's 16:24:24 proportion ([4, 6, 6] for head_dim 32).
pub const TINY_MROPE_SECTION: [usize; 3] = [4, 6, 6];
/// Vision window side, pixels (transformers' default 112: 4×4 merged patches).
pub const TINY_WINDOW_SIZE: usize = 112;
/// Vision blocks with full attention; the others use window attention. The 7B has one every
/// 8 blocks of 32 ([7, 15, 23, 31]); with 4 blocks, every other one.
pub const TINY_FULLATT_BLOCKS: [usize; 2] = [1, 3];
/// Smallest image the processor produces, pixels (56×56, as published).
pub const TINY_MIN_PIXELS: usize = 56 * 56;
/// Largest image the processor produces, pixels (256×256: at most 81 image tokens).
pub const TINY_MAX_PIXELS: usize = 256 * 256;
/// RoPE base (as the 7B).
pub const TINY_ROPE_THETA: f64 = 1_000_000.0;

impl TinySpec {
    /// The `builtin:tiny` dimensions for a tokenizer of `vocab_size` tokens: text hidden 128,
    /// 2 layers, 4 query / 2 key-value heads of 32; vision depth 4, hidden 64, 4 heads.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: false,
            vision_config: TinyVisionSpec {
                depth: 4,
                hidden_size: 64,
                intermediate_size: 176,
                num_heads: 4,
                in_chans: 3,
                out_hidden_size: 128,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
            },
        }
    }

    /// Per-head width of the text attention.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Half the head dim split over the (temporal, height, width) M-RoPE axes in the 7B's
    /// 16:24:24 proportion: [`TINY_MROPE_SECTION`] for the tiny head dim of 32.
    pub fn mrope_section(&self) -> [usize; 3] {
        let hd = self.head_dim();
        [hd / 8, 3 * hd / 16, hd / 2 - hd / 8 - 3 * hd / 16]
    }

    /// `config.json` in the published Qwen2.5-VL layout.
    pub fn config_json(&self, ids: &SpecialIds) -> Value {
        let v = &self.vision_config;
        // Built in two parts: one json! literal this long exceeds the macro recursion limit.
        let vision = json!({
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_chans,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "window_size": TINY_WINDOW_SIZE,
            "fullatt_block_indexes": TINY_FULLATT_BLOCKS,
            "hidden_act": "silu",
            "tokens_per_second": 2,
            "model_type": "qwen2_5_vl",
        });
        let mut cfg = json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "torch_dtype": "float32",
            "use_cache": true,
            "attention_dropout": 0.0,
            "bos_token_id": ids.endoftext,
            "eos_token_id": ids.im_end,
            "pad_token_id": ids.endoftext,
            "vision_start_token_id": ids.vision_start,
            "vision_end_token_id": ids.vision_end,
            "vision_token_id": ids.vision_pad,
            "image_token_id": ids.image_pad,
            "video_token_id": ids.video_pad,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rope_theta": TINY_ROPE_THETA,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "max_window_layers": self.num_hidden_layers,
            "sliding_window": 4096,
            "use_sliding_window": false,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_scaling": {
                "type": "mrope",
                "mrope_section": self.mrope_section(),
                "rope_type": "default",
            },
        });
        cfg["vision_config"] = vision;
        cfg
    }

    /// `preprocessor_config.json`: the Qwen2-VL image processor with CLIP mean/std and a small
    /// pixel budget.
    pub fn preprocessor_json(&self) -> Value {
        let v = &self.vision_config;
        json!({
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": true,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "do_convert_rgb": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size,
            "min_pixels": TINY_MIN_PIXELS,
            "max_pixels": TINY_MAX_PIXELS,
        })
    }

    /// `generation_config.json`: greedy decoding that stops at `<|im_end|>` or
    /// `<|endoftext|>`.
    pub fn generation_json(&self, ids: &SpecialIds) -> Value {
        json!({
            "bos_token_id": ids.endoftext,
            "pad_token_id": ids.endoftext,
            "eos_token_id": [ids.im_end, ids.endoftext],
            "do_sample": false,
            "repetition_penalty": 1.0,
        })
    }
}
