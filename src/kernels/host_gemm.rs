//! f32 products on the host for the CPU backend: `y = x · Wᵀ (+ b)` with `W` in PyTorch's
//! `[out, in]` layout, read in place (never transposed or copied per call).
//!
//! Why not NdArray's matmul: it reshapes and copies both operands into owned 3-D arrays on
//! every call and packs the weight for a general GEMM even for one input row; in decode that
//! was 56% of the time in `memmove` and 28% in packing (README, CPU performance). Here:
//! - up to [`GEMV_MAX_ROWS`] input rows (decode, batch 1–8) each output feature streams its
//!   weight row once and dots it with every input row, split over the rayon pool;
//! - more rows (prefill, training) go to the `gemm` crate (multi-threaded, AVX2/AVX-512
//!   micro-kernels chosen at run time), which reads the weight through strides.

use rayon::prelude::*;

/// Up to this many input rows the product streams the weight rows (GEMV); above, it packs
/// them for a GEMM.
pub(crate) const GEMV_MAX_ROWS: usize = 8;

/// Output features per rayon task in the GEMV: enough work to amortise a task, small enough
/// to balance two to sixteen threads on a 896-wide projection.
const GEMV_CHUNK: usize = 32;

/// `x · Wᵀ (+ bias)`: `x` `[m, k]` row-major, `w` `[n, k]` row-major, `bias` `[n]`; returns
/// `[m, n]` row-major.
pub(crate) fn matmul_nt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut y = if m <= GEMV_MAX_ROWS {
        gemv_rows(m, n, |o, dots| {
            let row = &w[o * k..(o + 1) * k];
            for (r, d) in dots.iter_mut().enumerate() {
                *d = dot(&x[r * k..(r + 1) * k], row);
            }
        })
    } else {
        gemm_nt(x, m, k, w, n)
    };
    if let Some(b) = bias {
        for yr in y.chunks_exact_mut(n.max(1)) {
            for (v, b) in yr.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
    y
}

/// The GEMV driver: `dots_of(o, dots)` writes the `m` dot products of output feature `o`
/// (one per input row); returns them as `[m, n]` row-major. The NF4 kernel shares it with
/// a row that it decodes first.
pub(crate) fn gemv_rows<F>(m: usize, n: usize, dots_of: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    // [n, m]: each task owns a contiguous run of output features.
    let mut yt = vec![0f32; n * m];
    if m == 0 {
        return yt;
    }
    yt.par_chunks_mut(GEMV_CHUNK * m)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, dots) in chunk.chunks_exact_mut(m).enumerate() {
                dots_of(c * GEMV_CHUNK + i, dots);
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for o in 0..n {
        for r in 0..m {
            y[r * n + o] = yt[o * m + r];
        }
    }
    y
}

/// `x · Wᵀ` through the `gemm` crate: the weight `[n, k]` row-major is the right operand
/// `[k, n]` column-major, so no transpose is made.
fn gemm_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `x` is m×k with row stride k; `w` n×k with row stride k, read as the k×n
    // matrix wᵀ (row stride 1, column stride k); the lengths were checked by the caller, so
    // every index the strides reach lies inside them, and the slices outlive the call.
    unsafe {
        gemm_into(
            &mut y,
            [m, n, k],
            Strided::new(x.as_ptr(), k as isize, 1),
            Strided::new(w.as_ptr(), 1, k as isize),
            1.0,
            parallelism,
        );
    }
    y
}

/// An f32 matrix in memory read through strides: element `(i, j)` is at
/// `ptr + i·row_stride + j·col_stride` (a transpose is the same memory with the strides
/// swapped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Strided {
    pub(crate) fn new(ptr: *const f32, row_stride: isize, col_stride: isize) -> Self {
        Strided {
            ptr,
            row_stride,
            col_stride,
        }
    }
}

/// `dst = scale · lhs · rhs` with `[m, n, k]` = `dims`: `dst` m×n row-major (overwritten,
/// never read), `lhs` m×k, `rhs` k×n, through the `gemm` crate. The one place its 19-argument
/// call is written.
///
/// # Safety
/// Every element `lhs` and `rhs` reach for these dimensions lies in memory that is readable
/// for the whole call and does not overlap `dst`.
pub(crate) unsafe fn gemm_into(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    lhs: Strided,
    rhs: Strided,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert_eq!(dst.len(), m * n, "gemm_into: dst is not m×n");
    // SAFETY: `dst` is m×n row-major (row stride n, column stride 1) and exactly that long;
    // `read_dst` is false, so its contents are not read; the operands are the caller's
    // promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            0.0, // the crate's `alpha` scales the old `dst`, which is not read
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `Σ a[i]·b[i]` in f32 (lengths equal), with the widest FMA units the CPU has.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Eight lanes of partial sums, which the compiler maps onto any SIMD width it targets.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// AVX2 + FMA: four 8-lane accumulators (32 products per step) hide the FMA latency, so a
/// weight row streams at memory speed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 ≤ n, inside both slices; unaligned loads.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *acc = _mm256_fmadd_ps(va, vb, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 ≤ n.
        let (va, vb) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        acc[0] = _mm256_fmadd_ps(va, vb, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let mut s: f32 = lanes.iter().sum();
    for t in i..n {
        s += a[t] * b[t];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 211) as f32 - 105.0) / 53.0)
            .collect()
    }

    /// The product in f64, in the plain loop order.
    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        b: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for o in 0..n {
                let mut s: f64 = b.map_or(0.0, |b| f64::from(b[o]));
                for i in 0..k {
                    s += f64::from(x[r * k + i]) * f64::from(w[o * k + i]);
                }
                y[r * n + o] = s as f32;
            }
        }
        y
    }

    #[test]
    fn the_product_equals_the_plain_loop_on_decode_and_prefill_row_counts() {
        // Rows 1 and 8 take the GEMV, 9 and 37 the GEMM; widths that are not multiples of
        // 8, 32 or the GEMV chunk, and one (k = 1) with no SIMD body at all.
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 33, 70),
            (3, 130, 5),
            (8, 64, 65),
            (9, 31, 40),
            (37, 100, 97),
        ] {
            let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            for bias in [None, Some(b.as_slice())] {
                let got = matmul_nt(&x, m, k, &w, n, bias);
                let want = reference(&x, m, k, &w, n, bias);
                assert_eq!(got.len(), m * n);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "m={m} k={k} n={n} bias={} at {i}: {g} vs {e}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn the_simd_dot_equals_the_portable_one() {
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 4864] {
            let (a, b) = (values(n, 4), values(n, 5));
            let (s, p) = (dot(&a, &b), dot_portable(&a, &b));
            assert!((s - p).abs() <= 1e-4 * (1.0 + p.abs()), "n={n}: {s} vs {p}");
        }
    }

    #[test]
    fn empty_products_are_empty_or_zero() {
        assert!(matmul_nt(&[], 0, 4, &values(8, 1), 2, None).is_empty());
        assert!(matmul_nt(&values(4, 1), 1, 4, &[], 0, None).is_empty());
        // k = 0: every dot product is an empty sum; with 9 rows the GEMM path says the same.
        assert_eq!(matmul_nt(&[], 1, 0, &[], 3, None), vec![0.0; 3]);
        assert_eq!(matmul_nt(&[], 9, 0, &[], 2, None), vec![0.0; 18]);
    }
}
