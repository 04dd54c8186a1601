//! The one linear seam: every projection of the model (vision qkv/proj/MLP/merger, text
//! q/k/v/o/gate/up/down, lm_head) is a [`Proj`], so quantized (NF4) bases and LoRA
//! adapters can be slotted in without touching the blocks that use them.
//!
//! Field names follow checkpoint keys (`q_proj.weight`, `q_proj.bias`); burn's `Linear`
//! stores the weight as `[d_in, d_out]`, the checkpoint as `[d_out, d_in]`.
//!
//! With a LoRA pair attached the projection computes `base(x) + lora(x)` as peft's
//! `lora.Linear.forward` (peft 0.21 `tuners/lora/layer.py`); whatever the base is, it stays
//! frozen, and merging folds `s·B·A` into a dense base.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;

use crate::model::error::ModelError;
use crate::model::lora::Lora;
use crate::model::weights::WeightSource;

/// The frozen base of a projection.
#[derive(Module, Debug)]
pub enum BaseProj<B: Backend> {
    /// Full-precision weight `[d_in, d_out]` (+ bias `[d_out]`).
    Dense(Linear<B>),
}

/// A projection `y = x·Wᵀ + b` through the seam.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    base: BaseProj<B>,
    /// Low-rank update added to the base output (`None`: plain projection).
    lora: Option<Lora<B>>,
}

/// Shape of a projection as the checkpoint stores it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProjSpec {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Whether `{prefix}.bias` exists.
    pub bias: bool,
}

impl<B: Backend> Proj<B> {
    /// Loads `{prefix}.weight` (`[d_out, d_in]`) and, if `spec.bias`, `{prefix}.bias`.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors ([`ModelError`] from the weight source).
    pub(crate) fn load(
        src: &mut WeightSource,
        prefix: &str,
        spec: ProjSpec,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let w: Tensor<B, 2> =
            src.tensor(&format!("{prefix}.weight"), [spec.d_out, spec.d_in], device)?;
        let bias = if spec.bias {
            let b: Tensor<B, 1> = src.tensor(&format!("{prefix}.bias"), [spec.d_out], device)?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        Ok(Self::from_weight(w, bias))
    }

    /// A dense projection from a PyTorch-layout weight `[d_out, d_in]`.
    pub(crate) fn from_weight(weight: Tensor<B, 2>, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        let [d_out, d_in] = weight.dims();
        // The reshape materialises the transpose once, here: a strided view would be
        // re-laid-out by NdArray's matmul on every forward.
        let weight = weight.transpose().reshape([d_in, d_out]);
        Proj {
            base: BaseProj::Dense(Linear {
                weight: Param::from_tensor(weight),
                bias,
            }),
            lora: None,
        }
    }

    /// # Shapes
    /// - `x`: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = match &self.base {
            BaseProj::Dense(l) => l.forward(x.clone()),
        };
        match &self.lora {
            Some(lora) => y + lora.forward(x),
            None => y,
        }
    }

    /// `[d_in, d_out]` of the base projection.
    pub(crate) fn dims(&self) -> [usize; 2] {
        match &self.base {
            BaseProj::Dense(l) => l.weight.val().dims(),
        }
    }

    /// The attached LoRA pair, if any.
    pub(crate) fn lora(&self) -> Option<&Lora<B>> {
        self.lora.as_ref()
    }

    /// Attaches `lora` (replacing any previous pair); the caller checked its shapes.
    pub(crate) fn set_lora(&mut self, lora: Option<Lora<B>>) {
        self.lora = lora;
    }

    /// Folds the LoRA update into a dense base (`W' = W + s·B·A`) and drops the pair.
    pub(crate) fn merge_lora(&mut self) {
        let Some(lora) = self.lora.take() else {
            return;
        };
        match &mut self.base {
            BaseProj::Dense(l) => {
                // burn layout [d_in, d_out]: add (s·B·A)ᵀ = s·Aᵀ·Bᵀ
                let delta = lora.delta_weight().transpose(); // [d_in, d_out]
                                                             // Detached: the merged weight is a frozen base like the one it replaces.
                let w = (l.weight.val() + delta).detach();
                l.weight = Param::initialized(l.weight.id, w);
            }
        }
    }
}

/// RMSNorm as Qwen2 computes it: `w · x / sqrt(mean(x²) + eps)` in f32. The field is
/// `weight` so module paths equal checkpoint keys.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    weight: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Loads `{prefix}.weight` of width `d`.
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub(crate) fn load(
        src: &mut WeightSource,
        prefix: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let w: Tensor<B, 1> = src.tensor(&format!("{prefix}.weight"), [d], device)?;
        Ok(RmsNorm {
            weight: Param::from_tensor(w),
            eps,
        })
    }

    /// # Shapes
    /// - `x`: `[..., d]` → `[..., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // The reference normalises in f32 whatever the activation dtype, then casts back.
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let rms = (x.clone().square().mean_dim(D - 1) + self.eps).sqrt();
        (x / rms).cast(dtype) * self.weight.val().unsqueeze()
    }
}
