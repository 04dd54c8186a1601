//! The one linear seam: every projection of the model (vision qkv/proj/MLP/merger, text
//! q/k/v/o/gate/up/down, lm_head) is a [`Proj`], so quantized (NF4) bases and LoRA
//! adapters can be slotted in without touching the blocks that use them.
//!
//! NF4 bases (bitsandbytes 4-bit, `bitsandbytes/nn/modules.py` `Linear4bit`) are chosen per
//! module by what the checkpoint holds: a Linear whose `weight.quant_state.bitsandbytes__nf4`
//! exists loads as [`Nf4Linear`], any other dense. That covers our own `quantize` output
//! (everything but `lm_head`) and pre-quantized hub checkpoints alike: transformers'
//! bitsandbytes quantizer always keeps `lm_head` dense (and the patch-embedding Conv3d is
//! never a Linear), and exports that leave more modules dense (e.g. "dynamic" 4-bit
//! uploads that keep parts of the vision tower in 16 bits, listed in their
//! `llm_int8_skip_modules`) load without a skip list. On CPU the NF4 forward dequantizes
//! per block and multiplies in f32; there is no CUDA kernel (fused dequant + GEMV) here.
//!
//! Field names follow checkpoint keys (`q_proj.weight`, `q_proj.bias`), and so does the
//! layout: a dense weight stays `[d_out, d_in]` as the checkpoint stores it, and
//! [`Kernels::dense_linear`] reads it in place (burn's `Linear` wants `[d_in, d_out]`, which cost a
//! transposed copy of every weight at load).
//!
//! With a LoRA pair attached the projection computes `base(x) + lora(x)` as peft's
//! `lora.Linear.forward` (peft 0.21 `tuners/lora/layer.py`); whatever the base is, it stays
//! frozen, and merging folds `s·B·A` into a dense base.

use burn::module::Param;
use burn::prelude::*;

use crate::kernels::{self, Kernels};
use crate::model::error::ModelError;
use crate::model::lora::Lora;
use crate::model::weights::WeightSource;
use crate::quant::Nf4Linear;

/// The frozen base of a projection.
#[derive(Module, Debug)]
pub enum BaseProj<B: Kernels> {
    /// Full-precision weight `[d_out, d_in]` (+ bias `[d_out]`).
    Dense(DenseLinear<B>),
    /// bitsandbytes NF4 weight, dequantized per block on the fly in the forward (+ bias).
    /// Its codes and scales are constants, never trained.
    Nf4(Nf4Linear<B>),
    /// A bf16 checkpoint's weight kept as bf16 bits, on backends whose float tensors cannot
    /// hold bf16 ([`Kernels::keeps_bf16_bits`]: the CPU): half the memory of widening it.
    Bf16(Bf16Linear<B>),
}

/// A dense linear layer whose weight stays in bf16 (`[d_out, d_in]` bit patterns, read in
/// place from the checkpoint); the product equals the f32 one on the widened weight.
#[derive(Module, Debug)]
pub struct Bf16Linear<B: Kernels> {
    /// `[d_out, d_in]`, `U16`.
    bits: Tensor<B, 2, Int>,
    /// `[d_out]`.
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Kernels> Bf16Linear<B> {
    fn weight(&self) -> kernels::Bf16Weight<B> {
        kernels::Bf16Weight::of(&self.bits)
    }

    /// # Shapes
    /// - `x`: `[..., d_in]` → `[..., d_out]`
    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let [d_out, d_in] = self.bits.dims();
        let rows = dims[..D - 1].iter().product();
        let mut out = dims;
        out[D - 1] = d_out;
        let y = kernels::bf16_matmul(x.reshape([rows, d_in]), &self.weight());
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        y.reshape(out)
    }
}

/// A dense linear layer in PyTorch's layout.
#[derive(Module, Debug)]
pub struct DenseLinear<B: Kernels> {
    /// `[d_out, d_in]`.
    weight: Param<Tensor<B, 2>>,
    /// `[d_out]`.
    bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Kernels> DenseLinear<B> {
    /// # Shapes
    /// - `x`: `[..., d_in]` → `[..., d_out]`
    fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = dims[..D - 1].iter().product();
        let weight = self.weight.val();
        let mut out = dims;
        out[D - 1] = weight.dims()[0];
        let bias = self.bias.as_ref().map(|b| b.val());
        kernels::linear(x.reshape([rows, d_in]), weight, bias).reshape(out)
    }
}

