//! The kernels as CubeCL kernels, for every CubeCL runtime (CUDA, wgpu: Vulkan, Metal, DX12
//! and Mesa's lavapipe in CI). Generic over the output float type: f32 and f16 are tested on
//! lavapipe, bf16 exists only on CUDA (WGSL has no bf16).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
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

    /// `x · dequant(W)ᵀ` for a few input rows (decode), the weight never written out: one
    /// cube per output feature `o`; its units stride over `o`'s 32-bit words (8 codes each,
    /// all in one quantization block), decode them in registers and accumulate every input
    /// row's dot product in f32, then sum across the cube in shared memory.
    ///
    /// Needs `in_features % 8 == 0` (a word never straddles two rows) and a block size that
    /// is a multiple of 8 (nor two blocks); `cube_size` a power of two.
    #[cube(launch)]
    pub fn nf4_gemv<F: Float>(
        x: &Array<F>,
        packed: &Array<u32>,
        absmax: &Array<f32>,
        code: &Array<f32>,
        out: &mut Array<F>,
        in_features: u32,
        out_features: u32,
        #[comptime] rows: usize,
        #[comptime] blocksize: u32,
        #[comptime] cube_size: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let o = CUBE_POS;
        if o >= out_features as usize {
            terminate!();
        }
        let tid = UNIT_POS;
        let width = in_features as usize;
        let words = in_features / 8;
        let mut acc = zeros(rows);
        let mut k = tid;
        while k < words {
            let word = packed[o * words as usize + k as usize];
            let first = o * width + (k * 8) as usize;
            let scale = absmax[first / blocksize as usize];
            #[unroll]
            for j in 0..8u32 {
                // bitsandbytes' order: byte j / 2 of the little-endian word, high nibble first.
                let shift = (j / 2) * 8 + (1 - j % 2) * 4;
                let w = code[((word >> shift) & 15u32) as usize] * scale;
                let col = (k * 8 + j) as usize;
                #[unroll]
                for r in 0..rows {
                    acc[r] += w * f32::cast_from(x[r * width + col]);
                }
            }
            k += cube_size;
        }
        let sums = cube_sum(&acc, tid, rows, cube_size);
        if tid == 0 {
            #[unroll]
            for r in 0..rows {
                out[r * out_features as usize + o] = F::cast_from(sums[r]);
            }
        }
    }

    /// `x · Wᵀ (+ b)` for a few input rows with a dense weight `[out, in]` in `F` (half
    /// precision on a GPU): one cube per output feature, its units striding over the
    /// columns, products accumulated in f32 and summed across the cube.
    #[cube(launch)]
    pub fn dense_gemv<F: Float>(
        x: &Array<F>,
        w: &Array<F>,
        bias: &Array<F>,
        out: &mut Array<F>,
        in_features: u32,
        out_features: u32,
        #[comptime] rows: usize,
        #[comptime] has_bias: bool,
        #[comptime] cube_size: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let o = CUBE_POS;
        if o >= out_features as usize {
            terminate!();
        }
        let tid = UNIT_POS;
        let width = in_features as usize;
        let mut acc = zeros(rows);
        let mut c = tid;
        while c < in_features {
            let wv = f32::cast_from(w[o * width + c as usize]);
            #[unroll]
            for r in 0..rows {
                acc[r] += wv * f32::cast_from(x[r * width + c as usize]);
            }
            c += cube_size;
        }
        let sums = cube_sum(&acc, tid, rows, cube_size);
        if tid == 0 {
            #[unroll]
            for r in 0..rows {
                let mut v = sums[r];
                if has_bias {
                    v += f32::cast_from(bias[o]);
                }
                out[r * out_features as usize + o] = F::cast_from(v);
            }
        }
    }

    /// RMSNorm, one row per cube (Qwen2's order): the units stride over the row summing
    /// squares in f32, the cube sums them, then each unit writes its values divided by
    /// `sqrt(mean + eps)` in f32, rounded to `F`, times the weight.
    #[cube(launch)]
    pub fn rms_norm<F: Float>(
        x: &Array<F>,
        weight: &Array<F>,
        out: &mut Array<F>,
        rows: u32,
        width: u32,
        eps: f32,
        #[comptime] cube_size: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let row = CUBE_POS;
        if row >= rows as usize {
            terminate!();
        }
        let tid = UNIT_POS;
        let base = row * width as usize;
        let mut acc = zeros(1usize);
        let mut c = tid;
        while c < width {
            let v = f32::cast_from(x[base + c as usize]);
            acc[0] += v * v;
            c += cube_size;
        }
        let sums = cube_sum(&acc, tid, 1usize, cube_size);
        let rms = f32::sqrt(sums[0] / f32::cast_from(width) + eps);
        let mut c = tid;
        while c < width {
            let i = base + c as usize;
            let normed = F::cast_from(f32::cast_from(x[i]) / rms);
            out[i] = normed * weight[c as usize];
            c += cube_size;
        }
    }

    /// Rotary embedding, one unit per element of `x` `[b, heads, s, d]`: `x·cos +
    /// rotate_half(x)·sin` with the tables `[b, 1, s, d]` read at the element's batch,
    /// position and column, computed in f32 and rounded once.
    #[cube(launch)]
    pub fn rotary<F: Float>(
        x: &Array<F>,
        cos: &Array<F>,
        sin: &Array<F>,
        out: &mut Array<F>,
        heads: u32,
        seq: u32,
        dim: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let d = dim as usize;
        let j = i % d;
        let row = i / d; // over (b, head, position)
        let pos = row % seq as usize;
        let b = row / (seq as usize * heads as usize);
        let t = (b * seq as usize + pos) * d + j;
        // rotate_half: [-x[h1..], x[..h1]], h1 = d / 2 (the second half is the longer one):
        // column j reads column (j + h1) mod d, negated for j < d - h1.
        let h1 = d / 2;
        let sign = select(j < d - h1, -1.0f32, 1.0f32);
        let rotated = sign * f32::cast_from(x[i - j + (j + h1) % d]);
        let v = f32::cast_from(x[i]) * f32::cast_from(cos[t]) + rotated * f32::cast_from(sin[t]);
        out[i] = F::cast_from(v);
    }

    /// `silu(gate) · up`, one unit per element, in f32, rounded once.
    #[cube(launch)]
    pub fn silu_mul<F: Float>(
        gate: &Array<F>,
        up: &Array<F>,
        out: &mut Array<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let g = f32::cast_from(gate[i]);
        let silu = g / (1.0 + f32::exp(-g));
        out[i] = F::cast_from(silu * f32::cast_from(up[i]));
    }

    /// Flash-decoding, pass 1: the attention of a few query rows over one split of the key
    /// positions. One cube per (split, batch × kv head); its units first score `chunk`
    /// positions at a time (one unit per position, every row, in f32), then the rows' online
    /// softmax state is updated, then each unit accumulates its columns of `p · v`. Writes
    /// the split's unnormalized output and its `(max, sum)` per row.
    ///
    /// `q` `[b, h, rows, dim]`, `k` and `v` `[b, h, len, dim]` at any strides (the cache's
    /// views are read in place), `mask` `[b, h, rows, len]` (non-zero = hidden) when
    /// `has_mask`.
    #[cube(launch)]
    pub fn decode_attention_split<F: Float, M: Int>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        mask: &Tensor<M>,
        part_o: &mut Array<f32>,
        part_ml: &mut Array<f32>,
        heads: u32,
        len: u32,
        split_len: u32,
        scale: f32,
        #[comptime] rows: usize,
        #[comptime] dim: usize,
        #[comptime] has_mask: bool,
        #[comptime] chunk: u32,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let split = CUBE_POS_X as usize;
        let splits = CUBE_COUNT_X as usize;
        let bh = CUBE_POS_Y as usize;
        let tid = UNIT_POS as usize;
        let b = bh / heads as usize;
        let h = bh % heads as usize;
        let cols = comptime!(dim.div_ceil(chunk as usize));
        let chunk_n = chunk as usize;

        let mut q_sh = SharedMemory::<f32>::new(rows * dim);
        let mut s_sh = SharedMemory::<f32>::new(rows * chunk as usize);
        let mut m_sh = SharedMemory::<f32>::new(rows);
        let mut l_sh = SharedMemory::<f32>::new(rows);
        let mut f_sh = SharedMemory::<f32>::new(rows);
        let q_base = b * q.stride(0) + h * q.stride(1);
        let mut i = tid;
        while i < rows * dim {
            let r = i / dim;
            let j = i % dim;
            q_sh[i] = f32::cast_from(q[q_base + r * q.stride(2) + j * q.stride(3)]);
            i += chunk_n;
        }
        if tid < rows {
            m_sh[tid] = -3.0e38f32;
            l_sh[tid] = 0.0;
        }
        let mut acc = Array::<f32>::new(rows * cols);
        #[unroll]
        for a in 0..rows * cols {
            acc[a] = 0.0;
        }
        sync_cube();

        let k_base = b * k.stride(0) + h * k.stride(1);
        let v_base = b * v.stride(0) + h * v.stride(1);
        let start = split * split_len as usize;
        let end = min(start + split_len as usize, len as usize);
        let mut c0 = start;
        while c0 < end {
            // Scores of positions c0.., one unit per position.
            let p = c0 + tid;
            #[unroll]
            for r in 0..rows {
                let mut score = f32::new(-3.0e38);
                if p < end {
                    let mut dot = f32::new(0.0);
                    for j in 0..dim {
                        dot += q_sh[r * dim + j]
                            * f32::cast_from(k[k_base + p * k.stride(2) + j * k.stride(3)]);
                    }
                    score = dot * scale;
                    if has_mask {
                        let at = b * mask.stride(0)
                            + h * mask.stride(1)
                            + r * mask.stride(2)
                            + p * mask.stride(3);
                        if u32::cast_from(mask[at]) != 0u32 {
                            score = -3.0e38f32;
                        }
                    }
                }
                s_sh[r * chunk_n + tid] = score;
            }
            sync_cube();
            // Each row's online softmax: new max, rescale factor, probabilities in place.
            if tid < rows {
                let r = tid;
                let mut top = f32::new(-3.0e38);
                for i in 0..chunk_n {
                    let sc = s_sh[r * chunk_n + i];
                    top = select(sc > top, sc, top);
                }
                let old = m_sh[r];
                let new = select(top > old, top, old);
                let mut factor = f32::new(1.0);
                let mut sum = f32::new(0.0);
                if new > -1.0e38f32 {
                    factor = f32::exp(old - new);
                    for i in 0..chunk_n {
                        let sc = s_sh[r * chunk_n + i];
                        let e = select(sc > -1.0e38f32, f32::exp(sc - new), 0.0f32);
                        s_sh[r * chunk_n + i] = e;
                        sum += e;
                    }
                } else {
                    for i in 0..chunk_n {
                        s_sh[r * chunk_n + i] = 0.0;
                    }
                }
                l_sh[r] = l_sh[r] * factor + sum;
                f_sh[r] = factor;
                m_sh[r] = new;
            }
            sync_cube();
            // Each unit's columns of p · v.
            #[unroll]
            for c in 0..cols {
                let col = tid + c * chunk_n;
                if col < dim {
                    #[unroll]
                    for r in 0..rows {
                        acc[r * cols + c] *= f_sh[r];
                    }
                    let mut i = 0usize;
                    while i < chunk_n && c0 + i < end {
                        let value =
                            f32::cast_from(v[v_base + (c0 + i) * v.stride(2) + col * v.stride(3)]);
                        #[unroll]
                        for r in 0..rows {
                            acc[r * cols + c] += s_sh[r * chunk_n + i] * value;
                        }
                        i += 1;
                    }
                }
            }
            sync_cube();
            c0 += chunk_n;
        }
        let part = (bh * splits + split) * rows;
        #[unroll]
        for c in 0..cols {
            let col = tid + c * chunk_n;
            if col < dim {
                #[unroll]
                for r in 0..rows {
                    part_o[(part + r) * dim + col] = acc[r * cols + c];
                }
            }
        }
        if tid < rows {
            part_ml[(part + tid) * 2] = m_sh[tid];
            part_ml[(part + tid) * 2 + 1] = l_sh[tid];
        }
    }

    /// Flash-decoding, pass 2: one cube per (batch × kv head, row) weighs each split's
    /// output by `exp(max_split − max)` and divides by the weighted sums. A row hidden
    /// everywhere comes out 0.
    #[cube(launch)]
    pub fn decode_attention_combine<F: Float>(
        part_o: &Array<f32>,
        part_ml: &Array<f32>,
        out: &mut Array<F>,
        splits: u32,
        #[comptime] rows: usize,
        #[comptime] dim: usize,
        #[comptime] cube: u32,
        #[define(F)] _dtype: StorageType,
    ) {
        let row = CUBE_POS;
        let bh = row / rows;
        let r = row % rows;
        let n = splits as usize;
        let first = bh * n * rows + r; // split s's row: first + s * rows
        let mut top = f32::new(-3.0e38);
        for s in 0..n {
            let m = part_ml[(first + s * rows) * 2];
            top = select(m > top, m, top);
        }
        let mut total = f32::new(0.0);
        for s in 0..n {
            let m = part_ml[(first + s * rows) * 2];
            let w = select(m > -1.0e38f32, f32::exp(m - top), 0.0f32);
            total += w * part_ml[(first + s * rows) * 2 + 1];
        }
        let mut col = UNIT_POS as usize;
        while col < dim {
            let mut o = f32::new(0.0);
            for s in 0..n {
                let m = part_ml[(first + s * rows) * 2];
                let w = select(m > -1.0e38f32, f32::exp(m - top), 0.0f32);
                o += w * part_o[(first + s * rows) * dim + col];
            }
            out[row * dim + col] = F::cast_from(select(total > 0.0f32, o / total, 0.0f32));
            col += cube as usize;
        }
    }

    /// One f32 accumulator per input row, zeroed.
    #[cube]
    fn zeros(#[comptime] rows: usize) -> Array<f32> {
        let mut acc = Array::<f32>::new(rows);
        #[unroll]
        for r in 0..rows {
            acc[r] = 0.0;
        }
        acc
    }

    /// Each unit's `rows` partial sums, summed across the cube: a tree of log2(cube_size)
    /// halvings in shared memory, unrolled at compile time. Every unit must call it; the
    /// sums are in the first `rows` slots.
    #[cube]
    fn cube_sum(
        acc: &Array<f32>,
        tid: u32,
        #[comptime] rows: usize,
        #[comptime] cube_size: u32,
    ) -> SharedMemory<f32> {
        let mut partial = SharedMemory::<f32>::new(cube_size as usize * rows);
        #[unroll]
        for r in 0..rows {
            partial[tid as usize * rows + r] = acc[r];
        }
        sync_cube();
        let levels = comptime!(cube_size.trailing_zeros());
        #[unroll]
        for level in 0..levels {
            let stride = (cube_size / 2) >> level;
            if tid < stride {
                #[unroll]
                for r in 0..rows {
                    let other = partial[(tid + stride) as usize * rows + r];
                    partial[tid as usize * rows + r] += other;
                }
            }
            sync_cube();
        }
        partial
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

/// Input rows up to which [`nf4_matmul`] runs the fused GEMV (decode batches); more rows
/// (prefill) dequantize once and multiply with burn's tiled matmul.
pub const GEMV_MAX_ROWS: usize = 8;
/// Units per cube of the GEMV: 128 units stride over a row of words, then reduce.
const GEMV_CUBE: u32 = 128;

/// Whether [`nf4_gemv`] takes `x` `[m, in]` against `w`'s shape and block size.
pub fn gemv_fits(m: usize, shape: [usize; 2], blocksize: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&m)
        && shape[1].is_multiple_of(8)
        && blocksize.is_multiple_of(8)
        && shape[0] > 0
}

