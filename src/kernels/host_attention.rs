//! Fused scaled dot-product attention on the host, for the CPU backend.
//!
//! Why: built from tensor ops, attention makes the `[q_len, kv_len]` scores of every head
//! five times over (product, scale, mask, softmax in three passes) and copies the key and
//! value views (a narrowed KV cache, swapped head dims) into owned arrays first. Here each
//! query row is one task: its scores against the keys, read in place through their strides,
//! a softmax in a row-sized buffer, and the weighted sum of the value rows. Prefill (many
//! rows) and decode (one row against the whole cache) take the same path.

use burn::backend::ndarray::NdArrayTensor;
use ndarray::{ArrayView4, Axis, CowArray, Ix4};
use rayon::prelude::*;

use super::host_gemm::dot;

/// `softmax(q·kᵀ/√d + mask)·v`: `q` `[b, h, s, d]`, `k`/`v` `[b, h, t, d]`, `mask`
/// `[b, h, s, t]` (true = hidden; broadcast strides welcome). Returns `[b, h, s, d]`
/// row-major, or `None` when the operands are not f32 with a native bool mask (the caller
/// then takes the generic path). A query row whose keys are all hidden yields zeros.
pub(crate) fn attention(
    q: &NdArrayTensor,
    k: &NdArrayTensor,
    v: &NdArrayTensor,
    mask: Option<&NdArrayTensor>,
) -> Option<(Vec<f32>, [usize; 4])> {
    let (NdArrayTensor::F32(q), NdArrayTensor::F32(k), NdArrayTensor::F32(v)) = (q, k, v) else {
        return None;
    };
    let mask = match mask {
        None => None,
        Some(NdArrayTensor::Bool(m)) => Some(m.view().into_dimensionality::<Ix4>().ok()?),
        Some(_) => return None,
    };
    let q = rows_contiguous(q.view().into_dimensionality::<Ix4>().ok()?);
    let k = rows_contiguous(k.view().into_dimensionality::<Ix4>().ok()?);
    let v = rows_contiguous(v.view().into_dimensionality::<Ix4>().ok()?);
    let [b, h, s, d] = [q.dim().0, q.dim().1, q.dim().2, q.dim().3];
    let t = k.dim().2;
    if k.dim() != (b, h, t, d) || v.dim() != (b, h, t, d) {
        return None;
    }
    if let Some(m) = &mask {
        if m.dim() != (b, h, s, t) {
            return None;
        }
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * h * s * d];
    if d == 0 {
        return Some((out, [b, h, s, d]));
    }
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; t],
        |scores, (row, o)| {
            let (bh, i) = (row / s, row % s);
            let (bi, hi) = (bh / h, bh % h);
            let q_row = q.slice(ndarray::s![bi, hi, i, ..]);
            let q_row = q_row.as_slice().expect("rows made contiguous");
            let keys = k.slice(ndarray::s![bi, hi, .., ..]);
            let values = v.slice(ndarray::s![bi, hi, .., ..]);
            let hidden = mask.as_ref().map(|m| m.slice(ndarray::s![bi, hi, i, ..]));
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in scores.iter_mut().enumerate() {
                if hidden.as_ref().is_some_and(|m| m[j]) {
                    *sc = f32::NEG_INFINITY;
                    continue;
                }
                let key = keys.index_axis(Axis(0), j);
                *sc = dot(q_row, key.as_slice().expect("rows made contiguous")) * scale;
                max = max.max(*sc);
            }
            if max == f32::NEG_INFINITY {
                return; // every key hidden: zeros
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            for (j, &p) in scores.iter().enumerate() {
                if p == 0.0 {
                    continue;
                }
                let value = values.index_axis(Axis(0), j);
                let value = value.as_slice().expect("rows made contiguous");
                for (o, &x) in o.iter_mut().zip(value) {
                    *o += p * x;
                }
            }
            let inv = 1.0 / sum;
            for o in o.iter_mut() {
                *o *= inv;
            }
        },
    );
    Some((out, [b, h, s, d]))
}

/// The view itself when its rows (last axis) are contiguous, else a row-major copy (the
/// model never passes such a view: swapped head dims and a narrowed cache keep rows whole).
fn rows_contiguous(a: ArrayView4<'_, f32>) -> CowArray<'_, f32, Ix4> {
    if a.strides()[3] == 1 || a.dim().3 <= 1 {
        CowArray::from(a)
    } else {
        CowArray::from(a.as_standard_layout().into_owned())
    }
}
