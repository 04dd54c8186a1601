//! Sampling the next token on the device: temperature, then top-k, then top-p (transformers'
//! warpers in that order), then a draw from what is left. Only the chosen ids come back to
//! the host; each row's draw takes one uniform number from its own generator, so a prompt
//! samples the same way alone or in a batch.
//!
//! No sort (burn sorts on the host): top-k keeps what reaches the k-th largest logit
//! (`topk`, ties kept, as `TopKLogitsWarper`); top-p keeps a token when the probability of
//! the tokens more likely than it is below `top_p` (as `TopPLogitsWarper`), which is every
//! logit above a threshold found by bisection; the draw inverts the cumulative sum of the
//! kept probabilities in vocabulary order (any order samples the same distribution).

use burn::prelude::*;
use burn::tensor::DType;

/// Bisection steps of the top-p threshold: it lands within (logit range) / 2^32 of the exact
/// one, below f32's spacing for a range under ~100 times the logits' magnitude. Each step is a
/// pass over the vocabulary (on lavapipe the 32 passes take most of a tiny model's step).
const TOP_P_STEPS: usize = 32;

/// One token id per row of `logits` `[batch, vocab]`, drawn with `uniforms[row]` in [0, 1)
/// from softmax(`logits / temperature`) restricted by `top_k` (0 = off) and `top_p`
/// (1 = off). `temperature` > 0 and `top_p` in (0, 1] are the caller's to check.
pub fn sample<B: Backend>(
    logits: Tensor<B, 2>,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    uniforms: &[f32],
) -> Tensor<B, 1, Int> {
    let [batch, vocab] = logits.dims();
    let device = logits.device();
    let z = logits.cast(DType::F32).div_scalar(temperature);
    let top = z.clone().max_dim(1); // [batch, 1]
    let wide = |t: Tensor<B, 2>| t.expand([batch, vocab]);
    let mut p = (z.clone() - wide(top.clone())).exp();
    if top_k > 0 && top_k < vocab {
        let kth = z.clone().topk(top_k, 1).narrow(1, top_k - 1, 1);
        p = p.mask_fill(z.clone().greater_equal(wide(kth)).bool_not(), 0.0);
    }
    if top_p < 1.0 {
        // S(x) = mass of the tokens above x, falling in x: lo keeps S(lo) >= top_p, hi
        // keeps S(hi) < top_p; the tokens kept are those above lo once the two meet.
        let mass = p.clone() / wide(p.clone().sum_dim(1));
        let mut lo = z.clone().min_dim(1).sub_scalar(1.0);
        let mut hi = top;
        for _ in 0..TOP_P_STEPS {
            let mid = (lo.clone() + hi.clone()).div_scalar(2.0);
            let above = mass
                .clone()
                .mask_fill(z.clone().lower_equal(wide(mid.clone())), 0.0)
                .sum_dim(1);
            let enough = above.greater_equal_elem(top_p);
            lo = lo.mask_where(enough.clone(), mid.clone());
            hi = mid.mask_where(enough, hi);
        }
        p = p.mask_fill(z.lower_equal(wide(lo)), 0.0);
    }
    // The first index whose cumulative mass exceeds u × total; rounding that lands u × total
    // on the total picks the last kept token.
    let cumulative = p.clone().cumsum(1);
    let total = cumulative.clone().narrow(1, vocab - 1, 1);
    let u = Tensor::<B, 2>::from_data(
        TensorData::new(uniforms.to_vec(), [batch, 1]),
        (&device, DType::F32),
    );
    let crossing = cumulative.lower_equal(wide(u * total)).int().sum_dim(1);
    let index = Tensor::<B, 1, Int>::arange(0..vocab as i64, &device)
        .reshape([1, vocab])
        .expand([batch, vocab]);
    let last_kept = p.greater_elem(0.0).int().mul(index).max_dim(1);
    crossing.min_pair(last_kept).reshape([batch])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    fn draw<B: Backend>(
        logits: &[f32],
        (t, k, p): (f32, usize, f32),
        u: f32,
        device: &B::Device,
    ) -> i64 {
        let n = logits.len();
        let l = Tensor::<B, 2>::from_data(TensorData::new(logits.to_vec(), [1, n]), device);
        sample(l, t, k, p, &[u])
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()[0]
    }

    /// Frequencies over a grid of 2,000 uniforms (one batch of identical rows): the draw
    /// inverts the kept distribution.
    fn frequencies<B: Backend>(
        logits: &[f32],
        (t, k, p): (f32, usize, f32),
        device: &B::Device,
    ) -> Vec<f64> {
        let (n, v) = (2000, logits.len());
        let rows = Tensor::<B, 2>::from_data(TensorData::new(logits.repeat(n), [n, v]), device);
        let u: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
        let ids = sample(rows, t, k, p, &u)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap();
        let mut f = vec![0.0; v];
        for id in ids {
            f[id as usize] += 1.0 / n as f64;
        }
        f
    }

    /// softmax(logits / t) over the kept tokens, renormalized.
    fn expected(logits: &[f32], t: f32, kept: &[usize]) -> Vec<f64> {
        let w: Vec<f64> = (0..logits.len())
            .map(|i| {
                if kept.contains(&i) {
                    (logits[i] as f64 / t as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    fn check<B: Backend>(device: &B::Device) {
        let logits = [0.1f32, 2.0, 1.9, -3.0, 0.5];
        // top-k 1 and a tiny top-p keep only the argmax, whatever the draw.
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(draw::<B>(&logits, (1.0, 1, 1.0), u, device), 1);
            assert_eq!(draw::<B>(&logits, (1.0, 0, 1e-3), u, device), 1);
        }
        let close = |got: Vec<f64>, want: Vec<f64>, what: &str| {
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 2e-3, "{what}: {got:?} vs {want:?}");
            }
        };
        // Plain softmax at temperature 5: every token, in proportion.
        close(
            frequencies::<B>(&logits, (5.0, 0, 1.0), device),
            expected(&logits, 5.0, &[0, 1, 2, 3, 4]),
            "all",
        );
        // top-k 2: the two best only.
        close(
            frequencies::<B>(&logits, (5.0, 2, 1.0), device),
            expected(&logits, 5.0, &[1, 2]),
            "top-k 2",
        );
        // top-p 0.8 at temperature 1: tokens 1, 2, 4, 0, 3 hold .44, .40, .10, .07, .003;
        // the mass above token 4 (.83) is not below .8, so it and the rest are dropped.
        close(
            frequencies::<B>(&logits, (1.0, 0, 0.8), device),
            expected(&logits, 1.0, &[1, 2]),
            "top-p .8",
        );
        // top-p 0.9: the mass above token 4 (.83) is below .9, so it stays; above token 0
        // (.93) is not.
        close(
            frequencies::<B>(&logits, (1.0, 0, 0.9), device),
            expected(&logits, 1.0, &[1, 2, 4]),
            "top-p .9",
        );
        // Ties at the k-th logit are kept, as transformers does.
        let tied = [1.0f32, 3.0, 1.0, 0.0];
        close(
            frequencies::<B>(&tied, (1.0, 2, 1.0), device),
            expected(&tied, 1.0, &[0, 1, 2]),
            "ties",
        );
        // Rows draw independently: each row's id is the one it gets alone.
        let two = Tensor::<B, 2>::from_data(
            TensorData::new([logits, [4.0, -1.0, 0.0, 0.0, 3.9]].concat(), [2, 5]),
            device,
        );
        let ids = sample(two, 1.0, 0, 1.0, &[0.7, 0.2])
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap();
        assert_eq!(ids[0], draw::<B>(&logits, (1.0, 0, 1.0), 0.7, device));
        assert_eq!(
            ids[1],
            draw::<B>(&[4.0, -1.0, 0.0, 0.0, 3.9], (1.0, 0, 1.0), 0.2, device)
        );
    }

    #[test]
    fn sampling_follows_temperature_top_k_and_top_p_on_the_cpu() {
        check::<TB>(&Default::default());
    }

    #[test]
    fn sampling_follows_temperature_top_k_and_top_p_on_wgpu() {
        if crate::test_util::wgpu_available("sampling_follows_temperature_top_k_and_top_p_on_wgpu")
        {
            check::<burn::backend::Wgpu>(&Default::default());
        }
    }
}
