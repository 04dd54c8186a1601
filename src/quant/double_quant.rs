//! Double quantization of the NF4 absmax vector, bit-exact with bitsandbytes 0.50
//! (`functional.py` `quantize_4bit(compress_statistics=True)` → `quantize_blockwise`,
//! `create_dynamic_map(signed=True)`; CUDA kernel `csrc/kernels.cu`
//! `kQuantizeBlockwise<float, 256, 2, 0, General8bit>` with `dQuantize<0>`).
//!
//! bitsandbytes computes `offset = absmax.mean()` (a torch reduction), quantizes
//! `absmax - offset` to 8 bits with the signed dynamic map in blocks of 256
//! (`nested_absmax` holds each block's max |·|), and on load restores
//! `code[q] * nested_absmax[b] + offset`.
//!
//! The mean's bits depend on torch's summation order. [`torch_cuda_mean`] reproduces
//! `aten/src/ATen/native/cuda/Reduce.cuh` (torch 2.11) for a contiguous 1-D f32 input: 4
//! accumulators per thread, vec4 loads above 128 elements, a halving tree across threads, then
//! `sum * (1.0f / n)`. It matches all 39 fixture offsets bit for bit; those vectors are all
//! reduced by one thread block. Above 130,560 values (weights above ~8.4 M elements) torch
//! spreads the sum over several blocks; that path follows the same source but no fixture
//! covers it, and above ~4.3 M values the block count also depends on the GPU's SM count
//! (H100 SXM assumed).

/// bitsandbytes' blocksize for the nested (8-bit) quantization of absmax.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The quantized absmax vector of one NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per NF4 block (index into [`dynamic_map_signed`]).
    pub codes: Vec<u8>,
    /// One f32 scale per block of [`NESTED_BLOCKSIZE`] codes.
    pub nested_absmax: Vec<f32>,
    /// The mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

