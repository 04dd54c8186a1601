//! One micro-batch's forward and backward, with or without layer recomputation
//! ([`Recompute`]).
//!
//! burn 0.21 has no layer-level checkpointing, so the trainer builds it from pieces of the
//! forward ([`Qwen25Vl::decoder_input`], [`Qwen25Vl::forward_layers`], [`Qwen25Vl::head`]):
//! 1. a forward without a graph (a `no_grad` copy of the model) keeps the input of each
//!    segment but the last;
//! 2. the last segment and the loss run with a graph from the segment's input; the
//!    backward gives its LoRA gradients and the gradient at its input;
//! 3. each earlier segment, last to first, reruns from its kept input with a graph and
//!    backpropagates the gradient that arrived at its output (the vector-Jacobian product
//!    `∂(out · g)/∂θ`), handing the gradient at its own input on.
//!
//! LoRA dropout masks are a function of the micro-batch seed and the site
//! ([`crate::model::dropout`]), so a rerun layer draws the masks of its first run, and a run
//! with recomputation computes the gradients of one without.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use crate::kernels::AutodiffKernels;
use crate::model::{dropout, ImageInput, Qwen25Vl};
use crate::train::config::Recompute;
use crate::train::error::TrainError;
use crate::train::loss::causal_lm_loss_sum;

/// A collated micro-batch on the autodiff backend: token rows, their validity, labels and
/// images (no gradients needed for any of them).
pub(crate) struct AdBatch<B: AutodiffKernels> {
    pub ids: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
    pub labels: Tensor<B, 2, Int>,
    pub images: Option<ImageInput<B>>,
}

/// How one micro-batch's backward runs.
pub(crate) struct Pass<'a, B: AutodiffKernels> {
    pub model: &'a Qwen25Vl<B>,
    pub device: &'a B::Device,
    pub recompute: Recompute,
    /// Counted label tokens of the whole accumulation window: a micro-batch's loss is its
    /// token sum divided by this (HF `num_items_in_batch`), so the window's loss is the mean.
    pub window_tokens: usize,
    /// The loss is multiplied by this (`[1]`, on any device) before the backward (f16 loss
    /// scaling; `None` otherwise).
    pub loss_scale: Option<Tensor<B::InnerBackend, 1>>,
    /// Other threads run passes at the same time (data parallel peers).
    pub concurrent: bool,
}

impl<B: AutodiffKernels> Pass<'_, B> {
    /// Runs forward and backward of `batch`, adds its gradients to `accum` and returns its
    /// weighted, unscaled loss, left on the device (the trainer reads a window's sum once).
    /// `seed` seeds the LoRA dropout of this micro-batch.
    ///
    /// # Errors
    /// Model errors (image placeholders that disagree with the images, bad token ids).
    pub fn run(
        &self,
        batch: AdBatch<B>,
        seed: u64,
        accum: &mut GradientsAccumulator<Qwen25Vl<B>>,
    ) -> Result<Tensor<B::InnerBackend, 1>, TrainError> {
        let (model, device) = (self.model, self.device);
        let _masks = dropout::seeded(seed, self.concurrent);
        let input =
            model.decoder_input(&batch.ids, &batch.valid, batch.images.as_ref(), 0, device)?;
        let mut segments = self.recompute.segments(model.num_layers());
        let last = segments.pop().unwrap_or(0..0);

        // 1. Without a graph: the input of every segment but the last.
        let mut kept = Vec::with_capacity(segments.len());
        let mut x = input.x.clone();
        if !segments.is_empty() {
            let untracked = model.clone().no_grad();
            for seg in &segments {
                kept.push(x.clone());
                x = untracked.forward_layers(seg.clone(), x, &input)?;
            }
        }

        // 2. The last segment and the loss.
        let x_in = if kept.is_empty() {
            x
        } else {
            x.detach().require_grad()
        };
        let out = model.forward_layers(last, x_in.clone(), &input)?;
        // The token sum over the window's count (known on the host): no read-back here.
        let loss = causal_lm_loss_sum(model.head(out)?, batch.labels)
            .div_scalar(self.window_tokens.max(1) as f64);
        let value = loss.clone().detach().inner();
        let loss = match &self.loss_scale {
            None => loss,
            Some(s) => {
                let s = s.clone().to_device(device).cast(loss.dtype());
                loss * Tensor::from_inner(s)
            }
        };
        let grads = loss.backward();
        let mut upstream = x_in.grad(&grads);
        accum.accumulate(model, GradientsParams::from_grads(grads, model));

        // 3. Earlier segments, last to first.
        while let (Some(seg), Some(x)) = (segments.pop(), kept.pop()) {
            // The residual stream always reaches a segment's input; without a gradient
            // there, nothing flows further back.
            let Some(g) = upstream.take() else { break };
            let first = segments.is_empty(); // the embeddings need no gradient
            let x_in = if first { x } else { x.detach().require_grad() };
            let out = model.forward_layers(seg, x_in.clone(), &input)?;
            let grads = (out * Tensor::from_inner(g)).sum().backward();
            upstream = if first { None } else { x_in.grad(&grads) };
            accum.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        Ok(value)
    }
}
