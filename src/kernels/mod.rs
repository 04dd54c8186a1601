//! The one seam for custom kernels (burn-vision's backend-extension pattern).
//!
//! [`Kernels`] is a backend trait whose methods have generic default bodies built from
//! ordinary tensor ops, so every backend is correct without a kernel. Backends with a
//! faster way override them:
//!
//! | backend | where | what it does |
//! |---|---|---|
//! | `NdArray<f32>` | [`host`] | dense projections on the weight in place (GEMV / `gemm`); NF4 decoded on the host straight into dot products (GEMV) or one f32 weight (GEMM) |
//! | `Autodiff<B, C>` | [`autodiff`] | the inner backend's kernel forward; a backward op that keeps only the packed weight and decodes it again |
//! | `CubeBackend<R, ..>` | [`cube`] | CubeCL kernels for any runtime (CUDA and wgpu: Vulkan, Metal, DX12, lavapipe): NF4 dequantize, NF4 and dense decode GEMVs, RMSNorm, rotary embedding, SwiGLU, flash-decoding attention |
//! | `Fusion<B>` | [`fusion`] | a custom op in the fusion stream that calls the fused backend's kernel |
//!
//! The model is generic over `B: Kernels` (a supertrait of `Backend`), so a call such as
//! `B::nf4_matmul(x, &w)` reaches the kernel of whatever backend the job runs on. Before this
//! seam the CPU kernel was found by an `Any` downcast that silently fell back to the 20x
//! slower generic path for any backend type it did not list; here a backend without an
//! override is a compile-time choice, visible in the `impl` list above.

pub mod autodiff;
pub mod cube;
pub mod fusion;
pub(crate) mod generic;
pub mod host;
pub(crate) mod host_attention;
pub(crate) mod host_gemm;
pub mod nf4_generic;
pub mod profile;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};

use profile::KernelClass::{Activation, Attention, Norm, Projection, Rotary};

/// How a backend wants NF4 codes stored (chosen by [`Kernels::nf4_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedLayout {
    /// bitsandbytes' bytes as a `U8` tensor: element `e` in byte `e / 2`, high nibble first.
    Bytes,
    /// Four of those bytes per little-endian 32-bit word (`U32` tensor), padded with code 7
    /// (zero) to whole quantization blocks: GPU kernels read whole words.
    Words,
}

/// An NF4 weight `[out_features, in_features]` as backend primitives (cheap to clone: every
/// backend's tensors are reference-counted).
#[derive(Debug, Clone)]
pub struct Nf4Weight<B: Backend> {
    /// The packed codes, laid out as `B::nf4_layout()` says.
    pub packed: IntTensor<B>,
    /// f32 scale of each block of `blocksize` flattened elements: `[n_blocks]`.
    pub absmax: FloatTensor<B>,
    /// The 16 NF4 values (f32): `[16]`.
    pub code: FloatTensor<B>,
    /// `[out_features, in_features]`.
    pub shape: [usize; 2],
    /// Elements per scale (a positive multiple of 8).
    pub blocksize: usize,
}

impl<B: Backend> Bf16Weight<B> {
    /// The weight whose bit patterns `bits` (`[out_features, in_features]`, `U16`) holds.
    pub fn of(bits: &burn::tensor::Tensor<B, 2, burn::tensor::Int>) -> Self {
        Self {
            shape: bits.dims(),
            bits: bits.clone().into_primitive(),
        }
    }
}

impl<B: Backend> Nf4Weight<B> {
    /// Elements of the (unpadded) weight.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }
}

