//! Next-token cross-entropy on the answer only, as transformers' `ForCausalLMLoss`:
//! logits at position t predict label t+1; labels of -100 are ignored; the mean is over the
//! tokens that count (loss_utils.py `fixed_cross_entropy` with reduction "mean").

use crate::kernels::Kernels;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::DType;

/// Label value that masks a position out of the loss (prompt and image tokens).
pub const IGNORE_INDEX: i64 = -100;

/// Summed masked next-token cross-entropy, without reading anything back from the device
/// (the trainer divides by the window's token count, known on the host from the labels).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `labels`: `[batch, seq]` → a scalar `[1]` tensor.
pub fn causal_lm_loss_sum<B: Kernels>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    if s < 2 {
        return Tensor::zeros([1], &logits.device());
    }
    // In f32 whatever the model computes in, as transformers upcasts logits for the loss.
    let logits = logits.slice([0..b, 0..s - 1, 0..v]).cast(DType::F32); // predicts 1..s
    let targets = labels.slice([0..b, 1..s]); // [b, s-1]
    let mask = targets.clone().not_equal_elem(IGNORE_INDEX); // [b, s-1]
                                                             // Masked labels point at class 0; their loss is zeroed by the mask below.
    let safe = targets.mask_fill(mask.clone().bool_not(), 0);
    let logp = log_softmax(logits, 2);
    let picked = logp
        .gather(2, safe.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2); // [b, s-1]
    (picked.neg() * mask.float().cast(DType::F32)).sum()
}

/// Mean masked next-token cross-entropy and the number of tokens it averaged.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `labels`: `[batch, seq]` (token ids, or [`IGNORE_INDEX`])
/// - returns a scalar `[1]` tensor (0 when no token counts) and the count.
pub fn causal_lm_loss<B: Kernels>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [b, s, _] = logits.dims();
    if s < 2 {
        return (Tensor::zeros([1], &logits.device()), 0);
    }
    let count: usize = labels
        .clone()
        .slice([0..b, 1..s])
        .not_equal_elem(IGNORE_INDEX)
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>()
        .max(0) as usize;
    let loss = causal_lm_loss_sum(logits, labels) / (count.max(1) as f64);
    (loss, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    #[test]
    fn loss_is_the_mean_negative_log_likelihood_of_shifted_unmasked_labels() {
        let dev = Default::default();
        // vocab 2; position 0 predicts label[1], position 1 predicts label[2].
        let logits = Tensor::<TB, 3>::from_floats([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]], &dev);
        let labels = Tensor::<TB, 2, Int>::from_ints([[IGNORE_INDEX, 1, 0]], &dev);
        let (loss, n) = causal_lm_loss(logits, labels);
        let l0 = 2f64.ln(); // uniform over 2 → -ln(0.5)
        let l1 = -(2f64.exp() / (2f64.exp() + 1.0)).ln();
        assert_eq!(n, 2);
        let got = loss.into_scalar() as f64;
        assert!((got - (l0 + l1) / 2.0).abs() < 1e-6, "{got}");
    }

    #[test]
    fn the_summed_loss_is_the_mean_times_the_counted_tokens() {
        let dev = Default::default();
        let logits = Tensor::<TB, 3>::from_floats([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]], &dev);
        let labels = Tensor::<TB, 2, Int>::from_ints([[IGNORE_INDEX, 1, 0]], &dev);
        let (mean, n) = causal_lm_loss(logits.clone(), labels.clone());
        let sum = causal_lm_loss_sum(logits, labels).into_scalar();
        assert!((sum - mean.into_scalar() * n as f32).abs() < 1e-6);
    }

    #[test]
    fn masked_targets_do_not_count() {
        let dev = Default::default();
        let logits = Tensor::<TB, 3>::from_floats([[[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]]], &dev);
        let labels = Tensor::<TB, 2, Int>::from_ints([[7, IGNORE_INDEX, 1]], &dev);
        let (loss, n) = causal_lm_loss(logits, labels);
        assert_eq!(n, 1, "only label[2] counts");
        let want = -(5f64.exp() / (1.0 + 5f64.exp())).ln(); // position 1 predicts class 1
        assert!((loss.into_scalar() as f64 - want).abs() < 1e-6);
    }
}
