//! The seam's contract: on every backend, each kernel equals the host reference
//! (bitsandbytes' dequantization order) on awkward shapes: 1, 8 and 9 rows, rows that
//! straddle bytes and quantization blocks, column counts that are not a multiple of 64.

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::DType;

use super::*;
use crate::quant::Nf4Tensor;
use crate::test_util::{assert_close, wgpu_available};

/// `(out, in, blocksize)`: odd rows start mid-byte (13×11), rows cross blocks (5×130), a
/// tail block (7×9 at 128), one row, nine rows of 70; rows of whole blocks (3×64, 6×128 at
/// 32, 2×192), the layout of real models, which the CPU's AVX-512 path takes. Rows of whole
/// words take the GPU's decode GEMV: 72 (blocks straddle rows) and 2,056 (each unit of its
/// cube strides over several words).
const SHAPES: [(usize, usize, usize); 10] = [
    (4, 72, 64),
    (3, 2056, 64),
    (13, 11, 64),
    (5, 130, 64),
    (3, 64, 64),
    (7, 9, 128),
    (1, 200, 64),
    (9, 70, 64),
    (6, 128, 32),
    (2, 192, 64),
];

/// Input rows: decode (1, 3, 8: the GEMV paths) and prefill (9, 13).
const ROWS: [usize; 5] = [1, 3, 8, 9, 13];

/// f32 dot products of up to 2,056 terms summed in another order than the f64 reference.
const ATOL: f32 = 2e-4;

/// A quantized weight and its bitsandbytes-order dequantization.
fn weight(out: usize, inn: usize, blocksize: usize) -> (Nf4Tensor, Vec<f32>) {
    let values: Vec<f32> = (0..out * inn)
        .map(|i| (((i * 7919) % 211) as f32 - 105.0) / 50.0)
        .collect();
    let w = Nf4Tensor::quantize("w", &values, &[out, inn], "float32", blocksize, true).unwrap();
    let deq = w.dequantize();
    (w, deq)
}

fn upload<B: Kernels>(w: &Nf4Tensor, device: &B::Device) -> Nf4Weight<B> {
    nf4_upload::<B>(
        &w.packed,
        &w.absmax_f32(),
        &w.quant_map,
        [w.shape[0], w.shape[1]],
        w.blocksize,
        device,
    )
}

fn inputs(m: usize, inn: usize) -> Vec<f32> {
    (0..m * inn)
        .map(|i| ((i % 17) as f32 - 8.0) / 9.0)
        .collect()
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

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Dequantization is exact in f32 and the matmul equals `x · Wᵀ`, on backend `B`.
fn check_backend<B: Kernels>(label: &str, device: &B::Device) {
    for (out, inn, bs) in SHAPES {
        let (w, want) = weight(out, inn, bs);
        let nf4 = upload::<B>(&w, device);
        let got = values(nf4_dequantize(&nf4, DType::F32));
        assert_eq!(got, want, "{label}: dequantize {out}x{inn} blocksize {bs}");
        for m in ROWS {
            let x = inputs(m, inn);
            let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, inn]), device);
            let y = values(nf4_matmul(xt, &nf4));
            let label = format!("{label}: matmul {out}x{inn}, {m} rows");
            assert_close(&label, &y, &reference(&x, &want, m, inn, out), ATOL);
        }
    }
}

/// On the autodiff backend over `B`: `d(Σ y ⊙ dy)/dx = dy · W`, and the forward is the
/// inner kernel's.
fn check_backward<B: AutodiffKernels>(label: &str, device: &B::Device) {
    let (out, inn, m) = (6, 70, 4);
    let (w, deq) = weight(out, inn, 64);
    let nf4 = upload::<B>(&w, device);
    let x: Vec<f32> = (0..m * inn).map(|i| ((i % 5) as f32 - 2.0) / 3.0).collect();
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, inn]), device).require_grad();
    let dy: Vec<f32> = (0..m * out).map(|i| (i % 7) as f32 - 3.0).collect();
    let dyt = Tensor::<B, 2>::from_data(TensorData::new(dy.clone(), [m, out]), device);
    let y = nf4_matmul(xt.clone(), &nf4);
    assert_close(
        &format!("{label}: forward"),
        &values(y.clone()),
        &reference(&x, &deq, m, inn, out),
        ATOL,
    );
    let grads = (y * dyt).sum().backward();
    let got = values(xt.grad(&grads).expect("x has a gradient"));
    let mut want = vec![0f32; m * inn];
    for r in 0..m {
        for i in 0..inn {
            want[r * inn + i] = (0..out).map(|o| dy[r * out + o] * deq[o * inn + i]).sum();
        }
    }
    assert_close(&format!("{label}: dx"), &got, &want, ATOL);
}

