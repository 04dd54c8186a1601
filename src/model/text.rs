//! Qwen2.5-VL language model: embeddings, decoder layers (GQA attention with q/k/v bias
//! and M-RoPE, SiLU-gated MLP, pre-RMSNorm) and the final norm.
//!
//! Follows transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`
//! (`Qwen2_5_VLAttention`, `Qwen2_5_VLDecoderLayer`, `Qwen2_5_VLTextModel`). GQA: query head
//! `i` reads key/value head `i / (heads / kv_heads)` (the reference's `repeat_kv`, i.e.
//! k0,k0,k1,k1); instead of materialising the repeats, the query heads of one group are
//! stacked along the sequence axis, which computes the same products.

use burn::module::Param;
use burn::nn::Embedding;
use burn::prelude::*;
use std::ops::Range;

use crate::kernels::{self, Kernels};
use crate::model::cache::KvCache;
use crate::model::config::TextConfig;
use crate::model::error::ModelError;
use crate::model::linear::{Proj, ProjSpec, RmsNorm};
use crate::model::lora::Site;
use crate::model::rope::{apply_rotary, RopeTables};
use crate::model::weights::WeightSource;

/// The token embedding table `[vocab, hidden]`: f32, or on the CPU a bf16 checkpoint's
/// bits read in place ([`Kernels::keeps_bf16_bits`]), widened a looked-up row at a time.
#[derive(Module, Debug)]
pub enum TokenEmbedding<B: Kernels> {
    Dense(Embedding<B>),
    Bf16(Tensor<B, 2, Int>),
}

impl<B: Kernels> TokenEmbedding<B> {
    fn load(
        src: &mut WeightSource,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let key = "model.embed_tokens.weight";
        if B::keeps_bf16_bits() && src.is_bf16(key) {
            let data = src.bf16_bits_in_place(key, &shape)?;
            return Ok(Self::Bf16(Tensor::from_data(
                data,
                (device, burn::tensor::DType::U16),
            )));
        }
        let weight = src.tensor(key, shape, device)?;
        Ok(Self::Dense(Embedding {
            weight: Param::from_tensor(weight),
        }))
    }

    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Bf16(bits) => {
                let [b, s] = ids.dims();
                let table = kernels::Bf16Weight::of(bits);
                let d = table.shape[1];
                kernels::bf16_rows(&table, ids.reshape([b * s])).reshape([b, s, d])
            }
        }
    }

    /// `hidden · tableᵀ`, the logits of a tied `lm_head`: `[n, hidden]` → `[n, vocab]`.
    fn tied_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Dense(e) => hidden.matmul(e.weight.val().transpose()),
            Self::Bf16(bits) => kernels::bf16_matmul(hidden, &kernels::Bf16Weight::of(bits)),
        }
    }
}

/// Causal self-attention with grouped key/value heads.
#[derive(Module, Debug)]
pub struct Attention<B: Kernels> {
    q_proj: Proj<B>,
    k_proj: Proj<B>,
    v_proj: Proj<B>,
    o_proj: Proj<B>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl<B: Kernels> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `mask`: `[batch, 1, seq, past + seq]` (true = hidden)
    /// - returns `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [b, s, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = h / kv;
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, s, h, hd])
            .swap_dims(1, 2); // [b, h, s, hd]
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, s, kv, hd])
            .swap_dims(1, 2); // [b, kv, s, hd]
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, kv, hd])
            .swap_dims(1, 2);
        let q = apply_rotary(q, &rope.cos, &rope.sin);
        let k = apply_rotary(k, &rope.cos, &rope.sin);
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?, // [b, kv, past + s, hd]
            None => (k, v),
        };
        let t = k.dims()[2];
        // [b, h, s, hd] -> [b, kv, rep·s, hd]: heads of a group are adjacent.
        let q = q.reshape([b, kv, rep * s, hd]);
        let mask = mask.map(|m| m.clone().repeat_dim(2, rep).expand([b, kv, rep * s, t]));
        let o = kernels::sdpa(q, k, v, mask);
        let o = o
            .reshape([b, h, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, h * hd]);
        Ok(self.o_proj.forward(o))
    }
}