impl<B: Kernels> Nf4Weight<B> {
    /// Rows `rows` as a weight of their own: views of the packed codes and scales, nothing
    /// decoded or copied. `None` when a cut inside the weight does not fall on a
    /// quantization-block boundary (see [`Self::row_tiles`]) or the range is empty or out of
    /// bounds.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Option<Self> {
        let [out, inp] = self.shape;
        let aligned = |r: usize| r == out || (r * inp).is_multiple_of(self.blocksize);
        if rows.start >= rows.end || rows.end > out || !aligned(rows.start) || !aligned(rows.end) {
            return None;
        }
        let (first, last) = (rows.start * inp, rows.end * inp);
        // Codes per stored element of `packed`; blocks hold a multiple of 8 codes, so a
        // block boundary is a word (and byte) boundary.
        let per = match B::nf4_layout() {
            PackedLayout::Bytes => 2,
            PackedLayout::Words => 8,
        };
        let packed = Tensor::<B, 1, Int>::from_primitive(self.packed.clone());
        let absmax = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(self.absmax.clone()));
        // The last tile keeps the tail: a partial block, and the Words layout's padding.
        let cut = |t_len: usize, unit: usize| {
            let start = first / unit;
            let end = if rows.end == out { t_len } else { last / unit };
            (start, end - start)
        };
        let (p0, pn) = cut(packed.dims()[0], per);
        let (a0, an) = cut(absmax.dims()[0], self.blocksize);
        Some(Self {
            packed: packed.narrow(0, p0, pn).into_primitive(),
            absmax: absmax.narrow(0, a0, an).into_primitive().tensor(),
            code: self.code.clone(),
            shape: [rows.end - rows.start, inp],
            blocksize: self.blocksize,
        })
    }

    /// Row ranges covering the weight whose tiles hold at most `max_elements` each (or the
    /// fewest rows a tile can hold, if more): each cut falls on a quantization-block
    /// boundary, so [`Self::rows`] takes every range.
    pub fn row_tiles(&self, max_elements: usize) -> Vec<std::ops::Range<usize>> {
        let [out, inp] = self.shape;
        // Rows per block-aligned step: blocksize / gcd(in, blocksize).
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let step = self.blocksize / gcd(inp.max(1), self.blocksize);
        let rows = (max_elements / inp.max(1) / step).max(1) * step;
        (0..out)
            .step_by(rows)
            .map(|start| start..(start + rows).min(out))
            .collect()
    }
}

/// A dense weight `[out_features, in_features]` kept as bf16 bit patterns (a `U16` int
/// tensor, row-major), as a bf16 checkpoint stores it: half the bytes of f32 on backends
/// whose float tensors cannot hold bf16 (NdArray). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bf16Weight<B: Backend> {
    pub bits: IntTensor<B>,
    /// `[out_features, in_features]`.
    pub shape: [usize; 2],
}

/// Backend operations with a custom kernel on some backends. Every method has a correct
/// generic default body.
pub trait Kernels: Backend {
    /// How [`Nf4Weight::packed`] is laid out for this backend.
    fn nf4_layout() -> PackedLayout {
        PackedLayout::Words
    }

    /// The largest single buffer `device` can hold, bytes, where the backend has such a
    /// limit (wgpu: the adapter's storage-buffer binding size); `None`: no limit but memory.
    fn max_buffer_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// The dequantized weight `[out_features, in_features]` in float `dtype`.
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        nf4_generic::dequantize::<Self>(w, dtype)
    }

    /// A dense projection `x · Wᵀ + b`: `x` `[m, in]`, `weight` `[out, in]` (PyTorch's
    /// layout, as checkpoints store it), `bias` `[out]` → `[m, out]`.
    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        generic::dense_linear::<Self>(x, weight, bias)
    }

    /// Scaled dot-product attention `softmax(q·kᵀ/√d + mask)·v`: `q` `[b, h, s, d]`, `k`
    /// and `v` `[b, h, t, d]`, `mask` `[b, h, s, t]` with true = hidden → `[b, h, s, d]`.
    /// Computed in f32 whatever the (one) dtype of q, k and v, out in q's: transformers'
    /// eager attention takes its softmax in f32 (`softmax(..., dtype=torch.float32)`), and
    /// this keeps half precision within the reference's own half-vs-f32 distance.
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
    ) -> FloatTensor<Self> {
        generic::sdpa::<Self>(q, k, v, mask)
    }

    /// RMSNorm as Qwen2 computes it: `weight · x / sqrt(mean(x²) + eps)` over the last axis
    /// of `x` `[rows, d]`, normalised in f32 whatever `x`'s dtype, then cast back before the
    /// weight (`[d]`) multiplies.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        generic::rms_norm::<Self>(x, weight, eps)
    }

    /// Rotary position embedding `x·cos + rotate_half(x)·sin`: `x` `[b, heads, s, d]`,
    /// `cos` and `sin` `[b, 1, s, d]` (broadcast over the heads), one dtype.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::rotary::<Self>(x, cos, sin)
    }

    /// The gated MLP's activation `silu(gate) · up`, elementwise (equal shapes).
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::silu_mul::<Self>(gate, up)
    }

    /// `x · dequant(W)ᵀ`: `x` `[m, in_features]` → `[m, out_features]`, in `x`'s dtype.
    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        nf4_generic::matmul::<Self>(x, w)
    }

    /// Whether a checkpoint's bf16 projection weights load as [`Bf16Weight`]s (read by
    /// [`Self::bf16_matmul`]) instead of being widened to the float type: only where a
    /// kernel reads the bits and the float tensors cannot hold bf16 themselves.
    fn keeps_bf16_bits() -> bool {
        false
    }

    /// The weight widened (exactly) to float `dtype`, `[out_features, in_features]`.
    fn bf16_widen(w: &Bf16Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        generic::bf16_widen::<Self>(w, dtype)
    }

    /// Rows `ids` (`[n]`) of a bf16 table `[rows, width]`, widened to f32: `[n, width]` (a
    /// token embedding lookup).
    fn bf16_rows(table: &Bf16Weight<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        let n = ids.shape()[0];
        let rows = Self::int_select(table.bits.clone(), 0, ids);
        let w = Bf16Weight {
            bits: rows,
            shape: [n, table.shape[1]],
        };
        Self::bf16_widen(&w, DType::F32)
    }

    /// `x · Wᵀ` with `W` in bf16: `x` `[m, in_features]` → `[m, out_features]`, in `x`'s
    /// dtype. Equal to the dense product on the widened weight.
    fn bf16_matmul(x: FloatTensor<Self>, w: &Bf16Weight<Self>) -> FloatTensor<Self> {
        let weight = Self::bf16_widen(w, x.dtype());
        Self::float_matmul(x, Self::float_transpose(weight))
    }
}

