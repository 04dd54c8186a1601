//! The NF4 matmul on the CPU backend (`NdArray<f32>`), and its autodiff op.
//!
//! Why a kernel: built from generic tensor ops (shift, mask, gather, multiply), a dequantized
//! weight costs seven full-size integer tensors per call; on NdArray that made NF4 decode
//! 20× slower than f32. Here the packed bytes stay on the host and are decoded a row at a
//! time through a 256-entry byte → (high, low) table, straight into the dot products
//! (decode: few input rows) or into one f32 weight for a GEMM (prefill, training).
//!
//! Why an autodiff op: with burn's own matmul, a weight dequantized inside `forward` is kept
//! alive by the matmul's backward node until `backward()` (BURN_NOTES §3), so QLoRA training
//! would hold every layer's f32 weight at once. [`Nf4MatmulBackward`] keeps only the packed
//! layer (reference-counted, shared with the module) and decodes the weight again in backward.
//!
//! Dispatch is by type: the model is generic over `B: Backend`, and a backend-extension trait
//! would have to be threaded through every model type and burn's `AutodiffModule` derive. Only
//! the concrete CPU backends get here ([`try_matmul`] downcasts through `Any`); every other
//! backend keeps the generic-op path of [`super::Nf4Linear`].

use std::any::Any;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use rayon::prelude::*;

/// The CPU inference backend.
pub(crate) type Cpu = NdArray<f32>;
/// The CPU training backend.
pub(crate) type CpuAd = Autodiff<Cpu>;

/// Up to this many input rows the matmul decodes each weight row into the dot products
/// (decode of batch 1–8: reads the packed weight once, never materializes it); above, it
/// decodes the whole weight once and hands it to the backend GEMM.
const GEMV_MAX_ROWS: usize = 8;

/// An NF4 weight on the host: what the CPU kernels read.
#[derive(Clone, Debug)]
pub(crate) struct HostNf4 {
    /// bitsandbytes' packing: element `e` in byte `e / 2`, high nibble first.
    packed: Arc<[u8]>,
    /// f32 scale of each block of `blocksize` flattened elements.
    absmax: Arc<[f32]>,
    /// Byte → (value of its high nibble, value of its low nibble), from the code book.
    pairs: Arc<[[f32; 2]; 256]>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
}

impl HostNf4 {
    /// `packed` holds at least `ceil(out·in / 2)` bytes and `absmax` one scale per block
    /// (the caller, `Nf4Linear::from_nf4`, has validated both against the shape).
    pub(crate) fn new(
        packed: Vec<u8>,
        absmax: Vec<f32>,
        code: &[f32; 16],
        out_features: usize,
        in_features: usize,
        blocksize: usize,
    ) -> Self {
        let mut pairs = [[0f32; 2]; 256];
        for (byte, pair) in pairs.iter_mut().enumerate() {
            *pair = [code[byte >> 4], code[byte & 15]];
        }
        Self {
            packed: packed.into(),
            absmax: absmax.into(),
            pairs: Arc::new(pairs),
            out_features,
            in_features,
            blocksize,
        }
    }

    /// Bytes held: packed codes, scales and the decode table.
    pub(crate) fn stored_bytes(&self) -> u64 {
        (self.packed.len() + self.absmax.len() * 4 + 256 * 8) as u64
    }

    /// Writes row `o` of the dequantized weight (`in_features` values) into `row`.
    ///
    /// Rows need not start on a block or byte boundary (`in_features` may be odd or not a
    /// multiple of the block size, as bitsandbytes flattens the whole weight).
    fn dequant_row(&self, o: usize, row: &mut [f32]) {
        let mut e = o * self.in_features;
        let end = e + self.in_features;
        let mut k = 0;
        while e < end {
            let block = e / self.blocksize;
            let scale = self.absmax[block];
            let seg_end = end.min((block + 1) * self.blocksize);
            if e % 2 == 1 {
                row[k] = self.pairs[self.packed[e / 2] as usize][1] * scale;
                e += 1;
                k += 1;
            }
            // Whole bytes: two elements each.
            let n_pairs = (seg_end - e) / 2;
            let bytes = &self.packed[e / 2..e / 2 + n_pairs];
            for (dst, &b) in row[k..k + 2 * n_pairs].chunks_exact_mut(2).zip(bytes) {
                let [hi, lo] = self.pairs[b as usize];
                dst[0] = hi * scale;
                dst[1] = lo * scale;
            }
            e += 2 * n_pairs;
            k += 2 * n_pairs;
            if e < seg_end {
                row[k] = self.pairs[self.packed[e / 2] as usize][0] * scale;
                e += 1;
                k += 1;
            }
        }
    }

