//! The CPU backend's dense, attention and activation kernels equal burn's own ops (the
//! seam's generic bodies) on the layouts the model hands them: strided views, a narrowed KV
//! cache, broadcast masks, weights borrowed from a memory map.

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{AllocationProperty, Bytes};

use super::{linear, sdpa, silu_mul};
use crate::test_util::assert_close;

type Cpu = NdArray<f32>;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 211) as f32 - 105.0) / 70.0)
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: usize) -> Tensor<Cpu, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), shape), &Default::default())
}

fn floats<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn dense_linear_equals_x_times_w_transposed_plus_bias_for_decode_and_prefill_rows() {
    let (d_in, d_out) = (33, 70);
    // The weight as the loader hands it over: bytes borrowed from a (here: in-memory) file.
    let w_bytes: Vec<u8> = values(d_out * d_in, 2)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let shared = Bytes::from_shared(bytes::Bytes::from(w_bytes), AllocationProperty::File);
    let w = Tensor::<Cpu, 2>::from_data(
        TensorData::from_bytes(shared, [d_out, d_in], burn::tensor::DType::F32),
        &Default::default(),
    );
    let b = tensor([d_out], 3);
    for m in [1, 2, 8, 9, 40] {
        let x = tensor([m, d_in], m);
        let want = x.clone().matmul(w.clone().transpose()) + b.clone().unsqueeze();
        let got = linear(x.clone(), w.clone(), Some(b.clone()));
        assert_close(
            &format!("{m} rows + bias"),
            &floats(got),
            &floats(want),
            1e-4,
        );
        let want = x.clone().matmul(w.clone().transpose());
        let got = linear(x, w.clone(), None);
        assert_close(&format!("{m} rows"), &floats(got), &floats(want), 1e-4);
    }
}

/// burn's attention on the same operands (the generic body).
fn reference(
    q: Tensor<Cpu, 4>,
    k: Tensor<Cpu, 4>,
    v: Tensor<Cpu, 4>,
    mask: Option<Tensor<Cpu, 4, Bool>>,
) -> Vec<f32> {
    floats(attention(
        q,
        k,
        v,
        mask,
        None,
        AttentionModuleOptions::default(),
    ))
}

#[test]
fn attention_equals_burns_on_swapped_queries_a_narrowed_cache_and_a_broadcast_mask() {
    let (b, h, d, cap) = (2, 3, 16, 24);
    // Keys and values: the first `t` positions of a preallocated cache, as KvCache hands them.
    let cache_k = tensor([b, h, cap, d], 10);
    let cache_v = tensor([b, h, cap, d], 11);
    // Up to 8 query rows: one task per row (decode); more: two GEMMs per head (prefill).
    for (s, t) in [(5, 7), (1, 12), (1, 1), (7, 7), (9, 9), (13, 20), (24, 24)] {
        let k = cache_k.clone().narrow(2, 0, t);
        let v = cache_v.clone().narrow(2, 0, t);
        // Queries laid out [b, s, h, d] and swapped, as the decoder does.
        let q = tensor([b, s, h, d], s).swap_dims(1, 2);
        // Causal over the last `s` of `t` positions, one row per batch, broadcast over heads.
        let mut m = vec![false; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    m[(bi * s + i) * t + j] = j > t - s + i;
                }
            }
        }
        let mask = Tensor::<Cpu, 4, Bool>::from_bool(
            TensorData::new(m, [b, 1, s, t]),
            &Default::default(),
        )
        .expand([b, h, s, t]);
        let want = reference(q.clone(), k.clone(), v.clone(), Some(mask.clone()));
        let got = floats(sdpa(q.clone(), k.clone(), v.clone(), Some(mask)));
        assert_close(&format!("s={s} t={t} masked"), &got, &want, 1e-5);
        let want = reference(q.clone(), k.clone(), v.clone(), None);
        let got = floats(sdpa(q, k, v, None));
        assert_close(&format!("s={s} t={t}"), &got, &want, 1e-5);
    }
}

#[test]
fn a_query_row_with_every_key_hidden_attends_to_nothing() {
    // 2 query rows (the row path) and 10 (the GEMM path); the first row hides every key,
    // the others hide the middle one.
    for s in [2, 10] {
        let q = tensor([1, 1, s, 4], 1);
        let (k, v) = (tensor([1, 1, 3, 4], 2), tensor([1, 1, 3, 4], 3));
        let mut m = vec![true, true, true];
        for _ in 1..s {
            m.extend([false, true, false]);
        }
        let mask = Tensor::<Cpu, 4, Bool>::from_bool(
            TensorData::new(m, [1, 1, s, 3]),
            &Default::default(),
        );
        let got = floats(sdpa(q.clone(), k.clone(), v.clone(), Some(mask.clone())));
        assert_eq!(&got[..4], &[0.0; 4], "{s} rows: the first hides all keys");
        let want = reference(q, k, v, Some(mask));
        assert_close(
            &format!("{s} rows: the others"),
            &got[4..],
            &want[4..],
            1e-5,
        );
    }
}