/// A training backend whose inner backend has the kernels too (what the trainer needs).
pub trait AutodiffKernels: AutodiffBackend<InnerBackend: Kernels> + Kernels {}
impl<B: AutodiffBackend<InnerBackend: Kernels> + Kernels> AutodiffKernels for B {}

/// Uploads an NF4 weight in the layout `B` asks for.
///
/// `packed` holds at least `ceil(out·in / 2)` bytes and `absmax` one f32 scale per block;
/// the caller has validated both against `shape`.
pub fn nf4_upload<B: Kernels>(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    shape: [usize; 2],
    blocksize: usize,
    device: &B::Device,
) -> Nf4Weight<B> {
    let numel = shape[0] * shape[1];
    let n_blocks = numel.div_ceil(blocksize);
    let absmax = &absmax[..n_blocks];
    let packed = match B::nf4_layout() {
        PackedLayout::Bytes => {
            let bytes = packed[..numel.div_ceil(2)].to_vec();
            let n = bytes.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(bytes, [n]), (device, DType::U8))
        }
        PackedLayout::Words => {
            let mut bytes = packed[..numel.div_ceil(2)].to_vec();
            // Whole blocks of a multiple of 8 elements fill whole words.
            bytes.resize(n_blocks * blocksize / 2, 0x77);
            let words: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let n = words.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(words, [n]), (device, DType::U32))
        }
    };
    let f32_tensor = |v: Vec<f32>| {
        let n = v.len();
        Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, DType::F32))
            .into_primitive()
            .tensor()
    };
    Nf4Weight {
        packed: packed.into_primitive(),
        absmax: f32_tensor(absmax.to_vec()),
        code: f32_tensor(code.to_vec()),
        shape,
        blocksize,
    }
}

/// Tensor-level wrappers, so model code reads as tensor code. Each is timed by kind while a
/// [`profile::Recording`] is open, counting the bytes it must read.
pub fn nf4_matmul<B: Kernels>(x: Tensor<B, 2>, w: &Nf4Weight<B>) -> Tensor<B, 2> {
    // The packed codes and the absmax scales, and the input.
    let bytes = profile::bytes_of(&w.packed.shape(), w.packed.dtype())
        + profile::bytes_of(&w.absmax.shape(), w.absmax.dtype())
        + profile::bytes_of(&x.shape(), x.dtype());
    let device = x.device();
    profile::timed::<B, _>(Projection, &device, bytes, move || {
        let y = B::nf4_matmul(x.into_primitive().tensor(), w);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    })
}

/// A bf16 weight widened to float `dtype` (see [`Kernels::bf16_widen`]).
pub fn bf16_widen<B: Kernels>(w: &Bf16Weight<B>, dtype: DType) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::bf16_widen(w, dtype)))
}