/// SiLU-gated MLP without biases.
#[derive(Module, Debug)]
pub struct Mlp<B: Kernels> {
    gate_proj: Proj<B>,
    up_proj: Proj<B>,
    down_proj: Proj<B>,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Kernels> {
    self_attn: Attention<B>,
    mlp: Mlp<B>,
    input_layernorm: RmsNorm<B>,
    post_attention_layernorm: RmsNorm<B>,
}

/// Embeddings, decoder stack and final norm (checkpoint prefix `model.`).
#[derive(Module, Debug)]
pub struct TextModel<B: Kernels> {
    embed_tokens: TokenEmbedding<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: RmsNorm<B>,
}

impl<B: Kernels> TextModel<B> {
    /// Loads `model.*` (canonical keys).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub(crate) fn load(
        src: &mut WeightSource,
        cfg: &TextConfig,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let embed_tokens = TokenEmbedding::load(src, [cfg.vocab_size, d], device)?;
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let it = cfg.intermediate_size;
        let spec = |d_in, d_out, bias| ProjSpec { d_in, d_out, bias };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: Proj::load(src, &format!("{a}.q_proj"), spec(d, qd, true), device)?,
                    k_proj: Proj::load(src, &format!("{a}.k_proj"), spec(d, kvd, true), device)?,
                    v_proj: Proj::load(src, &format!("{a}.v_proj"), spec(d, kvd, true), device)?,
                    o_proj: Proj::load(src, &format!("{a}.o_proj"), spec(qd, d, false), device)?,
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                },
                mlp: Mlp {
                    gate_proj: Proj::load(
                        src,
                        &format!("{m}.gate_proj"),
                        spec(d, it, false),
                        device,
                    )?,
                    up_proj: Proj::load(src, &format!("{m}.up_proj"), spec(d, it, false), device)?,
                    down_proj: Proj::load(
                        src,
                        &format!("{m}.down_proj"),
                        spec(it, d, false),
                        device,
                    )?,
                },
                input_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.input_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                    device,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                    device,
                )?,
            });
        }
        Ok(TextModel {
            embed_tokens,
            layers,
            norm: RmsNorm::load(src, "model.norm", d, cfg.rms_norm_eps, device)?,
        })
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed_tokens.forward(ids)
    }

    /// Whether the embedding table is held as bf16 bits.
    #[cfg(test)]
    pub(crate) fn embeds_in_bf16(&self) -> bool {
        matches!(self.embed_tokens, TokenEmbedding::Bf16(_))
    }

    /// Logits through the embedding matrix (a tied `lm_head`): `[n, hidden]` → `[n, vocab]`.
    pub(crate) fn tied_logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        self.embed_tokens.tied_logits(hidden)
    }

    /// Every LoRA target projection (the seven of [`crate::model::lora::TARGET_MODULES`] in
    /// each layer) with its site.
    pub(crate) fn targets(&self) -> Vec<(Site, &Proj<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (module, p) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((Site::new(i, module), p));
            }
        }
        out
    }

    /// [`Self::targets`], mutably.
    pub(crate) fn targets_mut(&mut self) -> Vec<(Site, &mut Proj<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for (module, p) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((Site::new(i, module), p));
            }
        }
        out
    }

    /// Runs the decoder stack and the final norm, appending to `caches` when given
    /// (without caches the keys are just this call's: full-sequence forward / training).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` input embeddings; `mask`: `[batch, 1, seq, past + seq]`
    ///   (true = hidden) or `None` for "attend to everything" (one-token steps without
    ///   padding)
    /// - returns `[batch, seq, hidden]`
    ///
    /// # Errors
    /// [`ModelError::CacheFull`], or a wrong number of caches.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        mut caches: Option<&mut [KvCache<B>]>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        if let Some(c) = &caches {
            if c.len() != self.layers.len() {
                return Err(ModelError::Input {
                    name: "caches",
                    reason: format!("{} caches for {} layers", c.len(), self.layers.len()),
                });
            }
        }
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_mut().map(|c| &mut c[i]);
            x = layer.forward(x, rope, mask, cache)?;
        }
        Ok(self.norm.forward(x))
    }

    /// Decoder layers `range` of a full-sequence forward (no caches), without the final
    /// norm: the trainer runs the stack in pieces for layer recomputation (a piece run twice
    /// draws the same LoRA dropout masks, `model::dropout`).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    ///
    /// # Errors
    /// [`ModelError::Input`] when `range` is not within the stack.
    pub(crate) fn forward_layers(
        &self,
        range: Range<usize>,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let layers = self
            .layers
            .get(range.clone())
            .ok_or_else(|| ModelError::Input {
                name: "layers",
                reason: format!("{range:?} of {} decoder layers", self.layers.len()),
            })?;
        let mut x = x;
        for layer in layers {
            x = layer.forward(x, rope, mask, None)?;
        }
        Ok(x)
    }

    /// The final RMSNorm (after [`Self::forward_layers`] over the whole stack).
    pub(crate) fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(x)
    }

    /// Decoder layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

impl<B: Kernels> DecoderLayer<B> {
    /// Pre-norm attention and MLP, each added to the residual stream.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Option<&Tensor<B, 4, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let a =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache)?;
        let x = x + a;
        let h = self.post_attention_layernorm.forward(x.clone());
        let m = &self.mlp;
        let h = m.down_proj.forward(kernels::silu_mul(
            m.gate_proj.forward(h.clone()),
            m.up_proj.forward(h),
        ));
        Ok(x + h)
    }
}

/// Memory accounting, kept apart from the forward code.
impl<B: Kernels> TextModel<B> {
    /// Bytes held by the decoder's projections (see [`Proj::stored_bytes`]).
    pub(crate) fn linear_bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .map(Proj::stored_bytes)
            .sum()
    }
}
