//! The NF4 kernel of the CPU backend (`NdArray<f32>`).
//!
//! Why a kernel: built from generic tensor ops, a dequantized weight costs seven full-size
//! integer tensors per call; on NdArray that made NF4 decode 20× slower than f32. Here the
//! packed bytes are read in place from the `U8` tensor and decoded a row at a time through a
//! 256-entry byte → (high, low) table, straight into the dot products (decode: few input
//! rows) or into one f32 weight for a GEMM (prefill, training).

use burn::backend::ndarray::{NdArrayDevice, NdArrayTensor};
use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::{Kernels, Nf4Weight, PackedLayout};

/// The CPU inference backend.
pub type Cpu = NdArray<f32>;

/// Up to this many input rows the matmul decodes each weight row into the dot products
/// (decode of batch 1–8: reads the packed weight once, never materializes it); above, it
/// decodes the whole weight once and hands it to the backend GEMM.
pub(crate) const GEMV_MAX_ROWS: usize = 8;

impl Kernels for Cpu {
    fn nf4_layout() -> PackedLayout {
        PackedLayout::Bytes
    }

    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        let host = HostView::of(w);
        let t = Tensor::<Cpu, 2>::from_data(
            TensorData::new(host.dequantize(), w.shape),
            &NdArrayDevice::Cpu,
        );
        t.cast(dtype).into_primitive().tensor()
    }

    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        let x = Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(x));
        HostView::of(w).matmul(x).into_primitive().tensor()
    }
}

/// A backend without an override: every method runs its generic default body. Kept so the
/// defaults stay compiled and tested against the kernels (see the tests).
impl Kernels for NdArray<f64> {}

/// The packed codes and scales of an NF4 weight, borrowed from the tensors in place.
struct HostView<'a> {
    packed: std::borrow::Cow<'a, [u8]>,
    absmax: std::borrow::Cow<'a, [f32]>,
    /// Byte → (value of its high nibble, value of its low nibble), from the code book.
    pairs: [[f32; 2]; 256],
    out_features: usize,
    in_features: usize,
    blocksize: usize,
}

impl<'a> HostView<'a> {
    fn of(w: &'a Nf4Weight<Cpu>) -> Self {
        let packed = match &w.packed {
            NdArrayTensor::U8(s) => match s.view().to_slice() {
                Some(b) => std::borrow::Cow::Borrowed(b),
                None => std::borrow::Cow::Owned(s.view().iter().copied().collect()),
            },
            other => std::borrow::Cow::Owned(int_bytes(other)),
        };
        let absmax = f32s(&w.absmax);
        let code = f32s(&w.code);
        let mut pairs = [[0f32; 2]; 256];
        for (byte, pair) in pairs.iter_mut().enumerate() {
            *pair = [code[byte >> 4], code[byte & 15]];
        }
        Self {
            packed,
            absmax,
            pairs,
            out_features: w.shape[0],
            in_features: w.shape[1],
            blocksize: w.blocksize,
        }
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
    fn dequantize(&self) -> Vec<f32> {
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

    /// `y = x · Wᵀ`: `x` `[m, in_features]` → `[m, out_features]`, in `x`'s dtype.
    fn matmul(&self, x: Tensor<Cpu, 2>) -> Tensor<Cpu, 2> {
        let [m, _] = x.dims();
        let device = x.device();
        let dtype = x.dtype();
        let w = || {
            Tensor::<Cpu, 2>::from_data(
                TensorData::new(self.dequantize(), [self.out_features, self.in_features]),
                &device,
            )
            .cast(dtype)
        };
        if m <= GEMV_MAX_ROWS && dtype == DType::F32 {
            let xs = x.into_data();
            if let Ok(xs) = xs.as_slice::<f32>() {
                let y = self.gemv(xs, m);
                return Tensor::from_data(TensorData::new(y, [m, self.out_features]), &device);
            }
            return Tensor::<Cpu, 2>::from_data(xs, &device).matmul(w().transpose());
        }
        x.matmul(w().transpose())
    }
}

/// An f32 tensor's values (borrowed when contiguous f32, as the scales always are).
fn f32s(t: &NdArrayTensor) -> std::borrow::Cow<'_, [f32]> {
    if let NdArrayTensor::F32(s) = t {
        if let Some(v) = s.view().to_slice() {
            return std::borrow::Cow::Borrowed(v);
        }
    }
    let data = Tensor::<Cpu, 1>::from_primitive(TensorPrimitive::Float(t.clone()))
        .into_data()
        .convert::<f32>();
    std::borrow::Cow::Owned(data.to_vec::<f32>().unwrap_or_default())
}

/// The bytes of packed codes held in another integer type (each element one byte).
fn int_bytes(t: &NdArrayTensor) -> Vec<u8> {
    let data = Tensor::<Cpu, 1, Int>::from_primitive(t.clone())
        .into_data()
        .convert::<i64>();
    data.iter::<i64>().map(|v| v as u8).collect()
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