#[test]
fn the_cpu_kernel_matches_bitsandbytes_and_x_times_w_transposed() {
    check_backend::<NdArray<f32>>("ndarray f32 (host kernel)", &Default::default());
}

/// `NdArray<f64>` shares its device (`NdArrayDevice::Cpu`) and so burn's per-device default
/// dtypes with the f32 backend that every other test uses; whichever backend touches the
/// device first fixes them for the whole test process. Pinning the f32 defaults first keeps
/// a test of the f64 backend from turning every later CPU tensor into f64.
fn pin_cpu_defaults() {
    burn::tensor::get_device_settings::<NdArray<f32>>(&Default::default());
}

#[test]
fn a_backend_without_a_kernel_is_correct_through_the_default_bodies() {
    pin_cpu_defaults();
    assert_eq!(<NdArray<f64> as Kernels>::nf4_layout(), PackedLayout::Words);
    check_backend::<NdArray<f64>>("ndarray f64 (default bodies)", &Default::default());
}

#[test]
fn the_autodiff_op_gives_the_input_gradient_on_the_cpu() {
    pin_cpu_defaults();
    check_backward::<Autodiff<NdArray<f32>>>("autodiff ndarray f32", &Default::default());
    check_backward::<Autodiff<NdArray<f64>>>("autodiff ndarray f64", &Default::default());
}

#[test]
fn the_cpu_kernel_stores_bytes_and_the_gpu_kernels_words() {
    assert_eq!(<NdArray<f32> as Kernels>::nf4_layout(), PackedLayout::Bytes);
    assert_eq!(
        <Autodiff<NdArray<f32>> as Kernels>::nf4_layout(),
        PackedLayout::Bytes
    );
    assert_eq!(
        <crate::device::dispatch::WgpuBackend as Kernels>::nf4_layout(),
        PackedLayout::Words
    );
}

mod wgpu {
    use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
    use burn::backend::Wgpu;
    use burn_cubecl::CubeBackend;

    use super::*;

    /// The CubeCL kernel alone (no fusion).
    type Cube = CubeBackend<WgpuRuntime, f32, i32, u32>;

    #[test]
    fn the_cubecl_kernel_matches_the_cpu_on_wgpu() {
        if wgpu_available("the_cubecl_kernel_matches_the_cpu_on_wgpu") {
            check_backend::<Cube>("wgpu cube f32", &WgpuDevice::DefaultDevice);
        }
    }

    #[test]
    fn the_fusion_custom_op_matches_the_cpu_on_wgpu() {
        if wgpu_available("the_fusion_custom_op_matches_the_cpu_on_wgpu") {
            check_backend::<Wgpu>("wgpu fusion f32", &WgpuDevice::DefaultDevice);
        }
    }

    #[test]
    fn the_autodiff_op_gives_the_input_gradient_on_wgpu() {
        if wgpu_available("the_autodiff_op_gives_the_input_gradient_on_wgpu") {
            check_backward::<Autodiff<Wgpu>>("autodiff wgpu", &WgpuDevice::DefaultDevice);
        }
    }

