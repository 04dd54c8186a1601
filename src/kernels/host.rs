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
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;

use super::host_gemm::{self, dot, GEMV_MAX_ROWS};
use super::{generic, host_attention};
use super::{Bf16Weight, Kernels, Nf4Weight, PackedLayout};

/// The CPU inference backend.
pub type Cpu = NdArray<f32>;

impl Kernels for Cpu {
    fn nf4_layout() -> PackedLayout {
        PackedLayout::Bytes
    }

    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let all_f32 = [Some(&x), Some(&weight), bias.as_ref()]
            .into_iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32);
        if !all_f32 {
            // Half precision on the CPU (tests only): the generic body.
            return generic::dense_linear::<Cpu>(x, weight, bias);
        }
        let [m, k] = dims2(&x);
        let [n, _] = dims2(&weight);
        let y = host_gemm::matmul_nt(
            &f32s(&x),
            m,
            k,
            &f32s(&weight),
            n,
            bias.as_ref().map(f32s).as_deref(),
        );
        host_tensor(y, [m, n])
    }

    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
    ) -> FloatTensor<Self> {
        match host_attention::attention(&q, &k, &v, mask.as_ref()) {
            Some((y, shape)) => host_tensor(y, shape),
            None => generic::sdpa::<Cpu>(q, k, v, mask),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            return generic::rms_norm::<Cpu>(x, weight, eps);
        }
        let [rows, d] = dims2(&x);
        let (xs, w) = (f32s(&x), f32s(&weight));
        let mut y = vec![0f32; rows * d];
        if d > 0 {
            // One pass per row instead of burn's six over the whole tensor.
            y.par_chunks_mut(d)
                .zip(xs.par_chunks(d))
                .for_each(|(y, x)| {
                    let ms = dot(x, x) / d as f32;
                    let rms = (ms + eps as f32).sqrt();
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w.iter()) {
                        *y = x / rms * w;
                    }
                });
        }
        host_tensor(y, [rows, d])
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
            return generic::silu_mul::<Cpu>(gate, up);
        }
        let n = gate.shape()[0];
        let (g, u) = (f32s(&gate), f32s(&up));
        let mut y = vec![0f32; n];
        // One pass instead of burn's eight (its sigmoid is exp(-log(1 + exp(-x)))).
        y.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            });
        host_tensor(y, [n])
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

    fn keeps_bf16_bits() -> bool {
        true
    }

    fn bf16_widen(w: &Bf16Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        let t = host_tensor(bf16::widen(&u16s(&w.bits)), w.shape);
        Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(t))
            .cast(dtype)
            .into_primitive()
            .tensor()
    }

    fn bf16_rows(table: &Bf16Weight<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        // Gathered from the table in place (burn's select would first copy a borrowed
        // table whole).
        let ids = Tensor::<Cpu, 1, Int>::from_primitive(ids)
            .into_data()
            .convert::<i64>();
        let bits = u16s(&table.bits);
        let [rows, d] = table.shape;
        let ids: Vec<usize> = ids
            .iter::<i64>()
            .map(|i| (i.max(0) as usize).min(rows.saturating_sub(1)))
            .collect();
        let mut out = vec![0f32; ids.len() * d];
        for (o, &i) in out.chunks_exact_mut(d.max(1)).zip(&ids) {
            bf16::widen_into(&bits[i * d..(i + 1) * d], o);
        }
        host_tensor(out, [ids.len(), d])
    }

    fn bf16_matmul(x: FloatTensor<Self>, w: &Bf16Weight<Self>) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            let weight = Self::bf16_widen(w, x.dtype());
            return generic::dense_linear::<Cpu>(x, weight, None);
        }
        let [m, k] = dims2(&x);
        let [n, _] = w.shape;
        let bits = u16s(&w.bits);
        let xs = f32s(&x);
        let y = if m <= GEMV_MAX_ROWS {
            bf16::gemv(&xs, m, k, &bits, n)
        } else {
            host_gemm::matmul_nt(&xs, m, k, &bf16::widen(&bits), n, None)
        };
        host_tensor(y, [m, n])
    }
}

/// A `U16` tensor's values (borrowed when contiguous, as a weight read in place from the
/// checkpoint's memory map is).
fn u16s(t: &NdArrayTensor) -> std::borrow::Cow<'_, [u16]> {
    if let NdArrayTensor::U16(s) = t {
        if let Some(v) = s.view().to_slice() {
            return std::borrow::Cow::Borrowed(v);
        }
    }
    let data = Tensor::<Cpu, 1, Int>::from_primitive(t.clone())
        .into_data()
        .convert::<i64>();
    std::borrow::Cow::Owned(data.iter::<i64>().map(|v| v as u16).collect())
}