/// `x · dequant(W)ᵀ` by [`kernel::nf4_gemv`]: `x` `[m, in]` (m ≤ [`GEMV_MAX_ROWS`]) →
/// `[m, out]` in `x`'s dtype. Call only where [`gemv_fits`].
pub fn nf4_gemv<R: CubeRuntime>(
    x: CubeTensor<R>,
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    code: CubeTensor<R>,
    shape: [usize; 2],
    blocksize: usize,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let packed = into_contiguous(packed);
    let absmax = into_contiguous(absmax);
    let code = into_contiguous(code);
    let (m, dtype) = (x.meta.shape()[0], x.dtype);
    let client = x.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        client.clone(),
        x.device.clone(),
        [m, shape[0]].into(),
        dtype,
    );
    kernel::nf4_gemv::launch::<R>(
        &client,
        gemv_cube_count(shape[0]),
        CubeDim::new_1d(GEMV_CUBE),
        x.into_array_arg(),
        packed.into_array_arg(),
        absmax.into_array_arg(),
        code.into_array_arg(),
        out.clone().into_array_arg(),
        shape[1] as u32,
        shape[0] as u32,
        m,
        blocksize as u32,
        GEMV_CUBE,
        dtype.into(),
    );
    out
}

/// `x · Wᵀ (+ b)` by [`kernel::dense_gemv`]: `x` `[m, in]` (m ≤ [`GEMV_MAX_ROWS`]),
/// `weight` `[out, in]` and `bias` `[out]` all in one float dtype → `[m, out]`.
pub fn dense_gemv<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    let (m, inn) = (x.meta.shape()[0], x.meta.shape()[1]);
    let out_features = weight.meta.shape()[0];
    let dtype = x.dtype;
    let client = x.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        client.clone(),
        x.device.clone(),
        [m, out_features].into(),
        dtype,
    );
    let has_bias = bias.is_some();
    // Without a bias the kernel reads none: any array of the dtype stands in.
    let bias = bias.map(into_contiguous).unwrap_or_else(|| out.clone());
    kernel::dense_gemv::launch::<R>(
        &client,
        gemv_cube_count(out_features),
        CubeDim::new_1d(GEMV_CUBE),
        x.into_array_arg(),
        weight.into_array_arg(),
        bias.into_array_arg(),
        out.clone().into_array_arg(),
        inn as u32,
        out_features as u32,
        m,
        has_bias,
        GEMV_CUBE,
        dtype.into(),
    );
    out
}