/// A projection `y = x·Wᵀ + b` through the seam.
#[derive(Module, Debug)]
pub struct Proj<B: Kernels> {
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

impl<B: Kernels> Proj<B> {
    /// Loads `{prefix}.weight` (`[d_out, d_in]`) and, if `spec.bias`, `{prefix}.bias`. A
    /// weight stored as bitsandbytes 4-bit (it has `{prefix}.weight.quant_state.
    /// bitsandbytes__nf4`) becomes an NF4 base.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors ([`ModelError`] from the weight source), or a malformed
    /// NF4 weight ([`ModelError::Quant`]).
    pub(crate) fn load(
        src: &mut WeightSource,
        prefix: &str,
        spec: ProjSpec,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let wkey = format!("{prefix}.weight");
        if src.is_nf4(&wkey) {
            let w = src.nf4(&wkey, &[spec.d_out, spec.d_in])?;
            let bias = if spec.bias {
                let data = src.data(&format!("{prefix}.bias"), &[spec.d_out])?;
                Some(data.to_vec::<f32>().map_err(|e| ModelError::Readback {
                    what: "bias",
                    reason: format!("{e:?}"),
                })?)
            } else {
                None
            };
            let lin = Nf4Linear::from_nf4(&wkey, &w, bias, device).map_err(|source| {
                ModelError::Quant {
                    dir: src.dir().to_path_buf(),
                    source,
                }
            })?;
            // On the CPU the codes are read in place from the file, like dense weights.
            let lin = match src.nf4_codes_in_place(&wkey) {
                Some(codes) => lin.with_codes(codes, device),
                None => lin,
            };
            return Ok(Proj {
                base: BaseProj::Nf4(lin),
                lora: None,
            });
        }
        let bias = |src: &mut WeightSource| -> Result<_, ModelError> {
            Ok(if spec.bias {
                let b: Tensor<B, 1> =
                    src.tensor(&format!("{prefix}.bias"), [spec.d_out], device)?;
                Some(Param::from_tensor(b))
            } else {
                None
            })
        };
        if B::keeps_bf16_bits() && src.is_bf16(&wkey) {
            let data = src.bf16_bits_in_place(&wkey, &[spec.d_out, spec.d_in])?;
            let bits = Tensor::<B, 2, Int>::from_data(data, (device, burn::tensor::DType::U16));
            return Ok(Proj {
                base: BaseProj::Bf16(Bf16Linear {
                    bits,
                    bias: bias(src)?,
                }),
                lora: None,
            });
        }
        let w: Tensor<B, 2> = src.tensor_in_place(&wkey, [spec.d_out, spec.d_in], device)?;
        Ok(Self::from_weight(w, bias(src)?))
    }

    /// A dense projection from a PyTorch-layout weight `[d_out, d_in]`.
    pub(crate) fn from_weight(weight: Tensor<B, 2>, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        Proj {
            base: BaseProj::Dense(DenseLinear {
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
            BaseProj::Nf4(l) => l.forward(x.clone()),
            BaseProj::Bf16(l) => l.forward(x.clone()),
        };
        match &self.lora {
            Some(lora) => y + lora.forward(x),
            None => y,
        }
    }

    /// `[d_in, d_out]` of the base projection.
    pub(crate) fn dims(&self) -> [usize; 2] {
        match &self.base {
            BaseProj::Dense(l) => {
                let [d_out, d_in] = l.weight.val().dims();
                [d_in, d_out]
            }
            BaseProj::Nf4(l) => {
                let (d_in, d_out) = l.dims();
                [d_in, d_out]
            }
            BaseProj::Bf16(l) => {
                let [d_out, d_in] = l.bits.dims();
                [d_in, d_out]
            }
        }
    }

    /// Whether the base weight's bytes are read in place from the checkpoint's memory map
    /// (dense f32 or bf16 bits, NF4 codes) rather than copied.
    #[cfg(test)]
    pub(crate) fn reads_in_place(&self) -> bool
    where
        B: 'static,
    {
        use burn::backend::ndarray::NdArrayTensor;
        use std::any::Any;
        let Some(this) = (self as &dyn Any).downcast_ref::<Proj<crate::kernels::host::Cpu>>()
        else {
            return false;
        };
        match &this.base {
            BaseProj::Dense(l) => matches!(l.weight.val().into_primitive().tensor(),
                NdArrayTensor::F32(s) if s.is_borrowed()),
            BaseProj::Bf16(l) => matches!(l.bits.clone().into_primitive(),
                NdArrayTensor::U16(s) if s.is_borrowed()),
            BaseProj::Nf4(l) => l.codes_borrowed(),
        }
    }

    /// Whether the base weight is NF4.
    pub fn is_nf4(&self) -> bool {
        matches!(self.base, BaseProj::Nf4(_))
    }

    /// Bytes the base holds on its device (weight and bias at their element sizes).
    pub fn stored_bytes(&self) -> u64 {
        match &self.base {
            BaseProj::Dense(l) => {
                let w = l.weight.val();
                let b = l
                    .bias
                    .as_ref()
                    .map_or(0, |b| b.val().shape().num_elements());
                ((w.shape().num_elements() + b) * w.dtype().size()) as u64
            }
            BaseProj::Nf4(l) => l.stored_bytes(),
            BaseProj::Bf16(l) => {
                let b = l
                    .bias
                    .as_ref()
                    .map_or(0, |b| b.val().shape().num_elements() * 4);
                (l.bits.shape().num_elements() * 2 + b) as u64
            }
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

    /// Folds the LoRA update into a dense base (`W' = W + s·B·A`) and drops the pair. An NF4
    /// base keeps its pair: folding would re-quantize and lose the update's precision.
    pub(crate) fn merge_lora(&mut self) {
        let Some(lora) = self.lora.take() else {
            return;
        };
        match &mut self.base {
            BaseProj::Dense(l) => {
                // Both [d_out, d_in]. Detached: the merged weight is a frozen base like the
                // one it replaces.
                let w = l.weight.val();
                let w = (w.clone() + lora.delta_weight().cast(w.dtype())).detach();
                l.weight = Param::initialized(l.weight.id, w);
            }
            // Widened to a dense f32 base: rounding the sum back to bf16 would lose the
            // update's precision.
            BaseProj::Bf16(l) => {
                let w = kernels::bf16_widen(&l.weight(), burn::tensor::DType::F32);
                let w = (w + lora.delta_weight()).detach();
                self.base = BaseProj::Dense(DenseLinear {
                    weight: Param::from_tensor(w),
                    bias: l.bias.clone(),
                });
            }
            BaseProj::Nf4(_) => self.lora = Some(lora),
        }
    }
}

/// RMSNorm as Qwen2 computes it: `w · x / sqrt(mean(x²) + eps)` in f32. The field is
/// `weight` so module paths equal checkpoint keys.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Kernels> {
    weight: Param<Tensor<B, 1>>,
    eps: f64,
}

impl<B: Kernels> RmsNorm<B> {
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
        kernels::rms_norm(x, self.weight.val(), self.eps)
    }
}