/// bf16 weights on the host: widened exactly (bf16 is the top half of an f32), a row at a
/// time into the dot products (decode) or whole for a GEMM (prefill), so the results equal
/// the f32 path's on the widened weight bit for bit.
mod bf16 {
    use rayon::prelude::*;

    use super::host_gemm::{self, dot};

    #[inline]
    pub(super) fn widen_into(bits: &[u16], out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(bits) {
            *o = f32::from_bits(u32::from(b) << 16);
        }
    }

    /// The whole weight as f32, row-major.
    pub(super) fn widen(bits: &[u16]) -> Vec<f32> {
        let mut out = vec![0f32; bits.len()];
        out.par_chunks_mut(1 << 16)
            .zip(bits.par_chunks(1 << 16))
            .for_each(|(o, b)| widen_into(b, o));
        out
    }

    /// `x · Wᵀ` for `x` `[m, k]` (`m ≤ GEMV_MAX_ROWS`) and `W` `[n, k]` in bf16.
    pub(super) fn gemv(x: &[f32], m: usize, k: usize, bits: &[u16], n: usize) -> Vec<f32> {
        thread_local! {
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        debug_assert_eq!(bits.len(), n * k);
        host_gemm::gemv_rows(m, n, |o, dots| {
            ROW.with_borrow_mut(|row| {
                row.resize(k, 0.0);
                widen_into(&bits[o * k..(o + 1) * k], row);
                for (r, d) in dots.iter_mut().enumerate() {
                    *d = dot(&x[r * k..(r + 1) * k], row);
                }
            });
        })
    }
}

fn dims2(t: &FloatTensor<Cpu>) -> [usize; 2] {
    let s = t.shape();
    [s[0], s[1]]
}

/// A row-major f32 result as a backend tensor.
fn host_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FloatTensor<Cpu> {
    Tensor::<Cpu, D>::from_data(TensorData::new(values, shape), &NdArrayDevice::Cpu)
        .into_primitive()
        .tensor()
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
    /// The 16 code values (the AVX-512 path looks them up in a register).
    code: [f32; 16],
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
        let mut code16 = [0f32; 16];
        for (c, v) in code16.iter_mut().zip(code.iter()) {
            *c = *v;
        }
        Self {
            packed,
            absmax,
            pairs,
            code: code16,
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

    /// Row `o`'s packed bytes and block scales, for rows that start on a block boundary
    /// (`in_features` a multiple of the block size).
    #[cfg(target_arch = "x86_64")]
    fn row_parts(&self, o: usize) -> (&[u8], &[f32]) {
        let (inn, bs) = (self.in_features, self.blocksize);
        let e = o * inn;
        (
            &self.packed[e / 2..(e + inn) / 2],
            &self.absmax[e / bs..(e + inn) / bs],
        )
    }

    /// The whole dequantized weight, `[out_features, in_features]` row-major.
    fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_features * self.in_features];
        if self.in_features == 0 {
            return w;
        }
        #[cfg(target_arch = "x86_64")]
        if avx512::usable(self.in_features, self.blocksize) {
            w.par_chunks_mut(self.in_features)
                .enumerate()
                .for_each(|(o, row)| {
                    let (bytes, scales) = self.row_parts(o);
                    // SAFETY: `usable` detected AVX-512F; the row holds inn = 2·bytes values.
                    unsafe { avx512::decode_row(bytes, scales, &self.code, self.blocksize, row) }
                });
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
        let inn = self.in_features;
        #[cfg(target_arch = "x86_64")]
        if avx512::usable(inn, self.blocksize) {
            return host_gemm::gemv_rows(m, self.out_features, |o, dots| {
                let (bytes, scales) = self.row_parts(o);
                // SAFETY: `usable` detected AVX-512F; `row_parts` gives the row's inn/2
                // bytes and inn/blocksize scales, and `x` holds m rows of inn.
                unsafe { avx512::row_dots(bytes, scales, &self.code, self.blocksize, x, dots) }
            });
        }
        thread_local! {
            static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        host_gemm::gemv_rows(m, self.out_features, |o, dots| {
            ROW.with_borrow_mut(|row| {
                row.resize(inn, 0.0);
                self.dequant_row(o, row);
                for (r, d) in dots.iter_mut().enumerate() {
                    *d = dot(&x[r * inn..(r + 1) * inn], row);
                }
            });
        })
    }

    /// `y = x · Wᵀ`: `x` `[m, in_features]` → `[m, out_features]`, in `x`'s dtype.
    fn matmul(&self, x: Tensor<Cpu, 2>) -> Tensor<Cpu, 2> {
        let [m, _] = x.dims();
        let (out, inn) = (self.out_features, self.in_features);
        if x.dtype() != DType::F32 {
            let w = Tensor::<Cpu, 2>::from_data(
                TensorData::new(self.dequantize(), [out, inn]),
                &x.device(),
            );
            return x.clone().matmul(w.cast(x.dtype()).transpose());
        }
        let x = x.into_primitive().tensor();
        let xs = f32s(&x);
        let y = if m <= GEMV_MAX_ROWS {
            self.gemv(&xs, m)
        } else {
            host_gemm::matmul_nt(&xs, m, inn, &self.dequantize(), out, None)
        };
        Tensor::from_primitive(TensorPrimitive::Float(host_tensor(y, [m, out])))
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

/// NF4 dot products with AVX-512: 16 codes at a time become floats with one in-register
/// table lookup (`vpermps` over the 16-entry code book), scaled, and multiplied into every
/// input row's accumulator, so the packed row is read once and never written out. About
/// 3x the scalar decode (issue 17: NF4 decode is bound by decoding, not by memory).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::GEMV_MAX_ROWS;

    /// Whether the CPU has AVX-512F and the rows split into whole 16-element groups inside
    /// whole blocks (true of every real model: widths and block sizes are multiples of 64).
    pub(super) fn usable(in_features: usize, blocksize: usize) -> bool {
        in_features.is_multiple_of(blocksize)
            && blocksize.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx512f")
    }

    /// Eight packed bytes → their 16 codes' values times `scale` (element order).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn decode16(bytes: *const u8, table: __m512, scale: f32) -> __m512 {
        // SAFETY: the caller passes 8 readable bytes.
        let b = unsafe { _mm_loadl_epi64(bytes as *const __m128i) };
        let nibble = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
        let lo = _mm_and_si128(b, nibble);
        // [hi0, lo0, hi1, lo1, ...]: element order within the row.
        let idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(scale))
    }

    /// One weight row (`2·bytes.len()` values) decoded into `row`, for the prefill GEMM.
    ///
    /// # Safety
    /// As [`row_dots`]; `row.len() = 2·bytes.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_row(
        bytes: &[u8],
        scales: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        row: &mut [f32],
    ) {
        let inn = bytes.len() * 2;
        debug_assert!(row.len() == inn && scales.len() * blocksize == inn);
        // SAFETY: group g reads bytes 8g..8g+8 < inn/2 and writes row[16g..16g+16] ≤ inn.
        unsafe {
            let table = _mm512_loadu_ps(code.as_ptr());
            for g in 0..inn / 16 {
                let scale = *scales.get_unchecked(16 * g / blocksize);
                let w = decode16(bytes.as_ptr().add(8 * g), table, scale);
                _mm512_storeu_ps(row.as_mut_ptr().add(16 * g), w);
            }
        }
    }