/// Whether [`dense_gemv`] takes `x` `[m, in]` with this weight and bias: few rows, one
/// dtype throughout.
pub fn dense_gemv_fits<R: CubeRuntime>(
    x: &CubeTensor<R>,
    weight: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    let (xs, ws) = (x.meta.shape(), weight.meta.shape());
    xs.num_dims() == 2
        && ws.num_dims() == 2
        && (1..=GEMV_MAX_ROWS).contains(&xs[0])
        && xs[1] == ws[1]
        && ws[0] > 0
        && weight.dtype == x.dtype
        && bias.is_none_or(|b| b.dtype == x.dtype && b.meta.shape().num_elements() == ws[0])
}

/// RMSNorm of `x` `[rows, d]` with `weight` `[d]` (one dtype) by [`kernel::rms_norm`]: one
/// launch, one read of `x` for the sum and one for the output.
pub fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    let (rows, width) = (x.meta.shape()[0], x.meta.shape()[1]);
    let dtype = x.dtype;
    let client = x.client.clone();
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        client.clone(),
        x.device.clone(),
        [rows, width].into(),
        dtype,
    );
    kernel::rms_norm::launch::<R>(
        &client,
        gemv_cube_count(rows),
        CubeDim::new_1d(GEMV_CUBE),
        x.into_array_arg(),
        weight.into_array_arg(),
        out.clone().into_array_arg(),
        rows as u32,
        width as u32,
        eps as f32,
        GEMV_CUBE,
        dtype.into(),
    );
    out
}

