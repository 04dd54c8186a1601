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

/// Elements of the largest dequantized tile the GEMM paths hold at once: 16 Mi (32 MiB in
/// half precision, 64 MiB in f32). A 7B MLP projection (68 M elements) decodes in five
/// tiles, so no full weight is ever alive; smaller weights decode whole.
pub const TILE_ELEMENTS: usize = 1 << 24;

/// `x · dequant(W)ᵀ` by dequantizing the weight (`B`'s own kernel) a tile of rows at a time
/// and multiplying: the trait's default, and the prefill path of backends with a decode
/// kernel.
pub fn matmul<B: Kernels>(x: FloatTensor<B>, w: &Nf4Weight<B>) -> FloatTensor<B> {
    matmul_tiled(x, w, TILE_ELEMENTS)
}

/// [`matmul`] with tiles of at most `tile_elements` (tests use small ones): the output
/// columns of each row tile, concatenated.
pub fn matmul_tiled<B: Kernels>(
    x: FloatTensor<B>,
    w: &Nf4Weight<B>,
    tile_elements: usize,
) -> FloatTensor<B> {
    let dtype = x.dtype();
    let product = |x: FloatTensor<B>, w: &Nf4Weight<B>| {
        B::float_matmul(x, B::float_transpose(B::nf4_dequantize(w, dtype)))
    };
    let tiles = w.row_tiles(tile_elements);
    if tiles.len() <= 1 {
        return product(x, w);
    }
    let parts = tiles
        .into_iter()
        .map(|rows| product(x.clone(), &tile(w, rows)))
        .collect();
    B::float_cat(parts, 1)
}

/// `dy · dequant(W)`: the input gradient of [`matmul`], `dy` `[m, out]` → `[m, in]`, a tile
/// of rows at a time (`Σ dy[:, tile] · W[tile]`, summed in f32), so the backward never
/// holds the whole weight either.
pub fn matmul_input_grad<B: Kernels>(
    dy: FloatTensor<B>,
    w: &Nf4Weight<B>,
    tile_elements: usize,
) -> FloatTensor<B> {
    let dtype = dy.dtype();
    let tiles = w.row_tiles(tile_elements);
    if tiles.len() <= 1 {
        return B::float_matmul(dy, B::nf4_dequantize(w, dtype));
    }
    let dy = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dy));
    let sum = tiles
        .into_iter()
        .map(|rows| {
            let part = dy.clone().narrow(1, rows.start, rows.len());
            let weight = B::nf4_dequantize(&tile(w, rows), dtype);
            part.matmul(Tensor::from_primitive(TensorPrimitive::Float(weight)))
                .cast(DType::F32)
        })
        .reduce(|a, b| a + b)
        .expect("a weight has at least one row tile");
    sum.cast(dtype).into_primitive().tensor()
}

