//! Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks
//! and the 2×2 patch merger.
//!
//! Follows transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`:
//! `Qwen2_5_VisionPatchEmbed` (a Conv3d whose stride equals its kernel, i.e. one matmul
//! over flattened `C·T·P·P` patches), `Qwen2_5_VisionRotaryEmbedding` + `rot_pos_emb`
//! (each patch rotates by its row in the first quarter and its column in the second
//! quarter of the head, repeated twice), `get_window_index` (merged-token windows of
//! `window_size / merge / patch` per side, partial windows at the bottom/right edges
//! kept short, empty ones dropped), `Qwen2_5_VLVisionBlock` (RMSNorm, attention over
//! windows or, in `fullatt_block_indexes`, over each frame; gated-SiLU MLP with biases)
//! and `Qwen2_5_VLPatchMerger` (RMSNorm `ln_q`, concat 2×2, Linear–GELU(erf)–Linear),
//! followed by the inverse window permutation.

use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::{DType, TensorData};

use crate::kernels::{self, Kernels};
use crate::model::config::{VisionConfig, VISION_ROPE_THETA};
use crate::model::error::ModelError;
use crate::model::linear::{Proj, ProjSpec, RmsNorm};
use crate::model::qwen::fits_one_buffer;
use crate::model::rope::rotate_half;
use crate::model::weights::WeightSource;

/// Vision RMSNorm epsilon: fixed in the reference (`Qwen2RMSNorm(…, eps=1e-6)`), not in
/// the config.
const VISION_NORM_EPS: f64 = 1e-6;

/// Where each window/frame segment lives in the reordered patch sequence.
struct Segments<B: Kernels> {
    /// Number of segments.
    count: usize,
    /// Longest segment (patches).
    max_len: usize,
    /// `None` when all segments have `max_len` patches (a plain reshape suffices).
    padded: Option<PaddedLayout<B>>,
}

struct PaddedLayout<B: Kernels> {
    /// `[count·max_len]` source row of each padded slot (pads point at row 0).
    gather: Tensor<B, 1, Int>,
    /// `[seq]` padded slot of each real row.
    scatter: Tensor<B, 1, Int>,
    /// `[count, 1, max_len, max_len]`, true = key is padding.
    mask: Tensor<B, 4, Bool>,
}

impl<B: Kernels> Segments<B> {
    fn new(lens: &[usize], device: &B::Device) -> Self {
        let count = lens.len();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        if lens.iter().all(|&l| l == max_len) {
            return Segments {
                count,
                max_len,
                padded: None,
            };
        }
        let mut gather = vec![0i64; count * max_len];
        let mut scatter = Vec::with_capacity(lens.iter().sum());
        let mut mask = vec![false; count * max_len * max_len];
        let mut row = 0i64;
        for (s, &len) in lens.iter().enumerate() {
            for j in 0..max_len {
                let slot = s * max_len + j;
                if j < len {
                    gather[slot] = row;
                    scatter.push(slot as i64);
                    row += 1;
                } else {
                    for i in 0..max_len {
                        mask[(s * max_len + i) * max_len + j] = true;
                    }
                }
            }
        }
        let n = scatter.len();
        Segments {
            count,
            max_len,
            padded: Some(PaddedLayout {
                gather: Tensor::from_data(TensorData::new(gather, [count * max_len]), device),
                scatter: Tensor::from_data(TensorData::new(scatter, [n]), device),
                mask: Tensor::from_bool(
                    TensorData::new(mask, [count, 1, max_len, max_len]),
                    device,
                ),
            }),
        }
    }
}

/// Self-attention over segments (windows or frames) with 2-D rotary.
#[derive(Module, Debug)]
pub struct VisionAttention<B: Kernels> {
    qkv: Proj<B>,
    proj: Proj<B>,
    num_heads: usize,
    head_dim: usize,
}