    /// `dots[r] = Σ_e x[r·inn + e] · code[c_e] · scale[e / blocksize]` for one weight row of
    /// `inn = 2·bytes.len()` elements (high nibble first).
    ///
    /// # Safety
    /// AVX-512F must be available; `scales.len() = inn / blocksize`, `blocksize % 16 = 0`,
    /// `x.len() ≥ dots.len() · inn` and `dots.len() ≤ GEMV_MAX_ROWS`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_dots(
        bytes: &[u8],
        scales: &[f32],
        code: &[f32; 16],
        blocksize: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let inn = bytes.len() * 2;
        let m = dots.len();
        debug_assert!(m <= GEMV_MAX_ROWS && x.len() >= m * inn && scales.len() * blocksize == inn);
        // SAFETY (all loads below): group g covers elements 16g..16g+16 < inn, bytes 8g..8g+8
        // < inn/2, and x[r·inn + 16g..+16] with r < m; the caller guarantees those lengths.
        unsafe {
            let table = _mm512_loadu_ps(code.as_ptr());
            let mut acc = [_mm512_setzero_ps(); GEMV_MAX_ROWS];
            for g in 0..inn / 16 {
                let scale = *scales.get_unchecked(16 * g / blocksize);
                let w = decode16(bytes.as_ptr().add(8 * g), table, scale);
                for (r, a) in acc.iter_mut().enumerate().take(m) {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(r * inn + 16 * g));
                    *a = _mm512_fmadd_ps(xv, w, *a);
                }
            }
            for (d, a) in dots.iter_mut().zip(acc) {
                *d = _mm512_reduce_add_ps(a);
            }
        }
    }
}
