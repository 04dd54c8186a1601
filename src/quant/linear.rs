//! A Linear layer whose weight is NF4 (bitsandbytes `Linear4bit`, `bitsandbytes/nn/modules.py`):
//! packed codes and f32 block scales are constants; the forward multiplies by the
//! dequantized weight. Double quant is undone once at load, as the f32 absmax it yields is
//! all the forward needs.
//!
//! The matmul goes through the kernel seam ([`crate::kernels::Kernels::nf4_matmul`]): the
//! CPU decodes on the host straight into dot products, CubeCL backends dequantize with a
//! kernel, and the autodiff backend keeps only the packed weight for backward.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use safetensors::{Dtype, SafeTensors};

use super::format::Nf4Tensor;
use super::QuantError;
use crate::kernels::{self, Kernels, Nf4Weight, PackedLayout};

/// `y = x · dequant(W)ᵀ + b` with `W` stored as NF4.
#[derive(Module, Debug)]
pub struct Nf4Linear<B: Kernels> {
    /// Packed codes, laid out as the backend's kernel wants them
    /// ([`Kernels::nf4_layout`]).
    packed: Tensor<B, 1, Int>,
    /// f32 scale per block: `[n_blocks]`.
    absmax: Tensor<B, 1>,
    /// The 16 NF4 values: `[16]`.
    code: Tensor<B, 1>,
    /// Trainable bias, when the layer has one: `[out_features]`.
    bias: Option<Param<Tensor<B, 1>>>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
}

