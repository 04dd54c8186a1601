//! The NF4 data type: code book, blockwise absmax quantization and packing, bit-exact with
//! bitsandbytes 0.50 (`functional.py` `get_4bit_type("nf4")`, `quantize_4bit`; CUDA kernel
//! `csrc/kernels.cu` `kQuantizeBlockwise<…, NF4>` / `dQuantizeNF4` / `kDequantizeBlockwise`).
//!
//! Rules that decide bits, all taken from the CUDA kernel:
//! - a block's scale is `absmax = max |x|` over the block's *valid* elements (the tail block
//!   when `n % blocksize != 0` is shorter; padding is zero and so never raises the max);
//! - each value is normalised as `x * (1.0f32 / absmax)` (a multiply by the f32 reciprocal,
//!   not a division) and mapped by the decision tree of `dQuantizeNF4`, whose thresholds are
//!   f32 midpoints compared with a strict `>`;
//! - element `2i` goes to the high nibble and `2i+1` to the low nibble of byte `i`; an odd
//!   total length pads the last low nibble with the code of `0.0` (7);
//! - an all-zero block has `absmax = 0`, its reciprocal is `inf`, `0 * inf` is NaN, and every
//!   comparison with NaN is false, so all its codes are 0 (which dequantizes to `-1 * 0`).

use rayon::prelude::*;

/// bitsandbytes' default NF4 blocksize (elements per absmax).
pub const NF4_BLOCKSIZE: usize = 64;

/// The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`, also the `quant_map` tensor).
#[allow(clippy::excessive_precision)] // bitsandbytes' table verbatim; each rounds to its f32
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// One quantized tensor: packed codes and one f32 absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Quantized {
    /// Two codes per byte, `(n + 1) / 2` bytes.
    pub packed: Vec<u8>,
    /// One scale per block of `blocksize` elements, `ceil(n / blocksize)` values.
    pub absmax: Vec<f32>,
    /// Number of quantized elements.
    pub numel: usize,
    /// Elements per absmax.
    pub blocksize: usize,
}

/// `dQuantizeNF4`: the decision tree over f32 midpoints between neighbouring code values.
/// The literals are the kernel's, verbatim; like nvcc, rustc rounds each to the nearest f32.
#[allow(clippy::excessive_precision)]
#[inline]
fn nf4_code(x: f32) -> u8 {
    if x > 0.03979014977812767 {
        if x > 0.3893125355243683 {
            if x > 0.6427869200706482 {
                if x > 0.8614784181118011 {
                    15
                } else {
                    14
                }
            } else if x > 0.5016634166240692 {
                13
            } else {
                12
            }
        } else if x > 0.2035212516784668 {
            if x > 0.2920137718319893 {
                11
            } else {
                10
            }
        } else if x > 0.1202552504837513 {
            9
        } else {
            8
        }
    } else if x > -0.33967943489551544 {
        if x > -0.13791173323988914 {
            if x > -0.045525018125772476 {
                7
            } else {
                6
            }
        } else if x > -0.23460740596055984 {
            5
        } else {
            4
        }
    } else if x > -0.6106329262256622 {
        if x > -0.4599952697753906 {
            3
        } else {
            2
        }
    } else if x > -0.8480964004993439 {
        1
    } else {
        0
    }
}

/// Quantizes `values` (the row-major flattened weight) to NF4 in blocks of `blocksize`.
///
/// `blocksize` must be even (every bitsandbytes blocksize is), so a block never splits a byte.
pub fn quantize_nf4(values: &[f32], blocksize: usize) -> Nf4Quantized {
    debug_assert!(blocksize >= 2 && blocksize.is_multiple_of(2));
    let n = values.len();
    let n_blocks = n.div_ceil(blocksize);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n_blocks];
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(absmax.par_iter_mut())
        .zip(values.par_chunks(blocksize))
        .for_each(|((out, am), block)| {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            let scale = 1.0f32 / m;
            for (byte, pair) in out.iter_mut().zip(block.chunks(2)) {
                let hi = nf4_code(pair[0] * scale);
                let lo = nf4_code(pair.get(1).map_or(0.0, |v| v * scale));
                *byte = (hi << 4) | lo;
            }
        });
    Nf4Quantized {
        packed,
        absmax,
        numel: n,
        blocksize,
    }
}

/// Dequantizes `numel` NF4 values: `NF4_CODE[code] * absmax[block]` in f32, as
/// `kDequantizeBlockwise` does.
///
/// The caller guarantees `packed.len() >= ceil(numel / 2)` and
/// `absmax.len() >= ceil(numel / blocksize)` ([`crate::quant::Nf4Tensor`] validates this).
pub fn dequantize_nf4(packed: &[u8], absmax: &[f32], numel: usize, blocksize: usize) -> Vec<f32> {
    let mut out = vec![0f32; numel];
    out.par_chunks_mut(blocksize)
        .zip(absmax.par_iter())
        .enumerate()
        .for_each(|(b, (chunk, &scale))| {
            let start = b * blocksize;
            for (j, o) in chunk.iter_mut().enumerate() {
                let i = start + j;
                let byte = packed[i / 2];
                let code = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0F
                };
                *o = NF4_CODE[code as usize] * scale;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_book_equals_the_fixture_quant_map() {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(crate::test_util::fixture(
                "qwen2_5_vl_tiny/nf4/nf4_meta.json",
            ))
            .unwrap(),
        )
        .unwrap();
        let want: Vec<f32> = meta["nf4_code"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(NF4_CODE.to_vec(), want);
        assert_eq!(meta["blocksize"], NF4_BLOCKSIZE);
    }

    #[test]
    fn each_code_value_maps_to_its_own_index() {
        for (i, v) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code(*v) as usize, i, "value {v}");
        }
    }

    #[test]
    fn first_element_goes_to_the_high_nibble_and_odd_tail_pads_with_zero_code() {
        let q = quantize_nf4(&[1.0, -1.0, 0.0], 64);
        assert_eq!(q.packed, vec![0xF0, 0x77]);
        assert_eq!(q.absmax, vec![1.0]);
    }

    #[test]
    fn tail_block_takes_absmax_over_its_own_elements_only() {
        let mut v = vec![2.0f32; 64];
        v.extend([0.5, -0.25]);
        let q = quantize_nf4(&v, 64);
        assert_eq!(q.absmax, vec![2.0, 0.5]);
        assert_eq!(q.packed.len(), 33);
        assert_eq!(
            q.packed[32], 0xF2,
            "0.5/0.5 → 15; -0.25/0.5 = -0.5 is nearest -0.525 → 2"
        );
    }

    #[test]
    fn an_all_zero_block_gets_code_zero_like_the_cuda_kernel() {
        let q = quantize_nf4(&[0.0; 4], 64);
        assert_eq!(q.packed, vec![0x00, 0x00]);
        let d = dequantize_nf4(&q.packed, &q.absmax, 4, 64);
        assert!(d.iter().all(|v| *v == 0.0));
    }
}
