//! The serde mirror of `config.json` and `generation_config.json`: HF field names and
//! defaults, every layout transformers 4.49–5.x writes (see [`super`]), parsed after
//! `layout::reconcile_spellings` has folded the alternative spellings into one.

use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;
use super::layout::reconcile_spellings;

/// A token id field that HF writes either as one integer or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` (published) / `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct HfRope {
    /// Rotary dims (in frequency pairs) given to the temporal, height and width axes.
    pub mrope_section: Vec<usize>,
    /// `"default"` or `"mrope"` (the only ones Qwen2.5-VL uses).
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Legacy spelling of `rope_type`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// RoPE base; transformers 5 stores it here.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// The language-model half of `config.json`, HF names.
#[derive(Debug, Clone, Deserialize)]
pub struct HfTextConfig {
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon (transformers default 1e-5).
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base at top level (published layout).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// M-RoPE parameters (`rope_parameters` in transformers 5, renamed on reading).
    #[serde(default)]
    pub rope_scaling: Option<HfRope>,
    /// Attention kind per decoder layer (transformers 4.53+); only `full_attention` exists
    /// in Qwen2.5-VL as medpipe implements it.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Longest sequence the model was trained for (tokens).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// MLP activation; only `silu` exists in Qwen2.5-VL.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Whether `lm_head` shares `embed_tokens`.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Sliding-window attention in the decoder (not used by Qwen2.5-VL; rejected if on).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Explicit head size; must equal `hidden_size / num_attention_heads` if given.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// End-of-sequence id(s) when the text config carries them.
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    /// Padding id when the text config carries it.
    #[serde(default)]
    pub pad_token_id: Option<OneOrMany>,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    32768
}
fn default_act() -> String {
    "silu".into()
}

/// `vision_config`, HF names and transformers defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfVisionConfig {
    /// Vision blocks.
    #[serde(default = "v_depth")]
    pub depth: usize,
    /// Vision width.
    #[serde(default = "v_hidden")]
    pub hidden_size: usize,
    /// Vision MLP width.
    #[serde(default = "v_inter")]
    pub intermediate_size: usize,
    /// Vision heads.
    #[serde(default = "v_heads")]
    pub num_heads: usize,
    /// Image channels (`in_chans` in the published config, renamed on reading).
    #[serde(default = "v_chans")]
    pub in_channels: usize,
    /// Patch side (pixels).
    #[serde(default = "v_patch")]
    pub patch_size: usize,
    /// Patches merged per side into one LLM token.
    #[serde(default = "v_merge")]
    pub spatial_merge_size: usize,
    /// Frames per temporal patch.
    #[serde(default = "v_tps")]
    pub temporal_patch_size: usize,
    /// Temporal position step per second of video (M-RoPE).
    #[serde(default = "v_tokps")]
    pub tokens_per_second: f64,
    /// Attention window side (pixels).
    #[serde(default = "v_window")]
    pub window_size: usize,
    /// Output width of the merger (= text `hidden_size`).
    #[serde(default = "v_out")]
    pub out_hidden_size: usize,
    /// Blocks that attend over the whole image instead of windows.
    #[serde(default = "v_fullatt")]
    pub fullatt_block_indexes: Vec<usize>,
    /// Vision MLP activation; only `silu` exists in Qwen2.5-VL.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Vision rotary parameters (transformers 5.2x writes `{rope_theta, rope_type}`).
    #[serde(default)]
    pub rope_parameters: Option<HfVisionRope>,
}

/// `vision_config.rope_parameters`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfVisionRope {
    /// Rotary base of the vision tower; the architecture fixes it at 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

fn v_depth() -> usize {
    32
}
fn v_hidden() -> usize {
    3584
}
fn v_inter() -> usize {
    3420
}
fn v_heads() -> usize {
    16
}
fn v_chans() -> usize {
    3
}
fn v_patch() -> usize {
    14
}
fn v_merge() -> usize {
    2
}
fn v_tps() -> usize {
    2
}
fn v_tokps() -> f64 {
    4.0
}
fn v_window() -> usize {
    112
}
fn v_out() -> usize {
    3584
}
fn v_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}

