//! A Linear layer whose weight is NF4 (bitsandbytes `Linear4bit`, `bitsandbytes/nn/modules.py`):
//! packed codes and f32 block scales are constants; the forward dequantizes and multiplies in
//! f32. Double quant is undone once at load, as the f32 absmax it yields is all the forward
//! needs.
//!
//! On the CPU backends the packed bytes stay on the host and the matmul is
//! [`super::cpu_kernel`]'s (decode-time GEMV, an autodiff op that keeps no f32 weight alive);
//! on any other backend the weight is rebuilt from device tensors with generic ops.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{ElementConversion, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::cpu_kernel::{self, HostNf4};
use super::format::Nf4Tensor;
use super::QuantError;

/// Bit offset of element `j` (0..8) inside a little-endian word of four packed bytes.
const CODE_SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];

/// `y = x · dequant(W)ᵀ + b` with `W` stored as NF4.
#[derive(Module, Debug)]
pub struct Nf4Linear<B: Backend> {
    /// The packed weight on the host, for backends with a CPU kernel (else `None`).
    #[module(skip)]
    host: Option<HostNf4>,
    /// The packed weight as device tensors, for every other backend (else `None`).
    on_device: Option<DeviceNf4<B>>,
    /// Trainable bias, when the layer has one: `[out_features]`.
    bias: Option<Param<Tensor<B, 1>>>,
    out_features: usize,
    in_features: usize,
    blocksize: usize,
}

/// An NF4 weight as backend tensors, decoded with generic tensor ops.
#[derive(Module, Debug)]
struct DeviceNf4<B: Backend> {
    /// Packed codes, four bitsandbytes bytes (eight codes) per element as a little-endian
    /// 32-bit word, padded to whole blocks with code 7 (zero): `[n_blocks * blocksize / 8]`.
    packed: Tensor<B, 1, Int>,
    /// f32 scale per block: `[n_blocks]`.
    absmax: Tensor<B, 1>,
    /// The 16 NF4 values: `[16]`.
    code: Tensor<B, 1>,
}

impl<B: Backend> Nf4Linear<B> {
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
        let (host, on_device) = if cpu_kernel::has_kernel::<B>() {
            let host = HostNf4::new(
                w.packed.clone(),
                absmax,
                &w.quant_map,
                out_features,
                in_features,
                w.blocksize,
            );
            (Some(host), None)
        } else {
            (None, Some(DeviceNf4::new(w, absmax, device)))
        };
        Ok(Self {
            host,
            on_device,
            bias,
            out_features,
            in_features,
            blocksize: w.blocksize,
        })
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

    /// The dequantized weight `[out_features, in_features]` (f32).
    pub fn weight(&self) -> Tensor<B, 2> {
        let shape = [self.out_features, self.in_features];
        match (&self.host, &self.on_device) {
            (_, Some(d)) => d.weight(self.blocksize, shape),
            (Some(h), None) => {
                Tensor::from_data(TensorData::new(h.dequantize(), shape), &self.bias_device())
            }
            (None, None) => unreachable!("from_nf4 sets the host or the device weight"),
        }
    }

    /// Where the layer lives (for the host-weight case, which holds no device tensor).
    fn bias_device(&self) -> B::Device {
        self.bias
            .as_ref()
            .map(|b| b.val().device())
            .unwrap_or_default()
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
        let y2 = match &self.host {
            Some(h) => match cpu_kernel::try_matmul(h, x2) {
                Ok(y) => y,
                Err(x2) => x2.matmul(self.weight().transpose()),
            },
            None => x2.matmul(self.weight().transpose()),
        };
        dims[D - 1] = self.out_features;
        let y = y2.reshape(dims);
        match &self.bias {
            Some(b) => y.add(b.val().unsqueeze::<D>()),
            None => y,
        }
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    /// Bytes the layer holds: packed codes, block scales, code book (or decode table on the
    /// host) and bias, each at its element size (device words are the backend's int type).
    pub fn stored_bytes(&self) -> u64 {
        let bytes = |numel: usize, dtype: burn::tensor::DType| (numel * dtype.size()) as u64;
        let weight = match (&self.host, &self.on_device) {
            (Some(h), _) => h.stored_bytes(),
            (None, Some(d)) => {
                bytes(d.packed.shape().num_elements(), d.packed.dtype())
                    + bytes(d.absmax.shape().num_elements(), d.absmax.dtype())
                    + bytes(d.code.shape().num_elements(), d.code.dtype())
            }
            (None, None) => 0,
        };
        weight
            + self.bias.as_ref().map_or(0, |b| {
                let b = b.val();
                bytes(b.shape().num_elements(), b.dtype())
            })
    }
}

impl<B: Backend> DeviceNf4<B> {
    fn new(w: &Nf4Tensor, absmax: Vec<f32>, device: &B::Device) -> Self {
        let padded_bytes = absmax.len() * w.blocksize / 2;
        // Every valid blocksize is a multiple of 8 elements, so whole blocks fill whole words.
        let mut bytes = w.packed.clone();
        bytes.resize(padded_bytes, 0x77);
        let packed: Vec<i32> = bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n_words = packed.len();
        let n_blocks = absmax.len();
        Self {
            packed: Tensor::from_data(TensorData::new(packed, [n_words]), device),
            absmax: Tensor::from_data(TensorData::new(absmax, [n_blocks]), device),
            code: Tensor::from_data(TensorData::new(w.quant_map.to_vec(), [16]), device),
        }
    }

    /// The dequantized weight of `shape` `[out, in]`, with generic tensor ops.
    fn weight(&self, blocksize: usize, shape: [usize; 2]) -> Tensor<B, 2> {
        let n_words = self.packed.dims()[0];
        // Element j of a word sits in byte j/2, high nibble first (bitsandbytes' order); the
        // arithmetic shift of a negative word is harmless because of the mask.
        let nibbles = CODE_SHIFTS
            .iter()
            .map(|&s| {
                self.packed
                    .clone()
                    .bitwise_right_shift_scalar(s.elem())
                    .bitwise_and_scalar(15i32.elem())
            })
            .collect();
        let codes = Tensor::stack::<2>(nibbles, 1).reshape([n_words * 8]); // element order
        let n_blocks = self.absmax.dims()[0];
        let values = self
            .code
            .clone()
            .select(0, codes)
            .reshape([n_blocks, blocksize])
            .mul(self.absmax.clone().reshape([n_blocks, 1])); // [blocks, blocksize]
        values
            .reshape([n_blocks * blocksize])
            .narrow(0, 0, shape[0] * shape[1])
            .reshape(shape)
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