/// Rows `ids` of a bf16 table, widened to f32 (see [`Kernels::bf16_rows`]).
pub fn bf16_rows<B: Kernels>(table: &Bf16Weight<B>, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::bf16_rows(
        table,
        ids.into_primitive(),
    )))
}

/// `x · Wᵀ` with a bf16 weight (see [`Kernels::bf16_matmul`]).
pub fn bf16_matmul<B: Kernels>(x: Tensor<B, 2>, w: &Bf16Weight<B>) -> Tensor<B, 2> {
    let bytes = (w.shape[0] * w.shape[1] * 2) as u64 + profile::bytes_of(&x.shape(), x.dtype());
    let device = x.device();
    profile::timed::<B, _>(Projection, &device, bytes, move || {
        let y = B::bf16_matmul(x.into_primitive().tensor(), w);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    })
}

/// `x · Wᵀ + b` with `weight` `[out, in]` (see [`Kernels::dense_linear`]).
pub fn linear<B: Kernels>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let bytes = profile::bytes_of(&x.shape(), x.dtype())
        + profile::bytes_of(&weight.shape(), weight.dtype())
        + bias
            .as_ref()
            .map_or(0, |b| profile::bytes_of(&b.shape(), b.dtype()));
    let device = x.device();
    profile::timed::<B, _>(Projection, &device, bytes, move || {
        let y = B::dense_linear(
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
            bias.map(|b| b.into_primitive().tensor()),
        );
        Tensor::from_primitive(TensorPrimitive::Float(y))
    })
}

/// Scaled dot-product attention through the seam (see [`Kernels::sdpa`]).
pub fn sdpa<B: Kernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    // The queries, and the keys and values (the KV cache in a decode step).
    let bytes = [&q, &k, &v]
        .iter()
        .map(|t| profile::bytes_of(&t.shape(), t.dtype()))
        .sum();
    let device = q.device();
    profile::timed::<B, _>(Attention, &device, bytes, move || {
        let y = B::sdpa(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            mask.map(|m| m.into_primitive()),
        );
        Tensor::from_primitive(TensorPrimitive::Float(y))
    })
}

/// RMSNorm over the last axis through the seam (see [`Kernels::rms_norm`]).
pub fn rms_norm<B: Kernels, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let shape = x.shape();
    let d = shape[D - 1];
    let rows = shape.num_elements() / d.max(1);
    let bytes =
        profile::bytes_of(&shape, x.dtype()) + profile::bytes_of(&weight.shape(), x.dtype());
    let device = x.device();
    profile::timed::<B, _>(Norm, &device, bytes, move || {
        let y = B::rms_norm(
            x.reshape([rows, d]).into_primitive().tensor(),
            weight.into_primitive().tensor(),
            eps,
        );
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(shape)
    })
}

/// Rotary position embedding through the seam (see [`Kernels::rotary`]).
pub fn rotary<B: Kernels>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let bytes = [&x, cos, sin]
        .iter()
        .map(|t| profile::bytes_of(&t.shape(), t.dtype()))
        .sum();
    let device = x.device();
    profile::timed::<B, _>(Rotary, &device, bytes, move || {
        let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
        let y = B::rotary(prim(x), prim(cos.clone()), prim(sin.clone()));
        Tensor::from_primitive(TensorPrimitive::Float(y))
    })
}

/// `silu(gate) · up` through the seam (see [`Kernels::silu_mul`]).
pub fn silu_mul<B: Kernels, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let shape = gate.shape();
    debug_assert_eq!(shape, up.shape(), "silu_mul takes equal shapes");
    let n = shape.num_elements();
    let bytes = 2 * profile::bytes_of(&shape, gate.dtype());
    let device = gate.device();
    profile::timed::<B, _>(Activation, &device, bytes, move || {
        let y = B::silu_mul(
            gate.reshape([n]).into_primitive().tensor(),
            up.reshape([n]).into_primitive().tensor(),
        );
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(y)).reshape(shape)
    })
}

/// The dequantized weight `[out_features, in_features]` in float `dtype`.
pub fn nf4_dequantize<B: Kernels>(w: &Nf4Weight<B>, dtype: DType) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::nf4_dequantize(w, dtype)))
}

#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod tests;