#[test]
fn silu_mul_equals_silu_of_gate_times_up_even_where_exp_overflows() {
    let mut g = values(5000, 4);
    g.extend([-100.0, 100.0, -1e4, 0.0]);
    let n = g.len();
    let gate = Tensor::<Cpu, 2>::from_data(TensorData::new(g, [2, n / 2]), &Default::default());
    let up = tensor([2, n / 2], 5);
    let want = burn::tensor::activation::silu(gate.clone()) * up.clone();
    let got = silu_mul(gate, up);
    let (got, want) = (floats(got), floats(want));
    assert!(got.iter().all(|v| v.is_finite()));
    assert_close("silu·up", &got, &want, 1e-5);
}

#[test]
fn rms_norm_equals_the_reference_formula_on_rows_of_any_width() {
    for (rows, d) in [(1, 1), (3, 7), (5, 64), (2, 1000)] {
        let x = tensor([rows, d], d);
        let w = tensor([d], 7);
        let eps = 1e-6;
        let want =
            x.clone() / (x.clone().square().mean_dim(1) + eps).sqrt() * w.clone().unsqueeze();
        let got = super::rms_norm(x, w, eps);
        assert_close(&format!("{rows}x{d}"), &floats(got), &floats(want), 1e-5);
    }
}

/// A bf16 weight `[n, k]` as the loader hands it over (bits borrowed from a file), and the
/// same values widened to f32.
fn bf16_weight(n: usize, k: usize, seed: usize) -> (super::Bf16Weight<Cpu>, Tensor<Cpu, 2>) {
    let bits: Vec<u16> = values(n * k, seed)
        .iter()
        .map(|v| half::bf16::from_f32(*v * 1.37).to_bits())
        .collect();
    let widened: Vec<f32> = bits
        .iter()
        .map(|b| half::bf16::from_bits(*b).to_f32())
        .collect();
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let shared = Bytes::from_shared(bytes::Bytes::from(bytes), AllocationProperty::File);
    let t = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::from_bytes(shared, [n, k], burn::tensor::DType::U16),
        (&Default::default(), burn::tensor::DType::U16),
    );
    match t.clone().into_primitive() {
        burn::backend::ndarray::NdArrayTensor::U16(s) => assert!(s.is_borrowed()),
        _ => panic!("bf16 bits are not a U16 tensor"),
    }
    let w = super::Bf16Weight {
        bits: t.into_primitive(),
        shape: [n, k],
    };
    let dense = Tensor::from_data(TensorData::new(widened, [n, k]), &Default::default());
    (w, dense)
}

#[test]
fn bf16_weights_multiply_bit_for_bit_as_their_f32_widening_for_decode_and_prefill_rows() {
    let (k, n) = (67, 45);
    let (w, dense) = bf16_weight(n, k, 5);
    // Rows 1..=8 take the GEMV, more the GEMM: both must equal the dense f32 path exactly.
    for m in [1, 3, 8, 9, 40] {
        let x = tensor([m, k], m);
        let got = floats(super::bf16_matmul(x.clone(), &w));
        let want = floats(linear(x, dense.clone(), None));
        assert_eq!(got, want, "m = {m}");
    }
    assert_eq!(
        floats(super::bf16_widen(&w, burn::tensor::DType::F32)),
        floats(dense)
    );
}

#[test]
fn the_generic_bf16_bodies_equal_the_cpu_kernel() {
    type Generic = NdArray<f64>;
    let (k, n, m) = (20, 12, 5);
    let (w, _) = bf16_weight(n, k, 9);
    let bits = Tensor::<Cpu, 2, Int>::from_primitive(w.bits.clone()).into_data();
    let gw = super::Bf16Weight::<Generic> {
        bits: Tensor::<Generic, 2, Int>::from_data(bits, &Default::default()).into_primitive(),
        shape: [n, k],
    };
    let x = tensor([m, k], 3);
    let gx = Tensor::<Generic, 2>::from_data(x.clone().into_data(), &Default::default());
    let got: Vec<f32> = super::bf16_matmul(gx, &gw)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    assert_close(
        "generic bf16_matmul",
        &got,
        &floats(super::bf16_matmul(x, &w)),
        1e-5,
    );
}

#[test]
fn the_bf16_backward_gives_x_the_dense_gradient() {
    use burn::backend::Autodiff;
    type Train = Autodiff<Cpu>;
    let (k, n, m) = (24, 10, 12);
    let (w, dense) = bf16_weight(n, k, 4);
    let tw = super::Bf16Weight::<Train> {
        bits: w.bits.clone(),
        shape: w.shape,
    };
    let x0 = tensor([m, k], 8);
    let x = Tensor::<Train, 2>::from_inner(x0.clone()).require_grad();
    let y = super::bf16_matmul(x.clone(), &tw);
    let grads = (y.clone() * y).sum().backward();
    let got = floats(x.grad(&grads).unwrap());

    let xd = Tensor::<Train, 2>::from_inner(x0).require_grad();
    let yd = linear(xd.clone(), Tensor::<Train, 2>::from_inner(dense), None);
    let grads = (yd.clone() * yd).sum().backward();
    // The same product summed in another order (burn's matmul backward): f32 rounding only.
    assert_close("dx", &got, &floats(xd.grad(&grads).unwrap()), 1e-3);
}
