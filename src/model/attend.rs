//! Scaled dot-product attention with transformers' f32 island: its eager attention takes the
//! softmax in f32 whatever the activation dtype (`softmax(..., dtype=torch.float32)`). In
//! half precision the whole product is computed in f32 here (burn's `attention` takes one
//! dtype), which keeps medpipe within the reference's own half-vs-f32 distance.

use burn::tensor::{Bool, DType, Tensor};

use crate::kernels::{self, Kernels};

/// `softmax(q·kᵀ/√d + mask)·v` over `[batch, heads, len, head_dim]`, in `q`'s dtype.
pub(crate) fn attend<B: Kernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    if dtype == DType::F32 {
        return kernels::sdpa(q, k, v, mask);
    }
    let f32_ = |t: Tensor<B, 4>| t.cast(DType::F32);
    kernels::sdpa(f32_(q), f32_(k), f32_(v), mask).cast(dtype)
}