/// An uninitialized tensor of `like`'s shape, dtype and device, with the launch size of an
/// element-wise kernel over it (one unit per element).
fn elementwise_output<R: CubeRuntime>(
    like: &CubeTensor<R>,
) -> (CubeTensor<R>, cubecl::CubeCount, CubeDim) {
    let shape = like.meta.shape().clone();
    let cube_dim = CubeDim::new_1d(CUBE_SIZE);
    let count = calculate_cube_count_elemwise(&like.client, shape.num_elements(), cube_dim);
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        like.client.clone(),
        like.device.clone(),
        shape,
        like.dtype,
    );
    (out, count, cube_dim)
}

/// `x·cos + rotate_half(x)·sin` by [`kernel::rotary`]; see [`rotary_fits`].
pub fn rotary<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
) -> CubeTensor<R> {
    let (x, cos, sin) = (
        into_contiguous(x),
        into_contiguous(cos),
        into_contiguous(sin),
    );
    let (heads, seq, dim) = (x.meta.shape()[1], x.meta.shape()[2], x.meta.shape()[3]);
    let dtype = x.dtype;
    let client = x.client.clone();
    let (out, cube_count, cube_dim) = elementwise_output(&x);
    kernel::rotary::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        x.into_array_arg(),
        cos.into_array_arg(),
        sin.into_array_arg(),
        out.clone().into_array_arg(),
        heads as u32,
        seq as u32,
        dim as u32,
        dtype.into(),
    );
    out
}