impl<B: Kernels> Nf4Linear<B> {
    /// Builds the layer from a quantized weight of shape `[out_features, in_features]`.
    ///
    /// # Errors
    /// [`QuantError::Shape`] when the weight is not 2-D or the bias length differs from
    /// `out_features`.
    pub fn from_nf4(
        key: &str,
        w: &Nf4Tensor,
        bias: Option<Vec<f32>>,
        device: &B::Device,
    ) -> Result<Self, QuantError> {
        let [out_features, in_features] =
            <[usize; 2]>::try_from(w.shape.as_slice()).map_err(|_| QuantError::Shape {
                key: key.to_string(),
                found: w.shape.clone(),
                expected: "2 dims [out_features, in_features]".into(),
            })?;
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(QuantError::Shape {
                    key: key.replace(".weight", ".bias"),
                    found: vec![b.len()],
                    expected: format!("[{out_features}]"),
                });
            }
        }
        let absmax = w.absmax_f32();
        let numel = out_features * in_features;
        if w.blocksize == 0 || !w.blocksize.is_multiple_of(8) {
            return Err(QuantError::Invalid {
                key: key.to_string(),
                reason: format!("blocksize {} is not a positive multiple of 8", w.blocksize),
            });
        }
        if w.packed.len() < numel.div_ceil(2) {
            return Err(QuantError::Shape {
                key: key.to_string(),
                found: vec![w.packed.len()],
                expected: format!(
                    "[{}] packed bytes for shape {:?}",
                    numel.div_ceil(2),
                    w.shape
                ),
            });
        }
        if absmax.len() < numel.div_ceil(w.blocksize) {
            return Err(QuantError::Shape {
                key: format!("{key}.absmax"),
                found: vec![absmax.len()],
                expected: format!("[{}] block scales", numel.div_ceil(w.blocksize)),
            });
        }
        let bias = bias.map(|b| {
            Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [out_features]),
                device,
            ))
        });
        let weight = kernels::nf4_upload::<B>(
            &w.packed,
            &absmax,
            &w.quant_map,
            [out_features, in_features],
            w.blocksize,
            device,
        );
        Ok(Self {
            packed: Tensor::from_primitive(weight.packed),
            absmax: Tensor::from_primitive(TensorPrimitive::Float(weight.absmax)),
            code: Tensor::from_primitive(TensorPrimitive::Float(weight.code)),
            bias,
            out_features,
            in_features,
            blocksize: w.blocksize,
        })
    }

    /// The same layer reading its packed codes from `codes` (a 1-D `U8` tensor, typically
    /// borrowed from the checkpoint's memory map) instead of its own copy, on backends that
    /// keep bitsandbytes' byte layout ([`PackedLayout::Bytes`]: the CPU). Unchanged when the
    /// layout, dtype or length differs.
    pub(crate) fn with_codes(mut self, codes: TensorData, device: &B::Device) -> Self {
        let want = (self.out_features * self.in_features).div_ceil(2);
        if B::nf4_layout() == PackedLayout::Bytes
            && codes.dtype == DType::U8
            && codes.shape.as_slice() == [want]
        {
            self.packed = Tensor::from_data(codes, (device, DType::U8));
        }
        self
    }

    /// Loads the Linear stored under `prefix` (e.g. `model.layers.0.self_attn.q_proj`): its
    /// bitsandbytes 4-bit `weight*` tensors and an optional `bias` (F32, BF16 or F16).
    ///
    /// # Errors
    /// Any validation error of [`Nf4Tensor::from_tensors`], or a bias of another dtype/length.
    pub fn from_safetensors(
        st: &SafeTensors<'_>,
        prefix: &str,
        device: &B::Device,
    ) -> Result<Self, QuantError> {
        let wkey = format!("{prefix}.weight");
        let w = Nf4Tensor::from_tensors(&wkey, |k| st.tensor(k).ok())?;
        let bkey = format!("{prefix}.bias");
        let bias = match st.tensor(&bkey) {
            Ok(v) => Some(floats(&bkey, v.dtype(), v.data())?),
            Err(_) => None,
        };
        Self::from_nf4(&wkey, &w, bias, device)
    }

    /// The packed weight as the kernel seam takes it.
    fn nf4(&self) -> Nf4Weight<B> {
        Nf4Weight {
            packed: self.packed.clone().into_primitive(),
            absmax: self.absmax.clone().into_primitive().tensor(),
            code: self.code.clone().into_primitive().tensor(),
            shape: [self.out_features, self.in_features],
            blocksize: self.blocksize,
        }
    }

    /// The dequantized weight `[out_features, in_features]` (f32).
    pub fn weight(&self) -> Tensor<B, 2> {
        kernels::nf4_dequantize(&self.nf4(), DType::F32)
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// - `x`: `[..., in_features]`
    /// - returns `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x2 = x.reshape([rows, self.in_features]);
        let y2 = kernels::nf4_matmul(x2, &self.nf4());
        dims[D - 1] = self.out_features;
        let y = y2.reshape(dims);
        match &self.bias {
            Some(b) => {
                let dtype = y.dtype();
                y.add(b.val().cast(dtype).unsqueeze::<D>())
            }
            None => y,
        }
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    /// Bytes the layer holds: packed codes, block scales, code book and bias, each at its
    /// element size.
    pub fn stored_bytes(&self) -> u64 {
        let bytes = |numel: usize, dtype: DType| (numel * dtype.size()) as u64;
        bytes(self.packed.shape().num_elements(), self.packed.dtype())
            + bytes(self.absmax.shape().num_elements(), self.absmax.dtype())
            + bytes(self.code.shape().num_elements(), self.code.dtype())
            + self.bias.as_ref().map_or(0, |b| {
                let b = b.val();
                bytes(b.shape().num_elements(), b.dtype())
            })
    }
}

/// Decodes a float tensor's bytes to f32.
fn floats(key: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, QuantError> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(QuantError::Dtype {
                key: key.to_string(),
                found: format!("{other:?}"),
                expected: "F32, BF16 or F16",
            })
        }
    })
}

