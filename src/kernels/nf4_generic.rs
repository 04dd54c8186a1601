//! NF4 dequantization from generic tensor ops: the default body of
//! [`Kernels::nf4_dequantize`](super::Kernels::nf4_dequantize), correct on any backend.

use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, ElementConversion, TensorMetadata, TensorPrimitive};

use super::{Kernels, Nf4Weight, PackedLayout};

/// Bit offset of element `j` (0..8) inside a little-endian word of four packed bytes:
/// byte `j / 2`, high nibble first (bitsandbytes' order).
pub(crate) const WORD_SHIFTS: [u32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// The weight `[out, in]` in `dtype`, decoded with shifts, masks and a gather.
pub fn dequantize<B: Kernels>(w: &Nf4Weight<B>, dtype: DType) -> FloatTensor<B> {
    let packed = Tensor::<B, 1, Int>::from_primitive(w.packed.clone());
    let [n] = packed.dims();
    // Element order: one column per position inside a byte (or word), then flattened.
    let codes = match B::nf4_layout() {
        PackedLayout::Bytes => {
            let hi = packed.clone().bitwise_right_shift_scalar(4u32.elem());
            let lo = packed.bitwise_and_scalar(15u32.elem());
            Tensor::stack::<2>(vec![hi, lo], 1).reshape([n * 2])
        }
        PackedLayout::Words => {
            let nibbles = WORD_SHIFTS
                .iter()
                .map(|&s| {
                    packed
                        .clone()
                        .bitwise_right_shift_scalar(s.elem())
                        .bitwise_and_scalar(15u32.elem())
                })
                .collect();
            Tensor::stack::<2>(nibbles, 1).reshape([n * 8])
        }
    };
    let numel = w.numel();
    let n_codes = codes.dims()[0];
    let code = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(w.code.clone()));
    let absmax = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(w.absmax.clone()));
    let [n_blocks] = absmax.dims();
    // Pad (Bytes layout) or cut (Words padding) to whole blocks, then scale each block.
    let padded = n_blocks * w.blocksize;
    let codes = if n_codes >= padded {
        codes.narrow(0, 0, padded)
    } else {
        let fill =
            Tensor::<B, 1, Int>::full([padded - n_codes], 7, &codes.device()).cast(codes.dtype());
        Tensor::cat(vec![codes, fill], 0)
    };
    let values = code
        .select(0, codes)
        .reshape([n_blocks, w.blocksize])
        .mul(absmax.reshape([n_blocks, 1]));
    values
        .reshape([padded])
        .narrow(0, 0, numel)
        .reshape(w.shape)
        .cast(dtype)
        .into_primitive()
        .tensor()
}

/// `x · dequant(W)ᵀ` by dequantizing the whole weight (`B`'s own kernel) and multiplying:
/// the trait's default, and the prefill path of backends with a decode kernel.
pub fn matmul<B: Kernels>(x: FloatTensor<B>, w: &Nf4Weight<B>) -> FloatTensor<B> {
    let weight = B::nf4_dequantize(w, x.dtype());
    B::float_matmul(x, B::float_transpose(weight))
}