    /// The whole dequantized weight, `[out_features, in_features]` row-major.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_features * self.in_features];
        if self.in_features == 0 {
            return w;
        }
        w.par_chunks_mut(self.in_features)
            .enumerate()
            .for_each(|(o, row)| self.dequant_row(o, row));
        w
    }

    /// `x · Wᵀ` for `x` = `[m, in_features]` row-major with `m ≤ GEMV_MAX_ROWS`: each output
    /// feature decodes its weight row once and dots it with every input row.
    fn gemv(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (inn, out) = (self.in_features, self.out_features);
        let mut yt = vec![0f32; out * m]; // [out, m]: one contiguous chunk per weight row
        yt.par_chunks_mut(m.max(1)).enumerate().for_each_init(
            || vec![0f32; inn],
            |row, (o, y)| {
                self.dequant_row(o, row);
                for (r, yr) in y.iter_mut().enumerate() {
                    *yr = dot(&x[r * inn..(r + 1) * inn], row);
                }
            },
        );
        let mut y = vec![0f32; m * out];
        for o in 0..out {
            for r in 0..m {
                y[r * out + o] = yt[o * m + r];
            }
        }
        y
    }

    /// The dequantized weight as a `[out_features, in_features]` tensor.
    fn weight_tensor(&self, device: &burn::backend::ndarray::NdArrayDevice) -> Tensor<Cpu, 2> {
        Tensor::from_data(
            TensorData::new(self.dequantize(), [self.out_features, self.in_features]),
            device,
        )
    }

    /// `y = x · Wᵀ`: `x` `[m, in_features]` → `[m, out_features]`.
    pub(crate) fn matmul(&self, x: Tensor<Cpu, 2>) -> Tensor<Cpu, 2> {
        let [m, _] = x.dims();
        let device = x.device();
        if m <= GEMV_MAX_ROWS {
            let xs = x.into_data().convert::<f32>();
            if let Ok(xs) = xs.as_slice::<f32>() {
                let y = self.gemv(xs, m);
                return Tensor::from_data(TensorData::new(y, [m, self.out_features]), &device);
            }
            let w = self.weight_tensor(&device);
            return Tensor::from_data(xs, &device).matmul(w.transpose());
        }
        x.matmul(self.weight_tensor(&device).transpose())
    }

    /// The input gradient of `y = x · Wᵀ`: `dy` `[m, out_features]` → `dy · W` `[m, in_features]`.
    fn matmul_backward(&self, dy: Tensor<Cpu, 2>) -> Tensor<Cpu, 2> {
        let device = dy.device();
        dy.matmul(self.weight_tensor(&device))
    }
}

/// `Σ a[i]·b[i]` in f32, over eight accumulators so the compiler vectorizes it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Backward of `y = x · dequant(W)ᵀ` with a frozen NF4 `W`: only `x` gets a gradient.
#[derive(Debug)]
struct Nf4MatmulBackward;

impl Backward<Cpu, 1> for Nf4MatmulBackward {
    /// The packed layer (shared `Arc`s, no copy): the weight is decoded again here.
    type State = HostNf4;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |dy| {
            let dy = Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(dy));
            w.matmul_backward(dy).into_primitive().tensor()
        });
    }
}

