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

use super::host_gemm::{dot, gemm_into, Strided};

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
    if d == 0 || t == 0 {
        return Some((out, [b, h, s, d]));
    }
    let ops = Operands {
        q: q.view(),
        k: k.view(),
        v: v.view(),
        mask: mask.as_ref().map(|m| m.view()),
        scale,
    };
    if s <= ROW_PATH_MAX_QUERIES {
        ops.by_rows(&mut out);
    } else {
        ops.by_gemm(&mut out);
    }
    Some((out, [b, h, s, d]))
}

/// Up to this many query rows per head (decode), each row is its own task; above (prefill,
/// the vision tower), each head's scores and output are two GEMMs.
const ROW_PATH_MAX_QUERIES: usize = 8;

/// Validated operands: `q` `[b, h, s, d]`, `k`/`v` `[b, h, t, d]`, rows contiguous.
struct Operands<'a> {
    q: ArrayView4<'a, f32>,
    k: ArrayView4<'a, f32>,
    v: ArrayView4<'a, f32>,
    mask: Option<ArrayView4<'a, bool>>,
    scale: f32,
}

impl Operands<'_> {
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let (b, h, s, d) = self.q.dim();
        (b, h, s, self.k.dim().2, d)
    }

    /// One task per query row: dot products against the keys, softmax, weighted values.
    fn by_rows(&self, out: &mut [f32]) {
        let (_, h, s, t, d) = self.dims();
        let (q, k, v, mask, scale) = (&self.q, &self.k, &self.v, &self.mask, self.scale);
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
                for (j, sc) in scores.iter_mut().enumerate() {
                    let key = keys.index_axis(Axis(0), j);
                    *sc = dot(q_row, key.as_slice().expect("rows made contiguous")) * scale;
                }
                softmax_row(scores, hidden.as_ref());
                for (j, &p) in scores.iter().enumerate() {
                    if p == 0.0 {
                        continue; // hidden (or vanishing) keys: skip their value rows
                    }
                    let value = values.index_axis(Axis(0), j);
                    let value = value.as_slice().expect("rows made contiguous");
                    for (o, &x) in o.iter_mut().zip(value) {
                        *o += p * x;
                    }
                }
            },
        );
    }

    /// Per head: `S = q·kᵀ·scale` and `O = softmax(S)·v` through the `gemm` crate, heads
    /// split over the rayon pool (or, with fewer heads than threads, each GEMM threaded).
    fn by_gemm(&self, out: &mut [f32]) {
        let (_, h, s, t, d) = self.dims();
        let threads = rayon::current_num_threads();
        let heads = out.len() / (s * d);
        let inner = if heads >= threads || threads == 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let head = |bh: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let (bi, hi) = (bh / h, bh % h);
            let q = self.q.slice(ndarray::s![bi, hi, .., ..]);
            let k = self.k.slice(ndarray::s![bi, hi, .., ..]);
            let v = self.v.slice(ndarray::s![bi, hi, .., ..]);
            scores.resize(s * t, 0.0);
            // SAFETY: q is s×d with row stride q.strides()[0] and unit column stride (rows
            // made contiguous), k and v t×d likewise; k is read as the d×t matrix kᵀ (row
            // stride 1, column stride = k's row stride). `scores` is s×t and `o` s×d, row-major;
            // the views and `scores` outlive the calls and do not overlap `o` or `scores`.
            unsafe {
                gemm_into(
                    scores,
                    [s, t, d],
                    Strided::new(q.as_ptr(), q.strides()[0], 1),
                    Strided::new(k.as_ptr(), 1, k.strides()[0]),
                    self.scale,
                    inner,
                );
            }
            for (i, row) in scores.chunks_exact_mut(t).enumerate() {
                let hidden = self
                    .mask
                    .as_ref()
                    .map(|m| m.slice(ndarray::s![bi, hi, i, ..]));
                softmax_row(row, hidden.as_ref());
            }
            // SAFETY: as above; p = `scores` is s×t row-major, v (t×d) has unit column stride.
            unsafe {
                gemm_into(
                    o,
                    [s, d, t],
                    Strided::new(scores.as_ptr(), t as isize, 1),
                    Strided::new(v.as_ptr(), v.strides()[0], 1),
                    1.0,
                    inner,
                );
            }
        };
        if matches!(inner, gemm::Parallelism::None) && threads > 1 {
            out.par_chunks_mut(s * d)
                .enumerate()
                .for_each_init(Vec::new, |scores, (bh, o)| head(bh, o, scores));
        } else {
            let mut scores = Vec::new();
            for (bh, o) in out.chunks_mut(s * d).enumerate() {
                head(bh, o, &mut scores);
            }
        }
    }
}

/// `row ← softmax(row)` with `hidden` keys at zero weight; a row with every key hidden
/// becomes all zeros (so it attends to nothing instead of producing NaN).
fn softmax_row(row: &mut [f32], hidden: Option<&ndarray::ArrayView1<'_, bool>>) {
    if let Some(m) = hidden {
        for (x, &hid) in row.iter_mut().zip(m.iter()) {
            if hid {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
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
