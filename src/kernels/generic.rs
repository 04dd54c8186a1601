//! The generic bodies of [`Kernels`](super::Kernels)' dense, attention and activation
//! methods, built from burn tensor ops: the trait's defaults, and the fallback of backends
//! whose kernel takes only some dtypes (the CPU's half precision).

use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{DType, TensorPrimitive};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x · Wᵀ + b` (see [`Kernels::dense_linear`](super::Kernels::dense_linear)).
pub(crate) fn dense_linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let y = float::<B, 2>(x).matmul(float::<B, 2>(weight).transpose());
    let y = match bias {
        Some(b) => y + float::<B, 1>(b).unsqueeze(),
        None => y,
    };
    y.into_primitive().tensor()
}

/// burn's attention (see [`Kernels::sdpa`](super::Kernels::sdpa)).
pub(crate) fn sdpa<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
) -> FloatTensor<B> {
    let mask = mask.map(Tensor::<B, 4, Bool>::from_primitive);
    let opts = AttentionModuleOptions::default();
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let dtype = q.dtype();
    if dtype == DType::F32 {
        return attention(q, k, v, mask, None, opts)
            .into_primitive()
            .tensor();
    }
    // burn's attention takes one dtype: the whole product in f32, out in q's dtype.
    let f32_ = |t: Tensor<B, 4>| t.cast(DType::F32);
    attention(f32_(q), f32_(k), f32_(v), mask, None, opts)
        .cast(dtype)
        .into_primitive()
        .tensor()
}

/// RMSNorm in f32, cast back before the weight (see [`Kernels::rms_norm`](super::Kernels::rms_norm)).
pub(crate) fn rms_norm<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let rms = (x.clone().square().mean_dim(1) + eps).sqrt();
    ((x / rms).cast(dtype) * float::<B, 1>(weight).unsqueeze())
        .into_primitive()
        .tensor()
}

/// `x·cos + rotate_half(x)·sin` (see [`Kernels::rotary`](super::Kernels::rotary)).
pub(crate) fn rotary<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let d = x.dims()[3];
    // rotate_half: the second half negated, then the first.
    let first = x.clone().narrow(3, 0, d / 2);
    let second = x.clone().narrow(3, d / 2, d - d / 2);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    (x * float::<B, 4>(cos) + rotated * float::<B, 4>(sin))
        .into_primitive()
        .tensor()
}

/// `silu(gate) · up` (see [`Kernels::silu_mul`](super::Kernels::silu_mul)).
pub(crate) fn silu_mul<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    (burn::tensor::activation::silu(float::<B, 1>(gate)) * float::<B, 1>(up))
        .into_primitive()
        .tensor()
}

/// A bf16 weight widened to float `dtype` through the host (see
/// [`Kernels::bf16_widen`](super::Kernels::bf16_widen)). Correct on any backend; backends
/// that keep bf16 weights override it.
pub(crate) fn bf16_widen<B: Backend>(w: &super::Bf16Weight<B>, dtype: DType) -> FloatTensor<B> {
    let device = B::int_device(&w.bits);
    let bits = Tensor::<B, 2, Int>::from_primitive(w.bits.clone())
        .into_data()
        .convert::<i64>();
    let values: Vec<f32> = bits
        .iter::<i64>()
        .map(|b| f32::from_bits(u32::from(b as u16) << 16))
        .collect();
    Tensor::<B, 2>::from_data(TensorData::new(values, w.shape), (&device, dtype))
        .into_primitive()
        .tensor()
}