/// `x · Wᵀ` on the autodiff CPU backend, recording [`Nf4MatmulBackward`].
fn matmul_autodiff(w: &HostNf4, x: Tensor<CpuAd, 2>) -> Tensor<CpuAd, 2> {
    let x = x.into_primitive().tensor();
    let inner = Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let y = w.matmul(inner).into_primitive().tensor();
    let out = match Nf4MatmulBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x · Wᵀ` when `B` is a CPU backend with a kernel here; otherwise gives `x` back.
///
/// # Shapes
/// - `x`: `[m, in_features]`
/// - returns `[m, out_features]`
pub(crate) fn try_matmul<B: Backend>(
    w: &HostNf4,
    x: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let x = match cast::<_, Tensor<Cpu, 2>>(x) {
        Ok(x) => return Ok(cast_back(w.matmul(x))),
        Err(x) => x,
    };
    match cast::<_, Tensor<CpuAd, 2>>(x) {
        Ok(x) => Ok(cast_back(matmul_autodiff(w, x))),
        Err(x) => Err(x),
    }
}

/// Whether `B` is one of the backends [`try_matmul`] serves.
pub(crate) fn has_kernel<B: Backend>() -> bool {
    use std::any::TypeId;
    let b = TypeId::of::<B>();
    b == TypeId::of::<Cpu>() || b == TypeId::of::<CpuAd>()
}

/// `t` as a `U` when `T` and `U` are the same type, else `t` unchanged.
fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    if let Some(u) = (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        if let Some(u) = u.take() {
            return Ok(u);
        }
    }
    match slot {
        Some(t) => Err(t),
        // Unreachable: the slot is only emptied by a successful downcast, which returned.
        None => unreachable!("cast emptied its slot without returning"),
    }
}

/// The inverse of a successful [`cast`]: `T` is `U` here, checked by the caller's dispatch.
fn cast_back<T: 'static, U: 'static>(t: T) -> U {
    match cast::<T, U>(t) {
        Ok(u) => u,
        Err(_) => unreachable!("cast_back on types that try_matmul matched as equal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Nf4Tensor;
    use crate::test_util::assert_close;

    /// f32 dot products of a few hundred terms in a different order than the f64 reference.
    const ATOL: f32 = 1e-4;

    fn layer(out: usize, inn: usize, blocksize: usize) -> (HostNf4, Vec<f32>) {
        let values: Vec<f32> = (0..out * inn)
            .map(|i| (((i * 7919) % 211) as f32 - 105.0) / 50.0)
            .collect();
        let w = Nf4Tensor::quantize("w", &values, &[out, inn], "float32", blocksize, true).unwrap();
        let host = HostNf4::new(
            w.packed.clone(),
            w.absmax_f32(),
            &w.quant_map,
            out,
            inn,
            blocksize,
        );
        (host, w.dequantize())
    }

    fn reference(x: &[f32], w: &[f32], m: usize, inn: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * out];
        for r in 0..m {
            for o in 0..out {
                y[r * out + o] = (0..inn)
                    .map(|i| x[r * inn + i] as f64 * w[o * inn + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn dequantize_equals_bitsandbytes_order_for_rows_that_straddle_bytes_and_blocks() {
        // 13 × 11: odd rows start mid-byte; 143 elements cross two 64-blocks and a tail.
        for (out, inn, bs) in [(13, 11, 64), (5, 130, 64), (3, 64, 64), (7, 9, 128)] {
            let (host, want) = layer(out, inn, bs);
            assert_eq!(host.dequantize(), want, "{out}x{inn} blocksize {bs}");
        }
    }

    #[test]
    fn decode_and_prefill_paths_both_equal_x_times_w_transposed() {
        let dev = Default::default();
        for (out, inn) in [(13, 11), (48, 96)] {
            let (host, w) = layer(out, inn, 64);
            for m in [1, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 5] {
                let x: Vec<f32> = (0..m * inn)
                    .map(|i| ((i % 17) as f32 - 8.0) / 9.0)
                    .collect();
                let xt = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, inn]), &dev);
                let got = host.matmul(xt).into_data().to_vec::<f32>().unwrap();
                assert_close(
                    &format!("{out}x{inn}, m={m}"),
                    &got,
                    &reference(&x, &w, m, inn, out),
                    ATOL,
                );
            }
        }
    }

    #[test]
    fn the_autodiff_op_gives_the_input_gradient_dy_times_w() {
        let dev = Default::default();
        let (out, inn, m) = (6, 70, 4);
        let (host, w) = layer(out, inn, 64);
        let x: Vec<f32> = (0..m * inn).map(|i| ((i % 5) as f32 - 2.0) / 3.0).collect();
        let xt = Tensor::<CpuAd, 2>::from_data(TensorData::new(x, [m, inn]), &dev).require_grad();
        let dy: Vec<f32> = (0..m * out).map(|i| (i % 7) as f32 - 3.0).collect();
        let dyt = Tensor::<CpuAd, 2>::from_data(TensorData::new(dy.clone(), [m, out]), &dev);
        let y = match try_matmul(&host, xt.clone()) {
            Ok(y) => y,
            Err(_) => panic!("Autodiff<NdArray<f32>> has a CPU kernel"),
        };
        // d(Σ y ⊙ dy)/dx = dy · W
        let grads = (y * dyt).sum().backward();
        let got = xt
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let mut want = vec![0f32; m * inn];
        for r in 0..m {
            for i in 0..inn {
                want[r * inn + i] = (0..out).map(|o| dy[r * out + o] * w[o * inn + i]).sum();
            }
        }
        assert_close("dx", &got, &want, ATOL);
    }

    #[test]
    fn only_the_cpu_backends_are_served() {
        assert!(has_kernel::<Cpu>() && has_kernel::<CpuAd>());
        assert!(!has_kernel::<
            Autodiff<Cpu, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>,
        >());
        let (host, _) = layer(2, 64, 64);
        let x = Tensor::<NdArray<f64>, 2>::zeros([1, 64], &Default::default());
        assert!(
            try_matmul(&host, x).is_err(),
            "another backend gets its input back"
        );
    }
}