/// Whether [`rotary`] takes these shapes and dtypes: `x` `[b, h, s, d]`, tables exactly
/// `[b, 1, s, d]`, one dtype (anything else takes the tensor-op formula, which broadcasts).
/// The fusion backend asks it too, before registering its custom op.
pub fn rotary_fits(x: (&Shape, DType), cos: (&Shape, DType), sin: (&Shape, DType)) -> bool {
    let (xs, dtype) = x;
    let table = |(ts, t_dtype): (&Shape, DType)| {
        ts.num_dims() == 4
            && [ts[0], ts[1], ts[2], ts[3]] == [xs[0], 1, xs[2], xs[3]]
            && t_dtype == dtype
    };
    xs.num_dims() == 4 && xs.num_elements() > 0 && table(cos) && table(sin)
}

/// `silu(gate) · up` by [`kernel::silu_mul`] (equal shapes and dtypes).
pub fn silu_mul<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let (gate, up) = (into_contiguous(gate), into_contiguous(up));
    let dtype = gate.dtype;
    let client = gate.client.clone();
    let (out, cube_count, cube_dim) = elementwise_output(&gate);
    kernel::silu_mul::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        gate.into_array_arg(),
        up.into_array_arg(),
        out.clone().into_array_arg(),
        dtype.into(),
    );
    out
}

