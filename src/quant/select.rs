//! Which tensors are quantized: the Linear weights of Qwen2.5-VL by module name, minus the
//! modules a skip entry names.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::PathBuf;

use safetensors::SafeTensors;

use super::shards::io;
use super::QuantError;

/// Names of Linear modules in Qwen2.5-VL (language model, vision blocks, `lm_head`); the
/// merger MLP (`merger.mlp.0`, `merger.mlp.2`) is matched by its numeric child name.
const LINEAR_NAMES: [&str; 10] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv",
    "proj",
    "lm_head",
];

/// Whether `key` with `shape` is the weight of a Linear layer of Qwen2.5-VL.
pub fn is_linear_weight(key: &str, shape: &[usize]) -> bool {
    let Some(module) = key.strip_suffix(".weight") else {
        return false;
    };
    if shape.len() != 2 {
        return false;
    }
    let mut parts = module.rsplit('.');
    let last = parts.next().unwrap_or("");
    let parent = parts.next().unwrap_or("");
    LINEAR_NAMES.contains(&last)
        || (parent == "mlp" && !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Module names of every Linear weight in `shards` (headers only; no tensor data is read).
pub(super) fn linear_modules(shards: &[PathBuf]) -> Result<BTreeSet<String>, QuantError> {
    let mut out = BTreeSet::new();
    for shard in shards {
        let file = File::open(shard).map_err(io("opening", shard))?;
        // SAFETY: read-only map of a file medpipe does not write while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io("memory-mapping", shard))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|source| QuantError::Safetensors {
            path: shard.clone(),
            source,
        })?;
        for (key, view) in st.tensors() {
            if is_linear_weight(&key, view.shape()) {
                out.insert(key.strip_suffix(".weight").unwrap_or(&key).to_string());
            }
        }
    }
    Ok(out)
}

/// Whether a skip entry names `module` or one of its ancestors (whole dotted components).
pub fn is_skipped(module: &str, skip: &[String]) -> bool {
    let parts: Vec<&str> = module.split('.').collect();
    skip.iter().any(|s| {
        let want: Vec<&str> = s.split('.').collect();
        !want.is_empty() && parts.windows(want.len()).any(|w| w == want.as_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_detection_follows_qwen2_5_vl_module_names() {
        for k in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "visual.blocks.0.attn.qkv.weight",
            "visual.blocks.3.attn.proj.weight",
            "visual.merger.mlp.0.weight",
            "visual.merger.mlp.2.weight",
            "lm_head.weight",
            "model.language_model.layers.0.self_attn.o_proj.weight",
        ] {
            assert!(is_linear_weight(k, &[8, 8]), "{k}");
        }
        assert!(!is_linear_weight(
            "visual.patch_embed.proj.weight",
            &[32, 3, 2, 14, 14]
        ));
        assert!(!is_linear_weight("model.embed_tokens.weight", &[2048, 64]));
        assert!(!is_linear_weight(
            "model.layers.0.self_attn.q_proj.bias",
            &[64]
        ));
        assert!(!is_linear_weight("model.norm.weight", &[64]));
        assert!(!is_linear_weight("visual.merger.ln_q.weight", &[32]));
    }

    #[test]
    fn skip_entries_match_whole_dotted_components() {
        let skip = vec!["lm_head".to_string(), "visual.merger".to_string()];
        assert!(is_skipped("lm_head", &skip));
        assert!(is_skipped("visual.merger.mlp.0", &skip));
        assert!(!is_skipped("visual.blocks.0.attn.qkv", &skip));
        assert!(!is_skipped("model.lm_head_extra", &skip));
    }
}