impl<B: Kernels> VisionAttention<B> {
    /// # Shapes
    /// - `x`: `[seq, hidden]`; `cos`, `sin`: `[seq, 1, head_dim]` → `[seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        seg: &Segments<B>,
    ) -> Tensor<B, 2> {
        let [s, d] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        let qkv = self.qkv.forward(x).reshape([s, 3, h, hd]);
        // The reference rotates in f32 and casts back (`apply_rotary_pos_emb_vision`).
        let rot = |t: Tensor<B, 3>| {
            let dt = t.dtype();
            let t = t.cast(DType::F32);
            (t.clone() * cos.clone() + rotate_half(t) * sin.clone()).cast(dt)
        };
        let q = rot(qkv.clone().narrow(1, 0, 1).reshape([s, h, hd]));
        let k = rot(qkv.clone().narrow(1, 1, 1).reshape([s, h, hd]));
        let v = qkv.narrow(1, 2, 1).reshape([s, h, hd]);
        let (n, l) = (seg.count, seg.max_len);
        // [seq, h, hd] -> [segments, h, len, hd]
        let split = |t: Tensor<B, 3>| {
            let t = match &seg.padded {
                Some(p) => t.select(0, p.gather.clone()),
                None => t,
            };
            t.reshape([n, l, h, hd]).swap_dims(1, 2)
        };
        let mask = seg
            .padded
            .as_ref()
            .map(|p| p.mask.clone().expand([n, h, l, l]));
        let o = kernels::sdpa(split(q), split(k), split(v), mask);
        let o = o.swap_dims(1, 2).reshape([n * l, d]); // [segments·len, hidden]
        let o = match &seg.padded {
            Some(p) => o.select(0, p.scatter.clone()),
            None => o,
        };
        self.proj.forward(o)
    }
}

/// Gated SiLU MLP with biases.
#[derive(Module, Debug)]
pub struct VisionMlp<B: Kernels> {
    gate_proj: Proj<B>,
    up_proj: Proj<B>,
    down_proj: Proj<B>,
}

/// One vision block.
#[derive(Module, Debug)]
pub struct VisionBlock<B: Kernels> {
    norm1: RmsNorm<B>,
    norm2: RmsNorm<B>,
    attn: VisionAttention<B>,
    mlp: VisionMlp<B>,
}

/// Merges `merge²` neighbouring patches into one LLM token.
#[derive(Module, Debug)]
pub struct PatchMerger<B: Kernels> {
    ln_q: RmsNorm<B>,
    /// Checkpoint key `merger.mlp.0`.
    fc1: Proj<B>,
    /// Checkpoint key `merger.mlp.2` (index 1 is the parameterless GELU).
    fc2: Proj<B>,
    merge_unit: usize,
}

/// The whole vision tower.
#[derive(Module, Debug)]
pub struct VisionTransformer<B: Kernels> {
    /// Checkpoint key `patch_embed.proj` (Conv3d weight flattened to a projection).
    patch_embed: Proj<B>,
    blocks: Vec<VisionBlock<B>>,
    merger: PatchMerger<B>,
    #[module(skip)]
    cfg: VisionConfig,
}

/// Host-side layout of a batch of images: the window permutation and segment lengths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WindowLayout {
    /// Merged-token index (in processor order) of each merged token in window order.
    pub window_index: Vec<usize>,
    /// Patches per non-empty window, in window order.
    pub window_lens: Vec<usize>,
    /// Patches per frame (full-attention segments), in order.
    pub frame_lens: Vec<usize>,
    /// `(row, col)` patch coordinates in window order.
    pub patch_rc: Vec<(usize, usize)>,
}

