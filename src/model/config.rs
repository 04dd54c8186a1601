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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What went wrong reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading model config {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON or misses a required field.
    #[error("parsing model config {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Two spellings of one setting (e.g. `in_chans` and `in_channels`, or a top-level text
    /// field and its `text_config` copy) are both present and disagree.
    #[error("model config {path}: `{first}` = {first_value} and `{second}` = {second_value} disagree; they are two spellings of one setting, so they must match")]
    Conflict {
        /// The file.
        path: PathBuf,
        /// One spelling (dotted path in the JSON).
        first: String,
        /// Its value (JSON).
        first_value: String,
        /// The other spelling.
        second: String,
        /// Its value (JSON).
        second_value: String,
    },
    /// A value is inconsistent with the architecture.
    #[error("invalid model config: {field}: {reason}")]
    Invalid {
        /// The offending field (HF name).
        field: &'static str,
        /// Why it is rejected, with the numbers.
        reason: String,
    },
}

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

/// Text fields medpipe reads that transformers 4.53–4.57 write both at top level and in
/// `text_config`; where both are present they must agree.
const SHARED_TEXT_FIELDS: [&str; 18] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "hidden_act",
    "tie_word_embeddings",
    "use_sliding_window",
    "head_dim",
    "eos_token_id",
    "pad_token_id",
    "layer_types",
    "dtype",
];

/// Rewrites every spelling transformers uses into the one the serde structs read, refusing
/// two spellings of one setting that disagree: vision `in_chans` → `in_channels`,
/// `rope_parameters` → `rope_scaling`, `torch_dtype` → `dtype`, a top-level `rope_theta`
/// against the one inside the rope parameters, and top-level text fields against their
/// `text_config` copies.
fn reconcile_spellings(root: &mut serde_json::Value, path: &Path) -> Result<(), ConfigError> {
    let Some(obj) = root.as_object_mut() else {
        return Ok(()); // not an object: the typed parse reports it
    };
    if let Some(v) = obj.get_mut("vision_config").and_then(|v| v.as_object_mut()) {
        merge_alias(v, "vision_config.", "in_chans", "in_channels", path)?;
    }
    reconcile_text(obj, "", path)?;
    if let Some(t) = obj.get_mut("text_config").and_then(|v| v.as_object_mut()) {
        reconcile_text(t, "text_config.", path)?;
    }
    if let Some(t) = obj.get("text_config").and_then(|v| v.as_object()) {
        for k in SHARED_TEXT_FIELDS {
            if let (Some(a), Some(b)) = (obj.get(k), t.get(k)) {
                if !same_setting(a, b) {
                    return Err(conflict(path, k.into(), a, format!("text_config.{k}"), b));
                }
            }
        }
    }
    Ok(())
}

/// One text-config object (the root or `text_config`): rope and dtype spellings.
fn reconcile_text(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for rope in ["rope_scaling", "rope_parameters"] {
        let inner = obj.get(rope).and_then(|r| r.get("rope_theta"));
        if let (Some(a), Some(b)) = (obj.get("rope_theta"), inner) {
            if !same_setting(a, b) {
                return Err(conflict(
                    path,
                    format!("{prefix}rope_theta"),
                    a,
                    format!("{prefix}{rope}.rope_theta"),
                    b,
                ));
            }
        }
    }
    merge_alias(obj, prefix, "rope_parameters", "rope_scaling", path)?;
    merge_alias(obj, prefix, "torch_dtype", "dtype", path)
}

