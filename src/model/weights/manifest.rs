//! The expected-tensor manifest: every tensor a checkpoint of a [`Qwen25VlConfig`] holds,
//! with its PyTorch shape. The loader checks checkpoints against it, and the parameter
//! count is its sum, so the config does not import the loader.

use crate::model::config::Qwen25VlConfig;

/// Every tensor the model described by `cfg` loads, with its checkpoint shape
/// (PyTorch layout: Linear `[out, in]`, Conv3d `[out, in, t, h, w]`). Canonical keys.
pub(crate) fn expected_tensors(cfg: &Qwen25VlConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let lin = |out: &mut Vec<(String, Vec<usize>)>, p: String, i: usize, o: usize, bias: bool| {
        out.push((format!("{p}.weight"), vec![o, i]));
        if bias {
            out.push((format!("{p}.bias"), vec![o]));
        }
    };
    let v = &cfg.vision;
    let d = v.hidden_size;
    out.push((
        "visual.patch_embed.proj.weight".into(),
        vec![
            d,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    ));
    for b in 0..v.depth {
        let p = format!("visual.blocks.{b}");
        out.push((format!("{p}.norm1.weight"), vec![d]));
        out.push((format!("{p}.norm2.weight"), vec![d]));
        lin(&mut out, format!("{p}.attn.qkv"), d, 3 * d, true);
        lin(&mut out, format!("{p}.attn.proj"), d, d, true);
        lin(
            &mut out,
            format!("{p}.mlp.gate_proj"),
            d,
            v.intermediate_size,
            true,
        );
        lin(
            &mut out,
            format!("{p}.mlp.up_proj"),
            d,
            v.intermediate_size,
            true,
        );
        lin(
            &mut out,
            format!("{p}.mlp.down_proj"),
            v.intermediate_size,
            d,
            true,
        );
    }
    let m = d * v.merge_unit();
    out.push(("visual.merger.ln_q.weight".into(), vec![d]));
    lin(&mut out, "visual.merger.mlp.0".into(), m, m, true);
    lin(
        &mut out,
        "visual.merger.mlp.2".into(),
        m,
        v.out_hidden_size,
        true,
    );

    let t = &cfg.text;
    let h = t.hidden_size;
    let kvd = t.num_kv_heads * t.head_dim;
    out.push(("model.embed_tokens.weight".into(), vec![t.vocab_size, h]));
    for l in 0..t.num_layers {
        let p = format!("model.layers.{l}");
        lin(
            &mut out,
            format!("{p}.self_attn.q_proj"),
            h,
            t.num_heads * t.head_dim,
            true,
        );
        lin(&mut out, format!("{p}.self_attn.k_proj"), h, kvd, true);
        lin(&mut out, format!("{p}.self_attn.v_proj"), h, kvd, true);
        lin(
            &mut out,
            format!("{p}.self_attn.o_proj"),
            t.num_heads * t.head_dim,
            h,
            false,
        );
        lin(
            &mut out,
            format!("{p}.mlp.gate_proj"),
            h,
            t.intermediate_size,
            false,
        );
        lin(
            &mut out,
            format!("{p}.mlp.up_proj"),
            h,
            t.intermediate_size,
            false,
        );
        lin(
            &mut out,
            format!("{p}.mlp.down_proj"),
            t.intermediate_size,
            h,
            false,
        );
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !t.tie_word_embeddings {
        lin(&mut out, "lm_head".into(), h, t.vocab_size, false);
    }
    out
}

impl Qwen25VlConfig {
    /// Every tensor a checkpoint of this config holds: published-layout key and PyTorch
    /// shape (Linear `[out, in]`, Conv3d `[out, in, t, h, w]`), the exact set the loader
    /// demands. Writers of checkpoints (e.g. a seeded tiny model) can iterate it.
    pub fn tensor_manifest(&self) -> Vec<(String, Vec<usize>)> {
        expected_tensors(self)
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