/// Computes the reference's `get_window_index`, `cu_seqlens` and `rot_pos_emb`
/// coordinates for `grids` of `(t, h, w)` patches.
pub(crate) fn window_layout(cfg: &VisionConfig, grids: &[[usize; 3]]) -> WindowLayout {
    let m = cfg.spatial_merge_size;
    let mu = cfg.merge_unit();
    let ws = cfg.window_size / m / cfg.patch_size;
    let mut out = WindowLayout {
        window_index: Vec::new(),
        window_lens: Vec::new(),
        frame_lens: Vec::new(),
        patch_rc: Vec::new(),
    };
    let mut offset = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / m, w / m);
        // The reference always pads by a (possibly full) window; empty windows vanish.
        let (nwh, nww) = ((lh + ws - lh % ws) / ws, (lw + ws - lw % ws) / ws);
        for f in 0..t {
            out.frame_lens.push(h * w);
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut n = 0;
                    for y in wy * ws..((wy + 1) * ws).min(lh) {
                        for x in wx * ws..((wx + 1) * ws).min(lw) {
                            out.window_index.push(offset + (f * lh + y) * lw + x);
                            for iy in 0..m {
                                for ix in 0..m {
                                    out.patch_rc.push((y * m + iy, x * m + ix));
                                }
                            }
                            n += 1;
                        }
                    }
                    if n > 0 {
                        out.window_lens.push(n * mu);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    out
}

impl<B: Kernels> VisionTransformer<B> {
    /// Loads `visual.*` (canonical keys).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub(crate) fn load(
        src: &mut WeightSource,
        cfg: &VisionConfig,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let d = cfg.hidden_size;
        let pd = cfg.patch_dim();
        let conv: Tensor<B, 5> = src.tensor(
            "visual.patch_embed.proj.weight",
            [
                d,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
            device,
        )?;
        let patch_embed = Proj::from_weight(conv.reshape([d, pd]), None);
        let lin = |i, o| ProjSpec {
            d_in: i,
            d_out: o,
            bias: true,
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for b in 0..cfg.depth {
            let p = format!("visual.blocks.{b}");
            let it = cfg.intermediate_size;
            blocks.push(VisionBlock {
                norm1: RmsNorm::load(src, &format!("{p}.norm1"), d, VISION_NORM_EPS, device)?,
                norm2: RmsNorm::load(src, &format!("{p}.norm2"), d, VISION_NORM_EPS, device)?,
                attn: VisionAttention {
                    qkv: Proj::load(src, &format!("{p}.attn.qkv"), lin(d, 3 * d), device)?,
                    proj: Proj::load(src, &format!("{p}.attn.proj"), lin(d, d), device)?,
                    num_heads: cfg.num_heads,
                    head_dim: d / cfg.num_heads,
                },
                mlp: VisionMlp {
                    gate_proj: Proj::load(src, &format!("{p}.mlp.gate_proj"), lin(d, it), device)?,
                    up_proj: Proj::load(src, &format!("{p}.mlp.up_proj"), lin(d, it), device)?,
                    down_proj: Proj::load(src, &format!("{p}.mlp.down_proj"), lin(it, d), device)?,
                },
            });
        }
        let mu = cfg.merge_unit();
        let merger = PatchMerger {
            ln_q: RmsNorm::load(src, "visual.merger.ln_q", d, VISION_NORM_EPS, device)?,
            fc1: Proj::load(src, "visual.merger.mlp.0", lin(d * mu, d * mu), device)?,
            fc2: Proj::load(
                src,
                "visual.merger.mlp.2",
                lin(d * mu, cfg.out_hidden_size),
                device,
            )?,
            merge_unit: mu,
        };
        Ok(VisionTransformer {
            patch_embed,
            blocks,
            merger,
            cfg: cfg.clone(),
        })
    }

    /// Image embeddings for the LLM, in processor (row-major merged-token) order.
    ///
    /// # Shapes
    /// - `pixel_values`: `[Σ t·h·w, C·T·P·P]` as the image processor flattens patches
    /// - returns `[Σ t·h·w / merge², out_hidden_size]`
    ///
    /// # Errors
    /// [`ModelError::Input`] when `pixel_values` does not match `grids`.
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
    ) -> Result<Tensor<B, 2>, ModelError> {
        let cfg = &self.cfg;
        let device = pixel_values.device();
        let [rows, cols] = pixel_values.dims();
        let m = cfg.spatial_merge_size;
        let want: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if rows != want || cols != cfg.patch_dim() {
            return Err(ModelError::Input {
                name: "pixel_values",
                reason: format!(
                    "shape [{rows}, {cols}], expected [{want}, {}] for grids {grids:?}",
                    cfg.patch_dim()
                ),
            });
        }
        if let Some(g) = grids
            .iter()
            .find(|g| g[1] % m != 0 || g[2] % m != 0 || g[0] == 0)
        {
            return Err(ModelError::Input {
                name: "image_grid_thw",
                reason: format!("grid {g:?}: h and w must be multiples of {m}, t positive"),
            });
        }
        let layout = window_layout(cfg, grids);
        self.work_fits(rows, &layout, &device)?;
        let mu = cfg.merge_unit();
        let perm: Vec<i64> = layout
            .window_index
            .iter()
            .flat_map(|&k| (0..mu).map(move |u| (k * mu + u) as i64))
            .collect();
        let mut inverse = vec![0i64; layout.window_index.len()];
        for (pos, &k) in layout.window_index.iter().enumerate() {
            inverse[k] = pos as i64;
        }
        let (cos, sin) = self.rotary(&layout.patch_rc, &device);
        let windows = Segments::new(&layout.window_lens, &device);
        let frames = Segments::new(&layout.frame_lens, &device);

        let x = self.patch_embed.forward(pixel_values); // [seq, hidden]
        let mut x = x.select(0, Tensor::from_data(TensorData::new(perm, [rows]), &device));
        for (i, blk) in self.blocks.iter().enumerate() {
            let seg = if cfg.fullatt_block_indexes.contains(&i) {
                &frames
            } else {
                &windows
            };
            x = x.clone()
                + blk
                    .attn
                    .forward(blk.norm1.forward(x.clone()), &cos, &sin, seg);
            let h = blk.norm2.forward(x.clone());
            let mlp = &blk.mlp;
            let h = mlp.down_proj.forward(kernels::silu_mul(
                mlp.gate_proj.forward(h.clone()),
                mlp.up_proj.forward(h),
            ));
            x = x + h;
        }
        let mg = &self.merger;
        let d = cfg.hidden_size;
        let x = mg.ln_q.forward(x).reshape([rows / mu, mu * d]); // [tokens, merge²·hidden]
        let x = mg.fc2.forward(gelu(mg.fc1.forward(x)));
        let n = inverse.len();
        Ok(x.select(0, Tensor::from_data(TensorData::new(inverse, [n]), &device)))
    }

    /// Refuses images whose attention scores (f32, every head, each window or frame
    /// padded to the longest: see `Segments`) or MLP activations would not fit one buffer
    /// of `device`.
    fn work_fits(
        &self,
        rows: usize,
        layout: &WindowLayout,
        device: &B::Device,
    ) -> Result<(), ModelError> {
        let h = self.cfg.num_heads;
        for (per, lens) in [
            ("per window", &layout.window_lens),
            ("per frame", &layout.frame_lens),
        ] {
            let (n, l) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
            let scores = [n, h, l, l];
            fits_one_buffer::<B>(
                device,
                "vision attention scores",
                &scores,
                DType::F32,
                Some(per),
            )?;
        }
        let dtype = crate::device::float_dtype::<B>(device);
        let mlp = [rows, self.cfg.intermediate_size];
        fits_one_buffer::<B>(device, "vision MLP activations", &mlp, dtype, None)
    }

    /// f32 cos/sin `[seq, 1, head_dim]` for patches at `(row, col)`.
    fn rotary(&self, rc: &[(usize, usize)], device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let hd = self.cfg.hidden_size / self.cfg.num_heads;
        let dim = hd / 2;
        let q = dim / 2;
        let f32_ = (device, DType::F32);
        let inv: Vec<f32> = (0..q)
            .map(|j| (1.0 / VISION_ROPE_THETA.powf((2 * j) as f64 / dim as f64)) as f32)
            .collect();
        let inv: Tensor<B, 2> =
            Tensor::<B, 1>::from_data(TensorData::new(inv, [q]), f32_).reshape([1, q]);
        let n = rc.len();
        let rows: Vec<f32> = rc.iter().map(|&(r, _)| r as f32).collect();
        let cols: Vec<f32> = rc.iter().map(|&(_, c)| c as f32).collect();
        let r: Tensor<B, 2> = Tensor::from_data(TensorData::new(rows, [n, 1]), f32_);
        let c: Tensor<B, 2> = Tensor::from_data(TensorData::new(cols, [n, 1]), f32_);
        let f = Tensor::cat(vec![r * inv.clone(), c * inv], 1); // [seq, head_dim/2]
        let emb = Tensor::cat(vec![f.clone(), f], 1).unsqueeze_dim::<3>(1); // [seq, 1, head_dim]
        (emb.clone().cos(), emb.sin())
    }
}

/// Memory accounting, kept apart from the forward code.
impl<B: Kernels> VisionTransformer<B> {
    /// Bytes held by the tower's projections, patch embedding included (see
    /// [`Proj::stored_bytes`]).
    pub(crate) fn linear_bytes(&self) -> u64 {
        let blocks: u64 = self
            .blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.attn.qkv,
                    &b.attn.proj,
                    &b.mlp.gate_proj,
                    &b.mlp.up_proj,
                    &b.mlp.down_proj,
                ]
            })
            .map(Proj::stored_bytes)
            .sum();
        blocks
            + self.patch_embed.stored_bytes()
            + self.merger.fc1.stored_bytes()
            + self.merger.fc2.stored_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfConfig;
    use crate::test_util::fixture;

    #[test]
    fn window_layout_keeps_partial_windows_and_drops_empty_ones() {
        // tiny fixture geometry: 8x10 patches -> 4x5 merged tokens, windows of 2x2 merged
        let cfg = HfConfig::from_dir(&fixture("qwen2_5_vl_tiny"))
            .unwrap()
            .resolve()
            .unwrap()
            .vision;
        let l = window_layout(&cfg, &[[1, 8, 10]]);
        assert_eq!(l.window_lens, vec![16, 16, 8, 16, 16, 8]);
        assert_eq!(&l.window_index[..6], &[0, 1, 5, 6, 2, 3]);
        assert_eq!(l.frame_lens, vec![80]);
        let mut sorted = l.window_index.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        // first merged token's 2x2 patches
        assert_eq!(&l.patch_rc[..4], &[(0, 0), (0, 1), (1, 0), (1, 1)]);
    }
}