/// Moves `from` to `to` in `obj`; when both are present they must be the same setting.
fn merge_alias(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    from: &str,
    to: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    let Some(a) = obj.remove(from) else {
        return Ok(());
    };
    match obj.get_mut(to) {
        Some(b) if !same_setting(&a, b) => Err(conflict(
            path,
            format!("{prefix}{from}"),
            &a,
            format!("{prefix}{to}"),
            b,
        )),
        // Equal: keep the union, so a `rope_theta` only one of them carries survives.
        Some(b) => {
            if let (Some(bo), Some(ao)) = (b.as_object_mut(), a.as_object()) {
                for (k, v) in ao {
                    bo.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            Ok(())
        }
        None => {
            obj.insert(to.into(), a);
            Ok(())
        }
    }
}

/// Whether two JSON values state the same setting: numbers compare by value (`2` = `2.0`),
/// rope objects by the fields that matter (`mrope_section`, and `rope_theta` where both
/// have it; `rope_type: default` and `type: mrope` name the same rotary scheme).
fn same_setting(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) if x.contains_key("mrope_section") => {
            ["mrope_section", "rope_theta"]
                .iter()
                .all(|k| match (x.get(*k), y.get(*k)) {
                    (Some(p), Some(q)) => same_setting(p, q),
                    _ => *k == "rope_theta",
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_setting(p, q))
        }
        _ => a == b,
    }
}

fn conflict(
    path: &Path,
    first: String,
    a: &serde_json::Value,
    second: String,
    b: &serde_json::Value,
) -> ConfigError {
    ConfigError::Conflict {
        path: path.to_path_buf(),
        first,
        first_value: a.to_string(),
        second,
        second_value: b.to_string(),
    }
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

    /// Checks the configuration and produces the strict one the model is built from.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field: heads must divide widths, the M-RoPE
    /// sections must sum to half the head size, the window must be a whole number of
    /// merged patches, full-attention block indexes must exist, the merger must output the
    /// text width, and only the activations/attention kinds Qwen2.5-VL uses are accepted.
    pub fn resolve(&self) -> Result<Qwen25VlConfig, ConfigError> {
        let t = &self.text;
        let v = &self.vision;
        let bad = |field: &'static str, reason: String| Err(ConfigError::Invalid { field, reason });
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    t.num_attention_heads, t.hidden_size
                ),
            );
        }
        let head_dim = t.hidden_size / t.num_attention_heads;
        if let Some(h) = t.head_dim {
            if h != head_dim {
                return bad(
                    "head_dim",
                    format!("{h} differs from hidden_size / num_attention_heads = {head_dim}"),
                );
            }
        }
        let kv = t.num_key_value_heads.unwrap_or(t.num_attention_heads);
        if kv == 0 || !t.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} key/value heads do not divide {} query heads",
                    t.num_attention_heads
                ),
            );
        }
        let rope = match &t.rope_scaling {
            Some(r) => r,
            None => {
                return bad(
                    "rope_scaling",
                    "missing: Qwen2.5-VL needs rope_scaling.mrope_section".into(),
                )
            }
        };
        let kind = rope
            .rope_type
            .as_deref()
            .or(rope.kind.as_deref())
            .unwrap_or("default");
        if kind != "default" && kind != "mrope" {
            return bad(
                "rope_scaling.rope_type",
                format!("`{kind}` is not supported (only default/mrope)"),
            );
        }
        if rope.mrope_section.len() != 3 {
            return bad(
                "rope_scaling.mrope_section",
                format!(
                    "has {} entries, expected 3 (temporal, height, width)",
                    rope.mrope_section.len()
                ),
            );
        }
        let sum: usize = rope.mrope_section.iter().sum();
        if !head_dim.is_multiple_of(2) || sum * 2 != head_dim {
            return bad(
                "rope_scaling.mrope_section",
                format!(
                    "{:?} sums to {sum}, expected head_dim / 2 = {}",
                    rope.mrope_section,
                    head_dim / 2
                ),
            );
        }
        if t.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (only silu)", t.hidden_act),
            );
        }
        if v.hidden_act != "silu" {
            return bad(
                "vision_config.hidden_act",
                format!("`{}` is not supported (only silu)", v.hidden_act),
            );
        }
        if let Some(kinds) = &t.layer_types {
            if kinds.len() != t.num_hidden_layers {
                return bad(
                    "layer_types",
                    format!(
                        "has {} entries for {} layers",
                        kinds.len(),
                        t.num_hidden_layers
                    ),
                );
            }
            if let Some((i, k)) = kinds
                .iter()
                .enumerate()
                .find(|(_, k)| *k != "full_attention")
            {
                return bad(
                    "layer_types",
                    format!("layer {i} is `{k}`; only full_attention is implemented"),
                );
            }
        }
        if let Some(theta) = v.rope_parameters.as_ref().and_then(|r| r.rope_theta) {
            if theta != crate::model::vision::VISION_ROPE_THETA {
                return bad(
                    "vision_config.rope_parameters.rope_theta",
                    format!(
                        "{theta} is not the {} the vision tower uses",
                        crate::model::vision::VISION_ROPE_THETA
                    ),
                );
            }
        }
        if t.use_sliding_window {
            return bad(
                "use_sliding_window",
                "sliding-window decoder attention is not implemented".into(),
            );
        }
        if v.num_heads == 0 || !v.hidden_size.is_multiple_of(v.num_heads) {
            return bad(
                "vision_config.num_heads",
                format!(
                    "{} heads do not divide vision hidden_size {}",
                    v.num_heads, v.hidden_size
                ),
            );
        }
        let v_head = v.hidden_size / v.num_heads;
        if !v_head.is_multiple_of(4) {
            return bad(
                "vision_config.num_heads",
                format!("vision head size {v_head} must be a multiple of 4 (2-D rotary)"),
            );
        }
        let unit = v.spatial_merge_size * v.patch_size;
        if v.spatial_merge_size == 0 || v.patch_size == 0 || !v.window_size.is_multiple_of(unit) {
            return bad(
                "vision_config.window_size",
                format!(
                    "{} is not a multiple of spatial_merge_size * patch_size = {unit}",
                    v.window_size
                ),
            );
        }
        if v.window_size == 0 {
            return bad("vision_config.window_size", "must be positive".into());
        }
        if let Some(&i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return bad(
                "vision_config.fullatt_block_indexes",
                format!("block {i} does not exist (depth {})", v.depth),
            );
        }
        if v.out_hidden_size != t.hidden_size {
            return bad(
                "vision_config.out_hidden_size",
                format!(
                    "{} differs from the text hidden_size {}",
                    v.out_hidden_size, t.hidden_size
                ),
            );
        }
        let rope_theta = rope.rope_theta.or(t.rope_theta).unwrap_or(1_000_000.0);
        let tie = t
            .tie_word_embeddings
            .or(self.tie_word_embeddings)
            .unwrap_or(false);
        Ok(Qwen25VlConfig {
            text: TextConfig {
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                intermediate_size: t.intermediate_size,
                num_layers: t.num_hidden_layers,
                num_heads: t.num_attention_heads,
                num_kv_heads: kv,
                head_dim,
                rms_norm_eps: t.rms_norm_eps,
                rope_theta,
                mrope_section: [
                    rope.mrope_section[0],
                    rope.mrope_section[1],
                    rope.mrope_section[2],
                ],
                max_position_embeddings: t.max_position_embeddings,
                tie_word_embeddings: tie,
            },
            vision: VisionConfig {
                depth: v.depth,
                hidden_size: v.hidden_size,
                intermediate_size: v.intermediate_size,
                num_heads: v.num_heads,
                in_channels: v.in_channels,
                patch_size: v.patch_size,
                temporal_patch_size: v.temporal_patch_size,
                spatial_merge_size: v.spatial_merge_size,
                window_size: v.window_size,
                fullatt_block_indexes: v.fullatt_block_indexes.clone(),
                out_hidden_size: v.out_hidden_size,
                tokens_per_second: v.tokens_per_second,
            },
            tokens: SpecialTokens {
                image_token_id: self.image_token_id,
                video_token_id: self.video_token_id,
                vision_start_token_id: self.vision_start_token_id,
                vision_end_token_id: self.vision_end_token_id,
                eos_token_ids: self.eos_token_id.clone(),
                pad_token_id: self.pad_token_id,
            },
        })
    }
}

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

