//! `HfConfig::resolve`: the checks that turn the loose HF mirror into the strict
//! [`Qwen25VlConfig`].

use super::error::ConfigError;
use super::hf::HfConfig;
use super::resolved::{Qwen25VlConfig, SpecialTokens, TextConfig, VisionConfig, VISION_ROPE_THETA};

impl HfConfig {
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
            if theta != VISION_ROPE_THETA {
                return bad(
                    "vision_config.rope_parameters.rope_theta",
                    format!(
                        "{theta} is not the {} the vision tower uses",
                        VISION_ROPE_THETA
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
