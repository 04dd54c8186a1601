//! Seeded initial weights of `builtin:tiny`, in the key layout of the published Qwen2.5-VL
//! checkpoints (`model.layers.N.…`, `model.embed_tokens`, `lm_head`, `visual.blocks.N.…`,
//! `visual.merger.…`, `visual.patch_embed.proj`).
//!
//! Initialization follows transformers' `Qwen2_5_VLPreTrainedModel._init_weights`
//! (models/qwen2_5_vl/modeling_qwen2_5_vl.py): Linear, Conv3d and Embedding weights
//! ~ normal(0, `initializer_range` = 0.02), biases 0, RMSNorm weights 1.
//!
//! Byte stability: each tensor draws from its own ChaCha20 stream (rand_chacha, whose output
//! for a given key is fixed by the ChaCha20 specification), keyed by
//! sha256("medpipe builtin:tiny weights" ‖ seed (u64 LE) ‖ tensor key). Uniforms are built
//! from the top 53 bits of `next_u64` and turned into normals with Box–Muller, all written out
//! here, so no library's sampling algorithm can change the bytes.

use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use super::spec::TinySpec;

/// Standard deviation of the normal initialization (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// How a tensor is initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// normal(0, [`INIT_STD`]): Linear, Conv3d and Embedding weights.
    Normal,
    /// All zeros: biases.
    Zeros,
    /// All ones: RMSNorm weights.
    Ones,
}

/// Every tensor of a Qwen2.5-VL checkpoint with `spec`'s dimensions: key → (shape, init),
/// sorted by key.
pub fn layout(spec: &TinySpec) -> BTreeMap<String, (Vec<usize>, Init)> {
    let mut t = BTreeMap::new();
    let mut add = |k: String, shape: Vec<usize>, init: Init| {
        t.insert(k, (shape, init));
    };
    let (h, v) = (spec.hidden_size, spec.vocab_size);
    let hd = spec.head_dim();
    let (q, kv) = (spec.num_attention_heads * hd, spec.num_key_value_heads * hd);
    let i = spec.intermediate_size;
    add("model.embed_tokens.weight".into(), vec![v, h], Init::Normal);
    if !spec.tie_word_embeddings {
        add("lm_head.weight".into(), vec![v, h], Init::Normal);
    }
    add("model.norm.weight".into(), vec![h], Init::Ones);
    for l in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
        for (name, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            add(
                format!("{p}.self_attn.{name}.weight"),
                vec![out, h],
                Init::Normal,
            );
            add(format!("{p}.self_attn.{name}.bias"), vec![out], Init::Zeros);
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            Init::Normal,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            Init::Normal,
        );
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h], Init::Normal);
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            Init::Normal,
        );
    }
    let vc = &spec.vision_config;
    let (vh, vi) = (vc.hidden_size, vc.intermediate_size);
    add(
        "visual.patch_embed.proj.weight".into(),
        vec![
            vh,
            vc.in_chans,
            vc.temporal_patch_size,
            vc.patch_size,
            vc.patch_size,
        ],
        Init::Normal,
    );
    for b in 0..vc.depth {
        let p = format!("visual.blocks.{b}");
        add(format!("{p}.norm1.weight"), vec![vh], Init::Ones);
        add(format!("{p}.norm2.weight"), vec![vh], Init::Ones);
        add(
            format!("{p}.attn.qkv.weight"),
            vec![3 * vh, vh],
            Init::Normal,
        );
        add(format!("{p}.attn.qkv.bias"), vec![3 * vh], Init::Zeros);
        add(format!("{p}.attn.proj.weight"), vec![vh, vh], Init::Normal);
        add(format!("{p}.attn.proj.bias"), vec![vh], Init::Zeros);
        for (name, out, inp) in [
            ("gate_proj", vi, vh),
            ("up_proj", vi, vh),
            ("down_proj", vh, vi),
        ] {
            add(
                format!("{p}.mlp.{name}.weight"),
                vec![out, inp],
                Init::Normal,
            );
            add(format!("{p}.mlp.{name}.bias"), vec![out], Init::Zeros);
        }
    }
    // The merger concatenates spatial_merge_size² neighbouring patches, then an MLP
    // (Linear, GELU, Linear) maps them to the text width.
    let m = vh * vc.spatial_merge_size * vc.spatial_merge_size;
    add("visual.merger.ln_q.weight".into(), vec![vh], Init::Ones);
    add(
        "visual.merger.mlp.0.weight".into(),
        vec![m, m],
        Init::Normal,
    );
    add("visual.merger.mlp.0.bias".into(), vec![m], Init::Zeros);
    add(
        "visual.merger.mlp.2.weight".into(),
        vec![vc.out_hidden_size, m],
        Init::Normal,
    );
    add(
        "visual.merger.mlp.2.bias".into(),
        vec![vc.out_hidden_size],
        Init::Zeros,
    );
    t
}