/// torch's f32 `linspace` value `i` of `steps` (the symmetric formula of its kernels; the
/// product and sum are fused, as the compiled kernels do).
fn linspace_f32(start: f32, end: f32, steps: usize, i: usize) -> f32 {
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 {
        step.mul_add(i as f32, start)
    } else {
        (-step).mul_add((steps - 1 - i) as f32, end)
    }
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted f32
/// values in [-1, 1], the `nested_quant_map` tensor.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let scale = 10f64.powi(i - 6) as f32;
        for j in 0..items - 1 {
            let a = linspace_f32(0.1, 1.0, items, j);
            let b = linspace_f32(0.1, 1.0, items, j + 1);
            let mean = (a + b) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// H100 SXM: 132 SMs × (2048 threads per SM / 512 threads per block). Only used to cap the
/// number of thread blocks of a reduction, which matters for vectors above ~4.3 M values.
const H100_TARGET_GRID: usize = 132 * 4;

/// Sums the per-thread partials the way `block_x_reduce` combines them: a halving tree
/// (shared memory down to a warp, then `shfl_down` with offsets 16, 8, 4, 2, 1).
fn tree_sum(mut partial: Vec<f32>) -> f32 {
    let mut offset = partial.len() / 2;
    while offset > 0 {
        for t in 0..offset {
            partial[t] += partial[t + offset];
        }
        offset /= 2;
    }
    partial[0]
}

/// `torch.mean` of a contiguous f32 vector on CUDA, in the order of torch's reduction
/// (see the module doc).
pub fn torch_cuda_mean(v: &[f32]) -> f32 {
    const MAX_THREADS: usize = 512;
    const VT0: usize = 4;
    let n = v.len();
    if n == 0 {
        return f32::NAN;
    }
    let vectorize = n > 128;
    let dim0 = if vectorize { n / VT0 } else { n };
    let width = if dim0 < MAX_THREADS {
        1usize << (usize::BITS - 1 - dim0.max(1).leading_zeros())
    } else {
        MAX_THREADS
    };
    // setReduceConfig: more than 256 values per thread spreads the input over several
    // blocks ("CTAs"), each reducing a strided share; the last block sums their results.
    let values_per_thread = n.div_ceil(width);
    let ctas = if values_per_thread >= 256 {
        H100_TARGET_GRID
            .min(values_per_thread.div_ceil(16))
            .max(values_per_thread.div_ceil(256))
    } else {
        1
    };
    let stride = width * ctas;
    let cta_sums: Vec<f32> = (0..ctas)
        .map(|cta| {
            let partial: Vec<f32> = (0..width)
                .map(|t| {
                    let mut acc = [0f32; VT0];
                    if vectorize {
                        let mut chunk = t + cta * width;
                        while chunk * VT0 + VT0 - 1 < n {
                            for (i, a) in acc.iter_mut().enumerate() {
                                *a += v[chunk * VT0 + i];
                            }
                            chunk += stride;
                        }
                        let tail = n - n % VT0 + t;
                        if cta == 0 && tail < n {
                            acc[0] += v[tail];
                        }
                    } else {
                        let mut idx = t;
                        while idx + (VT0 - 1) * width < n {
                            for (i, a) in acc.iter_mut().enumerate() {
                                *a += v[idx + i * width];
                            }
                            idx += width * VT0;
                        }
                        for a in acc.iter_mut() {
                            if idx >= n {
                                break;
                            }
                            *a += v[idx];
                            idx += width;
                        }
                    }
                    ((acc[0] + acc[1]) + acc[2]) + acc[3]
                })
                .collect();
            tree_sum(partial)
        })
        .collect();
    let total = if ctas == 1 {
        cta_sums[0]
    } else {
        // global_reduce: thread t of the last block accumulates CTA results t, t + width, …
        let mut partial = vec![0f32; width];
        for (c, s) in cta_sums.iter().enumerate() {
            partial[c % width] += s;
        }
        tree_sum(partial)
    };
    total * (1.0f32 / n as f32)
}

/// `dQuantize<0>`: binary search of the sorted 256-entry `code` for `x`, then the nearer of
/// the two neighbours by f32 midpoint (ties go to the pivot).
fn dquantize(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64usize;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

/// Double-quantizes an NF4 absmax vector as `quantize_4bit(compress_statistics=True)` does.
pub fn quantize_absmax(absmax: &[f32]) -> NestedAbsmax {
    let code = dynamic_map_signed();
    let offset = torch_cuda_mean(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let mut codes = Vec::with_capacity(centred.len());
    let mut nested_absmax = Vec::with_capacity(centred.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centred.chunks(NESTED_BLOCKSIZE) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(m);
        let scale = 1.0f32 / m;
        codes.extend(block.iter().map(|v| dquantize(&code, v * scale)));
    }
    NestedAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

/// Restores the f32 absmax vector: `code[q] * nested_absmax[block] + offset`
/// (`dequantize_blockwise`, then `absmax += offset`).
///
/// `nested_absmax` must hold `ceil(codes.len() / blocksize)` values (the format layer checks).
pub fn dequantize_absmax(
    codes: &[u8],
    nested_absmax: &[f32],
    nested_code: &[f32; 256],
    offset: f32,
    blocksize: usize,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| nested_code[q as usize] * nested_absmax[i / blocksize] + offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_sorted_signed_and_spans_minus_one_to_one() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] < -0.99 && m[0] > -1.0);
        assert_eq!(m.iter().filter(|v| **v == 0.0).count(), 1);
    }

    #[test]
    fn dquantize_returns_the_exact_index_of_every_code_value() {
        let m = dynamic_map_signed();
        for (i, v) in m.iter().enumerate() {
            assert_eq!(dquantize(&m, *v) as usize, i, "value {v}");
        }
    }

    #[test]
    fn cuda_mean_of_small_vectors_equals_the_plain_mean_when_exact() {
        assert_eq!(torch_cuda_mean(&[1.0, 2.0, 3.0, 6.0]), 3.0);
        let v = vec![0.5f32; 1000];
        assert_eq!(torch_cuda_mean(&v), 0.5);
    }

    #[test]
    fn cuda_mean_covers_every_element_on_the_multi_block_path() {
        // 1.2 M values: several thread blocks, vec4 loads and a 3-element tail.
        for n in [1_200_003usize, 200_704, 131_071, 129, 127, 5] {
            let v: Vec<f32> = (0..n).map(|i| 0.1 + (i % 1013) as f32 * 1e-4).collect();
            let exact = v.iter().map(|x| *x as f64).sum::<f64>() / n as f64;
            let got = torch_cuda_mean(&v) as f64;
            // f32 partial sums over ≤ a few thousand terms each: relative error far below 1e-5.
            assert!(
                (got - exact).abs() / exact < 1e-5,
                "n={n}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn absmax_round_trip_error_is_within_one_code_step() {
        let absmax: Vec<f32> = (0..600).map(|i| 0.1 + (i % 37) as f32 * 0.003).collect();
        let q = quantize_absmax(&absmax);
        assert_eq!(q.codes.len(), 600);
        assert_eq!(q.nested_absmax.len(), 3);
        let back = dequantize_absmax(
            &q.codes,
            &q.nested_absmax,
            &dynamic_map_signed(),
            q.offset,
            NESTED_BLOCKSIZE,
        );
        // The dynamic map's coarsest step near ±1 is 1/64 of the block scale (~0.06 here).
        let worst = absmax
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.06 / 64.0, "worst {worst}");
    }
}