impl Qwen25VlConfig {
    /// Every tensor a checkpoint of this config holds: published-layout key and PyTorch
    /// shape (Linear `[out, in]`, Conv3d `[out, in, t, h, w]`), the exact set the loader
    /// demands. Writers of checkpoints (e.g. a seeded tiny model) can iterate it.
    pub fn tensor_manifest(&self) -> Vec<(String, Vec<usize>)> {
        crate::model::weights::expected_tensors(self)
    }

    /// Parameters of the model this config describes (what transformers counts), from the
    /// same tensor manifest the loader checks checkpoints against.
    pub fn parameter_count(&self) -> u64 {
        self.tensor_manifest()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEVEN_B: &str = include_str!("testdata/qwen2_5_vl_7b_config.json");

    fn seven_b() -> HfConfig {
        HfConfig::from_json_str(SEVEN_B, Path::new("7b.json")).unwrap()
    }

    /// Rewrites the published layout into the transformers-5 one: text fields nested in
    /// `text_config`, `rope_parameters` carrying `rope_theta`, `in_channels`.
    fn to_transformers5(published: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(published).unwrap();
        let obj = v.as_object_mut().unwrap();
        let mut text = serde_json::Map::new();
        for k in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "hidden_act",
            "tie_word_embeddings",
            "use_sliding_window",
        ] {
            if let Some(x) = obj.remove(k) {
                text.insert(k.into(), x);
            }
        }
        let theta = obj.remove("rope_theta").unwrap();
        let mut rope = obj.remove("rope_scaling").unwrap();
        rope["rope_theta"] = theta;
        rope["rope_type"] = "default".into();
        rope.as_object_mut().unwrap().remove("type");
        text.insert("rope_parameters".into(), rope);
        obj.insert("text_config".into(), text.into());
        let vis = obj["vision_config"].as_object_mut().unwrap();
        if let Some(c) = vis.remove("in_chans") {
            vis.insert("in_channels".into(), c);
        }
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn published_7b_config_counts_the_parameters_transformers_builds() {
        let cfg = seven_b().resolve().unwrap();
        assert_eq!(cfg.parameter_count(), 8_292_166_656);
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
        assert_eq!(cfg.tokens.image_token_id, 151655);
        assert_eq!(cfg.tokens.eos_token_ids, vec![151645]);
    }

    #[test]
    fn transformers5_layout_resolves_to_the_same_config() {
        let t5 = to_transformers5(SEVEN_B);
        let a = seven_b().resolve().unwrap();
        let b = HfConfig::from_json_str(&t5, Path::new("t5.json"))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn tiny_fixture_config_reads_its_own_special_tokens() {
        let cfg = HfConfig::from_dir(&crate::test_util::fixture("qwen2_5_vl_tiny"))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(cfg.tokens.image_token_id, 1996);
        assert_eq!(cfg.tokens.vision_start_token_id, 1993);
        assert_eq!(cfg.tokens.eos_token_ids, vec![1991]);
        assert_eq!(cfg.vision.fullatt_block_indexes, vec![1, 3]);
        assert_eq!(cfg.vision.tokens_per_second, 2.0);
    }

    #[test]
    fn generation_config_eos_ids_override_config_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), SEVEN_B).unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [151645, 151643], "pad_token_id": 151643, "top_p": 0.001}"#,
        )
        .unwrap();
        let cfg = HfConfig::from_dir(dir.path()).unwrap().resolve().unwrap();
        assert_eq!(cfg.tokens.eos_token_ids, vec![151645, 151643]);
        assert_eq!(cfg.tokens.pad_token_id, Some(151643));
    }

    #[test]
    fn resolve_rejects_mrope_sections_not_summing_to_half_head_dim() {
        let mut c = seven_b();
        c.text.rope_scaling.as_mut().unwrap().mrope_section = vec![16, 24, 23];
        let e = c.resolve().unwrap_err().to_string();
        assert!(e.contains("mrope_section") && e.contains("63"), "{e}");
    }

    #[test]
    fn resolve_rejects_heads_that_do_not_divide_hidden_size() {
        let mut c = seven_b();
        c.text.num_attention_heads = 27;
        let e = c.resolve().unwrap_err().to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("3584"),
            "{e}"
        );
        let mut c = seven_b();
        c.text.num_key_value_heads = Some(5);
        assert!(c
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
    }

    #[test]
    fn resolve_rejects_full_attention_blocks_beyond_depth_and_odd_windows() {
        let mut c = seven_b();
        c.vision.fullatt_block_indexes = vec![7, 32];
        assert!(c.resolve().unwrap_err().to_string().contains("block 32"));
        let mut c = seven_b();
        c.vision.window_size = 100;
        assert!(c.resolve().unwrap_err().to_string().contains("window_size"));
    }

    #[test]
    fn missing_required_field_is_a_parse_error_naming_the_file() {
        let e = HfConfig::from_json_str(r#"{"vision_config": {}}"#, Path::new("x/config.json"))
            .unwrap_err();
        assert!(format!("{e}").contains("x/config.json"));
    }

    /// The published 7B config as re-saved by each transformers version (see
    /// `testdata/resaved/README.md` for how they were made).
    const RESAVED: [(&str, &str); 5] = [
        (
            "4.49.0",
            include_str!("testdata/resaved/transformers-4.49.0.json"),
        ),
        (
            "4.53.3",
            include_str!("testdata/resaved/transformers-4.53.3.json"),
        ),
        (
            "4.57.6",
            include_str!("testdata/resaved/transformers-4.57.6.json"),
        ),
        (
            "5.0.0",
            include_str!("testdata/resaved/transformers-5.0.0.json"),
        ),
        (
            "5.24.0",
            include_str!("testdata/resaved/transformers-5.24.0.json"),
        ),
    ];

    fn resave(version: &str) -> serde_json::Value {
        let text = RESAVED.iter().find(|(v, _)| *v == version).unwrap().1;
        serde_json::from_str(text).unwrap()
    }

    fn conflict_of(v: &serde_json::Value) -> String {
        let e = HfConfig::from_json_str(&v.to_string(), Path::new("re/config.json")).unwrap_err();
        assert!(matches!(e, ConfigError::Conflict { .. }), "{e}");
        e.to_string()
    }

    #[test]
    fn issue_15_every_transformers_resave_of_the_7b_config_resolves_to_the_published_one() {
        let want = seven_b().resolve().unwrap();
        for (version, text) in RESAVED {
            let got = HfConfig::from_json_str(text, Path::new(version))
                .unwrap_or_else(|e| panic!("transformers {version}: {e:#}"))
                .resolve()
                .unwrap_or_else(|e| panic!("transformers {version}: {e:#}"));
            assert_eq!(got, want, "transformers {version}");
        }
    }

    #[test]
    fn issue_15_two_spellings_that_disagree_are_refused_naming_both() {
        let mut v = resave("4.57.6");
        v["vision_config"]["in_chans"] = 1.into();
        let e = conflict_of(&v);
        assert!(
            e.contains("`vision_config.in_chans` = 1")
                && e.contains("`vision_config.in_channels` = 3")
                && e.contains("re/config.json"),
            "{e}"
        );

        let mut v = resave("4.57.6");
        v["hidden_size"] = 4096.into();
        let e = conflict_of(&v);
        assert!(
            e.contains("`hidden_size` = 4096") && e.contains("`text_config.hidden_size` = 3584"),
            "{e}"
        );

        let mut v = resave("4.57.6");
        v["torch_dtype"] = "float16".into();
        let e = conflict_of(&v);
        assert!(e.contains("`torch_dtype`") && e.contains("`dtype`"), "{e}");

        let mut v = resave("5.0.0");
        v["text_config"]["rope_scaling"] =
            serde_json::json!({"type": "mrope", "mrope_section": [16, 24, 23]});
        let e = conflict_of(&v);
        assert!(
            e.contains("`text_config.rope_parameters`") && e.contains("`text_config.rope_scaling`"),
            "{e}"
        );

        let mut v = resave("5.0.0");
        v["text_config"]["rope_theta"] = 10000.0.into();
        let e = conflict_of(&v);
        assert!(
            e.contains("`text_config.rope_theta` = 10000")
                && e.contains("`text_config.rope_parameters.rope_theta` = 1000000"),
            "{e}"
        );

        // the same value in both spellings is fine, whatever the number's JSON form
        let mut v = resave("5.0.0");
        v["text_config"]["rope_theta"] = 1_000_000.into();
        v["vision_config"]["in_chans"] = 3.0.into();
        HfConfig::from_json_str(&v.to_string(), Path::new("ok")).unwrap();
    }

    #[test]
    fn issue_15_layer_types_must_cover_every_layer_with_full_attention() {
        let mut v = resave("5.0.0");
        v["text_config"]["layer_types"][27] = "sliding_attention".into();
        let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
        let e = c.resolve().unwrap_err().to_string();
        assert!(
            e.contains("layer_types") && e.contains("layer 27 is `sliding_attention`"),
            "{e}"
        );
        let mut v = resave("5.0.0");
        v["text_config"]["layer_types"]
            .as_array_mut()
            .unwrap()
            .pop();
        let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
        let e = c.resolve().unwrap_err().to_string();
        assert!(e.contains("27 entries for 28 layers"), "{e}");
        let mut v = resave("5.24.0");
        v["vision_config"]["rope_parameters"]["rope_theta"] = 500.0.into();
        let c = HfConfig::from_json_str(&v.to_string(), Path::new("x")).unwrap();
        let e = c.resolve().unwrap_err().to_string();
        assert!(
            e.contains("vision_config.rope_parameters.rope_theta"),
            "{e}"
        );
    }
}