#[cfg(test)]
impl Nf4Linear<crate::kernels::host::Cpu> {
    /// Whether the packed codes are borrowed (read in place) rather than a copy.
    pub(crate) fn codes_borrowed(&self) -> bool {
        matches!(self.packed.clone().into_primitive(),
            burn::backend::ndarray::NdArrayTensor::U8(s) if s.is_borrowed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, fixture, TB};

    /// f32 matmul of a 64-long dot product: summation order differs from the reference
    /// loop, rounding stays far below this.
    const FORWARD_ATOL: f32 = 1e-5;

    #[test]
    fn forward_equals_x_times_dequantized_weight_transposed_plus_bias() {
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/nf4/model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let dev = Default::default();
        let prefix = "model.layers.0.self_attn.q_proj";
        let lin = Nf4Linear::<TB>::from_safetensors(&st, prefix, &dev).unwrap();
        assert_eq!(lin.dims(), (64, 64));
        let w = Nf4Tensor::from_tensors(&format!("{prefix}.weight"), |k| st.tensor(k).ok())
            .unwrap()
            .dequantize();
        let b = floats(
            "b",
            Dtype::F32,
            st.tensor(&format!("{prefix}.bias")).unwrap().data(),
        )
        .unwrap();
        let (rows, inn, out) = (3usize, 64usize, 64usize);
        let x: Vec<f32> = (0..rows * inn)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut want = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut acc = b[o] as f64;
                for i in 0..inn {
                    acc += x[r * inn + i] as f64 * w[o * inn + i] as f64;
                }
                want[r * out + o] = acc as f32;
            }
        }
        let xt = Tensor::<TB, 3>::from_data(TensorData::new(x, [1, rows, inn]), &dev);
        let got = lin.forward(xt).into_data().to_vec::<f32>().unwrap();
        assert_close("nf4 linear forward", &got, &want, FORWARD_ATOL);
        let wt = lin.weight().into_data().to_vec::<f32>().unwrap();
        assert_eq!(wt, w, "dequantized weight is the bitsandbytes one exactly");
    }

    #[test]
    fn an_odd_sized_weight_with_a_tail_block_dequantizes_like_the_host_code() {
        let values: Vec<f32> = (0..13 * 11)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w = Nf4Tensor::quantize("w", &values, &[13, 11], "float32", 64, true).unwrap();
        let lin = Nf4Linear::<TB>::from_nf4("p.weight", &w, None, &Default::default()).unwrap();
        let got = lin.weight().into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, w.dequantize());
    }

    #[test]
    fn a_bias_of_the_wrong_length_is_rejected() {
        let w = Nf4Tensor::quantize("w", &[0.5; 128], &[2, 64], "float32", 64, false).unwrap();
        let err =
            Nf4Linear::<TB>::from_nf4("p.weight", &w, Some(vec![0.0; 3]), &Default::default())
                .unwrap_err();
        assert!(err.to_string().contains("p.bias"), "{err}");
    }
    #[test]
    fn gradients_flow_to_the_input_and_bias_but_the_weight_stays_constant() {
        type AB = burn::backend::Autodiff<TB>;
        let dev = Default::default();
        let values: Vec<f32> = (0..4 * 64)
            .map(|i| ((i % 13) as f32 - 6.0) / 10.0)
            .collect();
        let w = Nf4Tensor::quantize("w", &values, &[4, 64], "float32", 64, true).unwrap();
        let lin = Nf4Linear::<AB>::from_nf4("p.weight", &w, Some(vec![0.0; 4]), &dev).unwrap();
        assert_eq!(lin.num_params(), 4, "only the bias is a parameter");
        let x = Tensor::<AB, 2>::ones([2, 64], &dev).require_grad();
        let grads = lin.forward(x.clone()).sum().backward();
        let gx = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let deq = w.dequantize();
        // d(sum(x Wᵀ))/dx[r, i] = Σ_o W[o, i]
        let want: Vec<f32> = (0..2 * 64)
            .map(|j| (0..4).map(|o| deq[o * 64 + j % 64]).sum())
            .collect();
        assert_close("grad x", &gx, &want, FORWARD_ATOL);
        let bias = lin.bias.as_ref().unwrap().val();
        let gb = bias
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(gb, vec![2.0; 4]);
    }
}