/// Whether [`rms_norm`] takes `x` with `weight` (shapes and dtypes): rows of `weight`'s
/// width, one dtype. The fusion backend asks it too, before registering its custom op.
pub fn rms_norm_fits(x: (&Shape, DType), weight: (&Shape, DType)) -> bool {
    let ((xs, x_dtype), (ws, w_dtype)) = (x, weight);
    xs.num_dims() == 2 && ws.num_dims() == 1 && xs[1] == ws[0] && xs[1] > 0 && w_dtype == x_dtype
}

/// Query rows (heads of a group × new positions) up to which [`decode_attention`] runs.
pub const DECODE_ATTENTION_MAX_ROWS: usize = 16;
/// Key positions a cube of the decode attention scores at a time (its unit count).
const DECODE_CHUNK: u32 = 64;
/// Cubes the splits of the decode attention aim for over batch × heads, so a batch of one
/// with few kv heads still fills a GPU.
const DECODE_TARGET_CUBES: usize = 256;
/// Shared memory a cube of the decode attention may use: WebGPU's guaranteed minimum.
const DECODE_SHARED_BYTES: usize = 16 * 1024;

/// Whether [`decode_attention`] takes `q` `[b, h, rows, d]` over `k`, `v` `[b, h, t, d]`
/// (one dtype) with `mask` `[b, h, rows, t]`: a decode step's few rows, its shared memory
/// within WebGPU's minimum. The fusion backend asks it too.
pub fn decode_attention_fits(
    q: (&Shape, DType),
    k: (&Shape, DType),
    v: (&Shape, DType),
    mask: Option<&Shape>,
) -> bool {
    let (qs, kv) = (q.0, k.0);
    if qs.num_dims() != 4 || kv.num_dims() != 4 || v.0 != kv || q.1 != k.1 || k.1 != v.1 {
        return false;
    }
    let [b, h, rows, d] = [qs[0], qs[1], qs[2], qs[3]];
    let t = kv[2];
    let shared = 4 * (rows * (d + DECODE_CHUNK as usize) + 3 * rows);
    [kv[0], kv[1], kv[3]] == [b, h, d]
        && (1..=DECODE_ATTENTION_MAX_ROWS).contains(&rows)
        && d > 0
        && t > 0
        && b * h > 0
        && shared <= DECODE_SHARED_BYTES
        && mask.is_none_or(|m| m.num_dims() == 4 && [m[0], m[1], m[2], m[3]] == [b, h, rows, t])
}