    /// RMSNorm through the seam on the CubeCL backend (its kernel at any row count) and the
    /// fusion backend (its custom op up to 64 rows, burn's fused ops beyond), in f32 and
    /// f16, against the generic tensor-op formula on the same device and dtype: widths that
    /// are not a multiple of the cube, one column, a 7B row.
    #[test]
    fn rms_norm_on_wgpu_equals_the_tensor_op_formula_in_f32_and_f16() {
        if !wgpu_available("rms_norm_on_wgpu_equals_the_tensor_op_formula_in_f32_and_f16") {
            return;
        }
        fn check<B: Kernels>(label: &str, device: &B::Device) {
            for (rows, width) in [(1, 1), (3, 7), (8, 130), (64, 896), (65, 96), (2, 3584)] {
                // f16: the sums' order may move a value by one unit of f16's last place
                // (2⁻⁸ at 4) before and after the weight multiplies.
                for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 8e-3)] {
                    let data: Vec<f32> = (0..rows * width)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                        .collect();
                    let w: Vec<f32> = (0..width).map(|i| 0.5 + (i % 13) as f32 / 8.0).collect();
                    let x = Tensor::<B, 2>::from_data(TensorData::new(data, [rows, width]), device)
                        .cast(dtype);
                    let w =
                        Tensor::<B, 1>::from_data(TensorData::new(w, [width]), device).cast(dtype);
                    let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
                    let got =
                        B::rms_norm(prim(x.clone()), w.clone().into_primitive().tensor(), 1e-6);
                    let want = crate::kernels::generic::rms_norm::<B>(
                        prim(x),
                        w.into_primitive().tensor(),
                        1e-6,
                    );
                    let float = |t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
                    let (got, want) = (float(got), float(want));
                    assert_eq!(got.dtype(), dtype, "{label} {rows}x{width}");
                    assert_close(
                        &format!("{label} rms_norm {dtype:?} {rows}x{width}"),
                        &values(got),
                        &values(want),
                        tol,
                    );
                }
            }
        }
        check::<Cube>("wgpu cube", &WgpuDevice::DefaultDevice);
        check::<Wgpu>("wgpu fusion", &WgpuDevice::DefaultDevice);
    }

    /// The rotary embedding through the seam on the CubeCL backend (its kernel) and the
    /// fusion backend (its custom op for decode steps, burn's ops beyond 64 rows), and
    /// `silu(gate) · up` on the CubeCL backend, in f32 and f16, against the tensor-op
    /// formulas: head counts 1, 2 and 7, head dims 64, 80, 128 and an odd 5, batch 1–2.
    #[test]
    fn rotary_and_silu_mul_on_wgpu_equal_the_tensor_op_formulas_in_f32_and_f16() {
        if !wgpu_available(
            "rotary_and_silu_mul_on_wgpu_equal_the_tensor_op_formulas_in_f32_and_f16",
        ) {
            return;
        }
        fn check<B: Kernels>(label: &str, device: &B::Device) {
            let tensor = |shape: [usize; 4], salt: usize, dtype| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|i| (((i + salt) * 37 % 101) as f32 - 50.0) / 23.0)
                    .collect();
                Tensor::<B, 4>::from_data(TensorData::new(v, shape), device).cast(dtype)
            };
            let float = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
            let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 8e-3)] {
                for [b, h, s, d] in [[1, 1, 1, 64], [2, 7, 1, 128], [1, 2, 3, 80], [2, 2, 40, 5]] {
                    let x = tensor([b, h, s, d], 0, dtype);
                    let (cos, sin) = (
                        tensor([b, 1, s, d], 5, dtype),
                        tensor([b, 1, s, d], 9, dtype),
                    );
                    let got = float(B::rotary(prim(&x), prim(&cos), prim(&sin)));
                    let want = float(generic::rotary::<B>(prim(&x), prim(&cos), prim(&sin)));
                    assert_eq!(got.dtype(), dtype);
                    let what = format!("{label} rotary {dtype:?} {:?}", [b, h, s, d]);
                    assert_close(&what, &values(got), &values(want), tol);
                }
                let (gate, up) = (
                    tensor([2, 3, 5, 67], 1, dtype),
                    tensor([2, 3, 5, 67], 2, dtype),
                );
                let got = float(B::silu_mul(prim(&gate), prim(&up)));
                let want = float(generic::silu_mul::<B>(prim(&gate), prim(&up)));
                let what = format!("{label} silu_mul {dtype:?}");
                assert_close(&what, &values(got), &values(want), tol);
            }
        }
        check::<Cube>("wgpu cube", &WgpuDevice::DefaultDevice);
        check::<Wgpu>("wgpu fusion", &WgpuDevice::DefaultDevice);
    }

    /// Attention of a decode step through the seam: flash-decoding on the CubeCL backend and
    /// as the fusion backend's custom op, in f32 and f16, against an f64 softmax on the
    /// host. Shapes: GQA groups of 1, 2 and 7 query heads (and 2 positions × 7), head dims
    /// 5, 64, 80 and 128, cache lengths 1, 64, 65 and 1,100 (one split and many, splits of
    /// one chunk and of several), batch × kv heads 1 to 32, keys and values read as views of a longer cache, with and without a
    /// mask hiding scattered positions.
    #[test]
    fn decode_attention_on_wgpu_equals_an_f64_softmax_in_f32_and_f16() {
        if !wgpu_available("decode_attention_on_wgpu_equals_an_f64_softmax_in_f32_and_f16") {
            return;
        }
        /// softmax(q·kᵀ/√d, hidden → excluded)·v per row, in f64.
        fn reference(
            [b, h, rows, d, t]: [usize; 5],
            q: &[f32],
            k: &[f32],
            v: &[f32],
            hidden: &dyn Fn(usize) -> bool,
        ) -> Vec<f32> {
            let mut out = Vec::with_capacity(b * h * rows * d);
            for bh in 0..b * h {
                for r in 0..rows {
                    let qr = &q[(bh * rows + r) * d..][..d];
                    let scores: Vec<Option<f64>> = (0..t)
                        .map(|p| {
                            let kp = &k[(bh * t + p) * d..][..d];
                            let dot: f64 =
                                qr.iter().zip(kp).map(|(a, b)| *a as f64 * *b as f64).sum();
                            (!hidden(((bh * rows) + r) * t + p)).then(|| dot / (d as f64).sqrt())
                        })
                        .collect();
                    let top = scores.iter().flatten().fold(f64::MIN, |a, &b| a.max(b));
                    let w: Vec<f64> = scores
                        .iter()
                        .map(|s| s.map_or(0.0, |s| (s - top).exp()))
                        .collect();
                    let total: f64 = w.iter().sum();
                    for j in 0..d {
                        let o: f64 = (0..t).map(|p| w[p] * v[(bh * t + p) * d + j] as f64).sum();
                        out.push((o / total) as f32);
                    }
                }
            }
            out
        }
        fn check<B: Kernels>(label: &str, device: &B::Device) -> usize {
            let mut ran = 0;
            // [batch, kv heads, rows (group × positions), head dim, cache length]
            let shapes = [
                [1, 1, 1, 64, 1],
                [1, 2, 2, 128, 65],
                [2, 2, 7, 80, 64],
                [1, 4, 7, 128, 1100],
                [8, 1, 14, 64, 300],
                [2, 3, 16, 5, 130],
                // 32 cubes of batch × heads: splits of several chunks each.
                [4, 8, 2, 64, 1100],
            ];
            for (dtype, tol) in [(DType::F32, 2e-5), (DType::F16, 8e-3)] {
                for [b, h, rows, d, t] in shapes {
                    let values_of = |n: usize, salt: usize| -> Vec<f32> {
                        (0..n)
                            .map(|i| (((i * 7 + salt) * 37 % 101) as f32 - 50.0) / 40.0)
                            .collect()
                    };
                    let q = Tensor::<B, 4>::from_data(
                        TensorData::new(values_of(b * h * rows * d, 1), [b, h, rows, d]),
                        device,
                    )
                    .cast(dtype);
                    // The cache holds 3 more positions than are filled, as generate's does.
                    let cache = |salt| {
                        Tensor::<B, 4>::from_data(
                            TensorData::new(values_of(b * h * (t + 3) * d, salt), [b, h, t + 3, d]),
                            device,
                        )
                        .cast(dtype)
                        .narrow(2, 0, t)
                    };
                    let (k, v) = (cache(2), cache(3));
                    for masked in [false, true] {
                        // Every 5th position hidden, never a row's last (always visible).
                        let hidden = |i: usize| masked && i % 5 == 2 && i % t != t - 1;
                        let mask = masked.then(|| {
                            let bits: Vec<bool> = (0..b * h * rows * t).map(hidden).collect();
                            Tensor::<B, 4, Bool>::from_data(
                                TensorData::new(bits, [b, h, rows, t]),
                                device,
                            )
                        });
                        assert!(cube::decode_attention_fits(
                            (&q.shape(), dtype),
                            (&k.shape(), dtype),
                            (&v.shape(), dtype),
                            mask.as_ref().map(|m| m.shape()).as_ref(),
                        ));
                        let got = crate::kernels::sdpa(q.clone(), k.clone(), v.clone(), mask);
                        assert_eq!(got.dtype(), dtype);
                        let want = reference(
                            [b, h, rows, d, t],
                            &values(q.clone()),
                            &values(k.clone()),
                            &values(v.clone()),
                            &hidden,
                        );
                        let what =
                            format!("{label} {dtype:?} {:?} mask {masked}", [b, h, rows, d, t]);
                        assert_close(&what, &values(got), &want, tol);
                        ran += 1;
                    }
                }
            }
            ran
        }
        assert_eq!(check::<Cube>("wgpu cube", &WgpuDevice::DefaultDevice), 28);
        assert_eq!(check::<Wgpu>("wgpu fusion", &WgpuDevice::DefaultDevice), 28);
        // Prefill (17 rows) and mismatched dtypes take burn's attention.
        let s = |d: [usize; 4]| Shape::new(d);
        let (q17, kv) = (s([1, 1, 17, 64]), s([1, 1, 20, 64]));
        assert!(!cube::decode_attention_fits(
            (&q17, DType::F32),
            (&kv, DType::F32),
            (&kv, DType::F32),
            None
        ));
        let q1 = s([1, 1, 1, 64]);
        assert!(!cube::decode_attention_fits(
            (&q1, DType::F16),
            (&kv, DType::F32),
            (&kv, DType::F32),
            None
        ));
    }

    /// The decode GEMV itself, called directly (not through the seam's routing), on every
    /// shape and row count it takes: at least one of each kind runs.
    #[test]
    fn the_fused_gemv_equals_x_times_w_transposed_on_every_shape_it_takes() {
        if !wgpu_available("the_fused_gemv_equals_x_times_w_transposed_on_every_shape_it_takes") {
            return;
        }
        let device = WgpuDevice::DefaultDevice;
        let mut ran = 0;
        for (out, inn, bs) in SHAPES {
            let (w, want) = weight(out, inn, bs);
            let nf4 = upload::<Cube>(&w, &device);
            for m in ROWS
                .into_iter()
                .filter(|&m| cube::gemv_fits(m, [out, inn], bs))
            {
                let x = inputs(m, inn);
                let xt =
                    Tensor::<Cube, 2>::from_data(TensorData::new(x.clone(), [m, inn]), &device);
                let y = cube::nf4_gemv::<WgpuRuntime>(
                    xt.into_primitive().tensor(),
                    nf4.packed.clone(),
                    nf4.absmax.clone(),
                    nf4.code.clone(),
                    [out, inn],
                    bs,
                );
                let y = Tensor::<Cube, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
                let label = format!("gemv {out}x{inn} blocksize {bs}, {m} rows");
                assert_close(&label, &values(y), &reference(&x, &want, m, inn, out), ATOL);
                ran += 1;
            }
        }
        assert_eq!(ran, 18, "6 shapes take the GEMV, at 1, 3 and 8 rows");
        assert!(!cube::gemv_fits(9, [4, 72], 64) && !cube::gemv_fits(1, [5, 130], 64));
    }

    /// The dense decode GEMV through the seam, on the cube backend and through fusion, in
    /// f32 and f16, with and without a bias: rows 1, 3 and 8 take it, 9 the tiled matmul.
    #[test]
    fn the_dense_gemv_equals_x_times_w_transposed_plus_bias_in_f32_and_f16() {
        if !wgpu_available("the_dense_gemv_equals_x_times_w_transposed_plus_bias_in_f32_and_f16") {
            return;
        }
        fn run<B: Kernels>(
            device: &B::Device,
            (out, inn, m): (usize, usize, usize),
            bias: bool,
            dtype: DType,
        ) -> (Vec<f32>, Vec<f32>) {
            let w: Vec<f32> = (0..out * inn)
                .map(|i| (((i * 7919) % 211) as f32 - 105.0) / 400.0)
                .collect();
            let b: Vec<f32> = (0..out).map(|i| i as f32 / 10.0 - 1.0).collect();
            let x = inputs(m, inn);
            let t = |v: &[f32], shape: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), shape), device).cast(dtype)
            };
            let y = linear(
                t(&x, [m, inn]),
                t(&w, [out, inn]),
                bias.then(|| t(&b, [1, out]).reshape([out])),
            );
            assert_eq!(y.dtype(), dtype);
            let mut want = reference(&x, &w, m, inn, out);
            if bias {
                for (i, v) in want.iter_mut().enumerate() {
                    *v += b[i % out];
                }
            }
            (values(y), want)
        }
        let device = WgpuDevice::DefaultDevice;
        for shape in [(5, 37, 1), (300, 1030, 3), (3, 64, 8), (7, 40, 9)] {
            for bias in [false, true] {
                for (dtype, tol) in [(DType::F32, ATOL), (DType::F16, 2e-2)] {
                    let label = format!("{shape:?} bias {bias} {dtype:?}");
                    let (got, want) = run::<Cube>(&device, shape, bias, dtype);
                    assert_close(&format!("cube {label}"), &got, &want, tol);
                    let (got, want) = run::<Wgpu>(&device, shape, bias, dtype);
                    assert_close(&format!("fusion {label}"), &got, &want, tol);
                }
            }
        }
    }

    /// f16 output: each element is the f32 value rounded to f16 (the kernel computes the
    /// product in f32 and casts once), so the match is exact.
    #[test]
    fn the_kernel_dequantizes_to_f16_exactly_as_f32_rounded() {
        if !wgpu_available("the_kernel_dequantizes_to_f16_exactly_as_f32_rounded") {
            return;
        }
        let device = WgpuDevice::DefaultDevice;
        for (out, inn, bs) in SHAPES {
            let (w, want) = weight(out, inn, bs);
            for label in ["cube", "fusion"] {
                let got = match label {
                    "cube" => {
                        let t = nf4_dequantize(&upload::<Cube>(&w, &device), DType::F16);
                        assert_eq!(t.dtype(), DType::F16);
                        values(t)
                    }
                    _ => values(nf4_dequantize(&upload::<Wgpu>(&w, &device), DType::F16)),
                };
                let want: Vec<f32> = want
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect();
                assert_eq!(got, want, "{label} f16 {out}x{inn} blocksize {bs}");
            }
        }
    }

    /// An f16 matmul lands within f16 rounding of the f32 reference.
    #[test]
    fn an_f16_matmul_stays_within_half_precision_of_f32() {
        if !wgpu_available("an_f16_matmul_stays_within_half_precision_of_f32") {
            return;
        }
        let device = WgpuDevice::DefaultDevice;
        // 70 columns: dequantize + matmul; 72: the decode GEMV for up to 8 rows.
        for (out, inn, m) in ROWS.iter().flat_map(|&m| [(9, 70, m), (9, 72, m)]) {
            let (w, deq) = weight(out, inn, 64);
            let nf4 = upload::<Wgpu>(&w, &device);
            let x = inputs(m, inn);
            let xt = Tensor::<Wgpu, 2>::from_data(TensorData::new(x.clone(), [m, inn]), &device)
                .cast(DType::F16);
            let y = nf4_matmul(xt, &nf4);
            assert_eq!(y.dtype(), DType::F16);
            let want = reference(&x, &deq, m, inn, out);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            // 70 products in f16: a few units of the last place (2⁻¹⁰) of the largest value.
            assert_close(
                &format!("f16 matmul, {m} rows of {inn}"),
                &values(y),
                &want,
                scale * 8e-3,
            );
        }
    }
}