fn tile<B: Kernels>(w: &Nf4Weight<B>, rows: std::ops::Range<usize>) -> Nf4Weight<B> {
    w.rows(rows)
        .expect("row_tiles cuts on quantization-block boundaries")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nf4_upload;
    use crate::test_util::TB;

    /// A weight of `out × in` codes with varied blocks, on `B`.
    fn weight<B: Kernels>(shape: [usize; 2], blocksize: usize, dev: &B::Device) -> Nf4Weight<B> {
        let numel = shape[0] * shape[1];
        let packed: Vec<u8> = (0..numel.div_ceil(2))
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let absmax: Vec<f32> = (0..numel.div_ceil(blocksize))
            .map(|b| 0.5 + (b % 7) as f32 * 0.25)
            .collect();
        let code: [f32; 16] = std::array::from_fn(|i| i as f32 / 7.5 - 1.0);
        nf4_upload::<B>(&packed, &absmax, &code, shape, blocksize, dev)
    }

    #[test]
    fn row_tiles_cut_on_block_boundaries_and_cover_every_row() {
        let w = weight::<TB>([100, 24], 64, &Default::default());
        // gcd(24, 64) = 8: tiles of a multiple of 8 rows (192 codes, 3 blocks).
        let tiles = w.row_tiles(500);
        assert_eq!(
            tiles,
            vec![0..16, 16..32, 32..48, 48..64, 64..80, 80..96, 96..100]
        );
        assert!(tiles.iter().all(|r| w.rows(r.clone()).is_some()));
        assert!(w.rows(0..3).is_none(), "72 codes: not a block boundary");
        assert!(
            w.rows(96..100).is_some(),
            "the tail keeps its partial block"
        );
        assert_eq!(
            w.row_tiles(10),
            w.row_tiles(192),
            "at least one step of rows"
        );
        assert_eq!(w.row_tiles(1 << 20), vec![0..100]);
        // The 7B's largest NF4 weight (MLP, 18,944 × 3,584) decodes in five tiles, none over
        // TILE_ELEMENTS.
        let mlp = Nf4Weight::<TB> {
            shape: [18_944, 3_584],
            ..w
        };
        let tiles = mlp.row_tiles(TILE_ELEMENTS);
        assert_eq!(tiles.len(), 5);
        assert!(tiles.iter().all(|r| r.len() * 3_584 <= TILE_ELEMENTS));
        assert_eq!(tiles.last().unwrap().end, 18_944);
    }

    /// Tiled forward and input gradient equal the whole-weight ones on `B`.
    fn tiled_equals_whole<B: Kernels>(dev: &B::Device, dtype: DType, tol: f32) {
        // Tile steps of 8, 2 and 16 rows; partial last blocks and the Words padding in the
        // last tile.
        for (shape, blocksize) in [([72, 40], 64), ([37, 96], 64), ([130, 24], 128)] {
            let w = weight::<B>(shape, blocksize, dev);
            let random = |rows, cols| {
                Tensor::<B, 2>::random([rows, cols], burn::tensor::Distribution::Default, dev)
                    .cast(dtype)
            };
            let (x, dy) = (random(9, shape[1]), random(9, shape[0]));
            let whole = |t| -> Vec<f32> {
                Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t))
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .unwrap()
            };
            let prim = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
            let y_full = whole(matmul_tiled(prim(&x), &w, usize::MAX));
            let y_tiled = whole(matmul_tiled(prim(&x), &w, 1000));
            let g_full = whole(matmul_input_grad(prim(&dy), &w, usize::MAX));
            let g_tiled = whole(matmul_input_grad(prim(&dy), &w, 1000));
            assert!(w.row_tiles(1000).len() > 2, "{shape:?}: several tiles");
            for (a, b, what) in [
                (&y_tiled, &y_full, "forward"),
                (&g_tiled, &g_full, "input grad"),
            ] {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= tol * scale, "{shape:?} {what}: {diff} of {scale}");
            }
        }
    }

    #[test]
    fn tiles_of_rows_give_the_whole_weights_products_on_the_cpu() {
        tiled_equals_whole::<TB>(&Default::default(), DType::F32, 1e-6);
    }

    #[test]
    fn tiles_of_rows_give_the_whole_weights_products_on_wgpu_in_f32_and_f16() {
        use burn::backend::wgpu::{Wgpu, WgpuDevice};
        if !crate::test_util::wgpu_available(
            "tiles_of_rows_give_the_whole_weights_products_on_wgpu_in_f32_and_f16",
        ) {
            return;
        }
        tiled_equals_whole::<Wgpu>(&WgpuDevice::DefaultDevice, DType::F32, 1e-6);
        // Views sliced on the CubeCL backend itself (inside the fusion custom op's execution).
        type Cube = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
        tiled_equals_whole::<Cube>(&WgpuDevice::DefaultDevice, DType::F32, 1e-6);
        // f16 products: the whole weight's input gradient rounds once, the tiled one per
        // tile before its f32 sum; a few units of f16's last place (2⁻¹⁰ ≈ 1e-3).
        tiled_equals_whole::<Wgpu>(&WgpuDevice::DefaultDevice, DType::F16, 4e-3);
    }
}