/// `softmax(q·kᵀ/√d + mask)·v` for a decode step by flash-decoding: the key positions split
/// across cubes ([`kernel::decode_attention_split`]), then one combine
/// ([`kernel::decode_attention_combine`]); in f32 whatever the dtype, out in `q`'s dtype.
/// `k` and `v` are read at their strides (the KV cache's views, not copied). Call only where
/// [`decode_attention_fits`]; `mask` (true = hidden) is in bool storage `mask_dtype`.
pub fn decode_attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    mask: Option<(CubeTensor<R>, DType)>,
) -> CubeTensor<R> {
    let [b, h, rows, d] = {
        let s = q.meta.shape();
        [s[0], s[1], s[2], s[3]]
    };
    let t = k.meta.shape()[2];
    let (client, device, dtype) = (q.client.clone(), q.device.clone(), q.dtype);
    let chunk = DECODE_CHUNK as usize;
    let chunks = t.div_ceil(chunk);
    let wanted = DECODE_TARGET_CUBES.div_ceil(b * h).clamp(1, chunks);
    let split_len = chunks.div_ceil(wanted) * chunk;
    let splits = t.div_ceil(split_len);
    let f32_buffer = |n: usize| {
        burn_cubecl::ops::numeric::empty_device_dtype::<R>(
            client.clone(),
            device.clone(),
            [n].into(),
            DType::F32,
        )
    };
    let part_o = f32_buffer(b * h * splits * rows * d);
    let part_ml = f32_buffer(b * h * splits * rows * 2);
    let has_mask = mask.is_some();
    // Without a mask the kernel reads none: q (any tensor) stands in, as u32 storage (every
    // runtime has u32; WGSL has no u8).
    let (mask, mask_dtype) = mask.unwrap_or_else(|| (q.clone(), DType::U32));
    kernel::decode_attention_split::launch::<R>(
        &client,
        cubecl::CubeCount::new_2d(splits as u32, (b * h) as u32),
        CubeDim::new_1d(DECODE_CHUNK),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.into_tensor_arg(),
        part_o.clone().into_array_arg(),
        part_ml.clone().into_array_arg(),
        h as u32,
        t as u32,
        split_len as u32,
        1.0 / (d as f32).sqrt(),
        rows,
        d,
        has_mask,
        DECODE_CHUNK,
        [dtype.into(), mask_dtype.into()],
    );
    let out = burn_cubecl::ops::numeric::empty_device_dtype::<R>(
        client.clone(),
        device,
        [b, h, rows, d].into(),
        dtype,
    );
    kernel::decode_attention_combine::launch::<R>(
        &client,
        gemv_cube_count(b * h * rows),
        CubeDim::new_1d(GEMV_CUBE),
        part_o.into_array_arg(),
        part_ml.into_array_arg(),
        out.clone().into_array_arg(),
        splits as u32,
        rows,
        d,
        GEMV_CUBE,
        dtype.into(),
    );
    out
}