/// `config.json` of a Qwen2.5-VL checkpoint, in either layout.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// Text fields (top level in the published layout, `text_config` in transformers 5).
    pub text: HfTextConfig,
    /// `vision_config`.
    pub vision: HfVisionConfig,
    /// Placeholder token an image embedding replaces.
    pub image_token_id: u32,
    /// Placeholder token for video frames.
    pub video_token_id: Option<u32>,
    /// Token opening an image/video span.
    pub vision_start_token_id: u32,
    /// Token closing an image/video span.
    pub vision_end_token_id: Option<u32>,
    /// End-of-sequence ids from config.json (top level or text config).
    pub eos_token_id: Vec<u32>,
    /// Padding id, if any.
    pub pad_token_id: Option<u32>,
    /// Top-level `tie_word_embeddings` (transformers 5 may put it there).
    pub tie_word_embeddings: Option<bool>,
}

#[derive(Deserialize)]
struct HfTop {
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    vision_config: HfVisionConfig,
    image_token_id: u32,
    #[serde(default)]
    video_token_id: Option<u32>,
    vision_start_token_id: u32,
    #[serde(default)]
    vision_end_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pad_token_id: Option<OneOrMany>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

/// `generation_config.json` (only the fields medpipe uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfGenerationConfig {
    /// End-of-sequence id(s); override config.json's when present.
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<OneOrMany>,
}

impl HfConfig {
    /// Parses `config.json` text; `path` is only used in error messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] when the JSON is malformed or a required field is missing.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse = |source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        };
        let mut root: serde_json::Value = serde_json::from_str(text).map_err(parse)?;
        reconcile_spellings(&mut root, path)?;
        let top: HfTop = serde_json::from_value(root.clone()).map_err(parse)?;
        let text_value = top.text_config.clone().unwrap_or(root);
        let text: HfTextConfig = serde_json::from_value(text_value).map_err(parse)?;
        let eos = top
            .eos_token_id
            .as_ref()
            .or(text.eos_token_id.as_ref())
            .map(OneOrMany::to_vec)
            .unwrap_or_default();
        let pad = top
            .pad_token_id
            .as_ref()
            .or(text.pad_token_id.as_ref())
            .and_then(|p| p.to_vec().first().copied());
        Ok(HfConfig {
            text,
            vision: top.vision_config,
            image_token_id: top.image_token_id,
            video_token_id: top.video_token_id,
            vision_start_token_id: top.vision_start_token_id,
            vision_end_token_id: top.vision_end_token_id,
            eos_token_id: eos,
            pad_token_id: pad,
            tie_word_embeddings: top.tie_word_embeddings,
        })
    }

    /// Reads `dir/config.json`, and `dir/generation_config.json` when it exists (its
    /// `eos_token_id`/`pad_token_id` win over config.json's).
    ///
    /// # Errors
    /// [`ConfigError::Io`] / [`ConfigError::Parse`] naming the file.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gpath = dir.join("generation_config.json");
        if gpath.exists() {
            let gtext = std::fs::read_to_string(&gpath).map_err(|source| ConfigError::Io {
                path: gpath.clone(),
                source,
            })?;
            let g: HfGenerationConfig =
                serde_json::from_str(&gtext).map_err(|source| ConfigError::Parse {
                    path: gpath.clone(),
                    source,
                })?;
            if let Some(e) = g.eos_token_id {
                cfg.eos_token_id = e.to_vec();
            }
            if let Some(p) = g.pad_token_id.and_then(|p| p.to_vec().first().copied()) {
                cfg.pad_token_id = Some(p);
            }
        }
        Ok(cfg)
    }
}