/// The values of one tensor: `numel` f32s drawn as its [`Init`] says, from the stream of
/// (`seed`, `key`).
pub fn init_values(seed: u64, key: &str, numel: usize, init: Init) -> Vec<f32> {
    match init {
        Init::Zeros => vec![0.0; numel],
        Init::Ones => vec![1.0; numel],
        Init::Normal => {
            let mut h = Sha256::new();
            h.update(b"medpipe builtin:tiny weights");
            h.update(seed.to_le_bytes());
            h.update(key.as_bytes());
            let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
            let mut out = Vec::with_capacity(numel + 1);
            while out.len() < numel {
                let (a, b) = box_muller(unit(&mut rng), unit(&mut rng));
                out.push((a * INIT_STD) as f32);
                out.push((b * INIT_STD) as f32);
            }
            out.truncate(numel);
            out
        }
    }
}

/// A uniform in (0, 1]: the top 53 bits of a u64, plus one ulp so `ln` never sees 0.
fn unit(rng: &mut ChaCha20Rng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
}

/// Two independent standard normals from two uniforms in (0, 1] (Box–Muller).
fn box_muller(u1: f64, u2: f64) -> (f64, f64) {
    let r = (-2.0 * u1.ln()).sqrt();
    let t = std::f64::consts::TAU * u2;
    (r * t.cos(), r * t.sin())
}

/// The whole checkpoint as `model.safetensors` bytes (f32, little endian, metadata
/// `{"format": "pt"}` as transformers writes it).
///
/// # Errors
/// Only if safetensors rejects a view, which the shapes computed here rule out.
pub fn safetensors_bytes(
    spec: &TinySpec,
    seed: u64,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = layout(spec)
        .into_iter()
        .map(|(key, (shape, init))| {
            let numel = shape.iter().product();
            let bytes = init_values(seed, &key, numel, init)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (key, shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(k, shape, bytes)| {
            Ok((
                k.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture;

    fn fixture_keys_and_shapes() -> BTreeMap<String, Vec<usize>> {
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect()
    }

    #[test]
    fn layout_for_the_fixture_config_equals_the_fixture_checkpoint_keys_and_shapes() {
        let text = std::fs::read_to_string(fixture("qwen2_5_vl_tiny/config.json")).unwrap();
        let spec: TinySpec = serde_json::from_str(&text).unwrap();
        let ours: BTreeMap<String, Vec<usize>> = layout(&spec)
            .into_iter()
            .map(|(k, (s, _))| (k, s))
            .collect();
        assert_eq!(ours, fixture_keys_and_shapes());
    }

    #[test]
    fn tiny_layout_has_the_fixture_key_set() {
        // builtin:tiny has the fixture's layer counts (2 text layers, 4 vision blocks), so
        // the published naming must give exactly the same keys.
        let ours: Vec<String> = layout(&TinySpec::tiny(2048)).into_keys().collect();
        let theirs: Vec<String> = fixture_keys_and_shapes().into_keys().collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn normal_init_has_the_configured_spread_and_zero_mean() {
        // 100k draws: the sample std is within 1% of 0.02 and the mean within 4 standard
        // errors (4 × 0.02/√1e5 ≈ 2.5e-4) of 0 for a correct sampler.
        const N: usize = 100_000;
        let x = init_values(7, "w", N, Init::Normal);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / N as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / N as f64;
        assert!(mean.abs() < 2.5e-4, "mean {mean}");
        assert!(
            (var.sqrt() - INIT_STD).abs() < 0.01 * INIT_STD,
            "std {}",
            var.sqrt()
        );
    }

    #[test]
    fn streams_depend_on_seed_and_key_only() {
        let a = init_values(1, "model.norm.weight.x", 64, Init::Normal);
        assert_eq!(a, init_values(1, "model.norm.weight.x", 64, Init::Normal));
        assert_ne!(a, init_values(2, "model.norm.weight.x", 64, Init::Normal));
        assert_ne!(a, init_values(1, "other", 64, Init::Normal));
        // A prefix of a longer draw: a tensor's values do not depend on its size.
        assert_eq!(
            a[..10],
            init_values(1, "model.norm.weight.x", 10, Init::Normal)[..]
        );
    }

    #[test]
    fn same_seed_gives_identical_bytes_and_another_seed_does_not() {
        let spec = TinySpec::tiny(512);
        let a = safetensors_bytes(&spec, 3).unwrap();
        assert_eq!(a, safetensors_bytes(&spec, 3).unwrap());
        assert_ne!(a, safetensors_bytes(&spec, 4).unwrap());
        let st = safetensors::SafeTensors::deserialize(&a).unwrap();
        let norm = st.tensor("model.layers.1.input_layernorm.weight").unwrap();
        assert!(norm.data().chunks(4).all(|c| c == 1f32.to_le_bytes()));
    }
}