/// One cube per output feature, laid out in 2D past the 65,535 cubes one axis allows.
fn gemv_cube_count(out_features: usize) -> cubecl::CubeCount {
    cubecl::CubeCount::new_2d(
        out_features.min(65_535) as u32,
        out_features.div_ceil(65_535) as u32,
    )
}

impl<R, F, I, BT> Kernels for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn max_buffer_bytes(device: &Self::Device) -> Option<u64> {
        Some(R::client(device).properties().memory.max_page_size)
    }

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

    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        if dense_gemv_fits(&x, &weight, bias.as_ref()) {
            dense_gemv::<R>(x, weight, bias)
        } else {
            super::generic::dense_linear::<Self>(x, weight, bias)
        }
    }

    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<burn::tensor::ops::BoolTensor<Self>>,
    ) -> FloatTensor<Self> {
        let fits = decode_attention_fits(
            (q.meta.shape(), q.dtype),
            (k.meta.shape(), k.dtype),
            (v.meta.shape(), v.dtype),
            mask.as_ref().map(|m| m.meta.shape()),
        );
        if fits {
            let mask = mask.map(|m| {
                let dtype = m.dtype;
                (m, dtype)
            });
            decode_attention::<R>(q, k, v, mask)
        } else {
            super::generic::sdpa::<Self>(q, k, v, mask)
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if rms_norm_fits(
            (x.meta.shape(), x.dtype),
            (weight.meta.shape(), weight.dtype),
        ) {
            rms_norm::<R>(x, weight, eps)
        } else {
            super::generic::rms_norm::<Self>(x, weight, eps)
        }
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (xs, cs, ss) = (x.meta.shape(), cos.meta.shape(), sin.meta.shape());
        if rotary_fits((xs, x.dtype), (cs, cos.dtype), (ss, sin.dtype)) {
            rotary::<R>(x, cos, sin)
        } else {
            super::generic::rotary::<Self>(x, cos, sin)
        }
    }

    /// The CubeCL backend alone (no fusion) gets one kernel; on the fusion backend burn's
    /// element-wise fusion already compiles `silu(gate) · up` into one.
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if gate.meta.shape() == up.meta.shape() && gate.dtype == up.dtype {
            silu_mul::<R>(gate, up)
        } else {
            super::generic::silu_mul::<Self>(gate, up)
        }
    }

    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        if !gemv_fits(x.meta.shape()[0], w.shape, w.blocksize) {
            return super::nf4_generic::matmul::<Self>(x, w);
        }
        nf4_gemv::<R>(
            x,
            w.packed.clone(),
            w.absmax.clone(),
            w.code.clone(),
            w.shape,
            w.blocksize,
        )
    }
}
