//! The kernels as CubeCL kernels, for every CubeCL runtime (CUDA, wgpu: Vulkan, Metal, DX12
//! and Mesa's lavapipe in CI). Generic over the output float type: f32 and f16 are tested on
//! lavapipe, bf16 exists only on CUDA (WGSL has no bf16).

use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::{Kernels, Nf4Weight};

mod kernel {
    use cubecl::prelude::*;

    /// One thread per weight element: read its 32-bit word, pick its nibble (byte `j / 2`
    /// of the little-endian word, high nibble first: bitsandbytes' order), look the code up
    /// and scale it by its block's absmax.
    #[cube(launch)]
    pub fn nf4_dequantize<F: Float>(
        packed: &Array<u32>,
        absmax: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<F>,
        #[comptime] blocksize: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let word = packed[i / 8];
        let j = i % 8;
        let shift = ((j / 2) * 8 + (1 - j % 2) * 4) as u32;
        let nibble = (word >> shift) & 15u32;
        let value = code[nibble as usize] * absmax[i / blocksize as usize];
        out[i] = F::cast_from(value);
    }
}

/// Threads per cube of the element-wise kernels.
const CUBE_SIZE: u32 = 256;

/// The NF4 weight `[out, in]` in `dtype`, decoded by [`kernel::nf4_dequantize`].
pub fn nf4_dequantize<R: CubeRuntime>(
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    code: CubeTensor<R>,
    shape: [usize; 2],
    blocksize: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let packed = into_contiguous(packed);
    let absmax = into_contiguous(absmax);
    let code = into_contiguous(code);
    let client = packed.client.clone();
    let device = packed.device.clone();
    let numel = shape[0] * shape[1];
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        client.clone(),
        device,
        shape.into(),
        dtype,
    );
    let cube_dim = CubeDim::new_1d(CUBE_SIZE);
    let cube_count = calculate_cube_count_elemwise(&client, numel, cube_dim);
    kernel::nf4_dequantize::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        packed.into_array_arg(),
        absmax.into_array_arg(),
        code.into_array_arg(),
        out.clone().into_array_arg(),
        blocksize as u32,
        dtype.into(),
    );
    out
}

impl<R, F, I, BT> Kernels for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        nf4_dequantize::<R>(
            w.packed.clone(),
            w.absmax.clone(),
            w.code.clone(),
            w.shape,
            w.blocksize,
            dtype,
        )
    }
}
