//! The kernels on burn's fusion backend: each kernel call is registered as a custom
//! operation in the fusion stream, which hands the fused backend's tensors to that backend's
//! own kernel when the stream executes (burn-vision's pattern).

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{Kernels, Nf4Weight, PackedLayout};

/// The fused backend's NF4 dequantization, run when the stream reaches it.
#[derive(Clone, Debug)]
struct Nf4Dequantize<B> {
    desc: CustomOpIr,
    shape: [usize; 2],
    blocksize: usize,
    dtype: DType,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for Nf4Dequantize<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([packed, absmax, code], [out]) = self.desc.as_fixed();
        let w = nf4_weight::<B>(handles, [packed, absmax, code], self.shape, self.blocksize);
        let weight = B::nf4_dequantize(&w, self.dtype);
        handles.register_float_tensor::<B>(&out.id, weight);
    }
}

/// The fused backend's NF4 weight from the handles of its codes, scales and code book.
fn nf4_weight<B: FusionBackend>(
    handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    [packed, absmax, code]: [&TensorIr; 3],
    shape: [usize; 2],
    blocksize: usize,
) -> Nf4Weight<B> {
    Nf4Weight {
        packed: handles.get_int_tensor::<B>(packed),
        absmax: handles.get_float_tensor::<B>(absmax),
        code: handles.get_float_tensor::<B>(code),
        shape,
        blocksize,
    }
}

/// The fused backend's `x · dequant(W)ᵀ` (its decode GEMV or its dequantize + matmul).
#[derive(Clone, Debug)]
struct Nf4Matmul<B> {
    desc: CustomOpIr,
    shape: [usize; 2],
    blocksize: usize,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for Nf4Matmul<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, packed, absmax, code], [out]) = self.desc.as_fixed();
        let w = nf4_weight::<B>(handles, [packed, absmax, code], self.shape, self.blocksize);
        let y = B::nf4_matmul(handles.get_float_tensor::<B>(x), &w);
        handles.register_float_tensor::<B>(&out.id, y);
    }
}

/// The fused backend's dense projection of a few rows (its decode GEMV).
#[derive(Clone, Debug)]
struct DenseLinear<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for DenseLinear<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        // Inputs: x, weight and, when the projection has one, bias.
        let inputs = &self.desc.inputs;
        let x = handles.get_float_tensor::<B>(&inputs[0]);
        let weight = handles.get_float_tensor::<B>(&inputs[1]);
        let bias = inputs.get(2).map(|b| handles.get_float_tensor::<B>(b));
        let y = B::dense_linear(x, weight, bias);
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
    }
}

impl<B: FusionBackend + Kernels> Kernels for Fusion<B> {
    fn nf4_layout() -> PackedLayout {
        B::nf4_layout()
    }

    fn max_buffer_bytes(device: &Self::Device) -> Option<u64> {
        B::max_buffer_bytes(device)
    }

    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        let inputs = [w.packed.clone(), w.absmax.clone(), w.code.clone()];
        custom_op::<B, _>("medpipe_nf4_dequantize", inputs, w.shape, dtype, |desc| {
            Nf4Dequantize::<B> {
                desc,
                shape: w.shape,
                blocksize: w.blocksize,
                dtype,
                _backend: PhantomData,
            }
        })
    }

    /// Decode rows (a few) go to the fused backend's kernel as one custom op; prefill stays
    /// burn's fused tensor ops.
    fn dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        if x.shape.num_dims() != 2 || x.shape[0] > super::cube::GEMV_MAX_ROWS {
            return super::generic::dense_linear::<Self>(x, weight, bias);
        }
        let (shape, dtype) = ([x.shape[0], weight.shape[0]], x.dtype);
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        custom_op::<B, _>("medpipe_dense_linear", inputs, shape, dtype, |desc| {
            DenseLinear::<B> {
                desc,
                _backend: PhantomData,
            }
        })
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let fits = super::cube::rms_norm_fits((&x.shape, x.dtype), (&weight.shape, weight.dtype))
            && x.shape[0] <= DECODE_MAX_ROWS;
        if !fits {
            return super::generic::rms_norm::<Self>(x, weight, eps);
        }
        let (shape, dtype) = ([x.shape[0], x.shape[1]], x.dtype);
        custom_op::<B, _>("medpipe_rms_norm", [x, weight], shape, dtype, |desc| {
            RmsNorm::<B> {
                desc,
                eps,
                _backend: PhantomData,
            }
        })
    }

    /// Decode steps (batch × positions up to 64) as one custom op; prefill stays burn's
    /// tensor ops.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let fits = super::cube::rotary_fits(
            (&x.shape, x.dtype),
            (&cos.shape, cos.dtype),
            (&sin.shape, sin.dtype),
        ) && x.shape[0] * x.shape[2] <= DECODE_MAX_ROWS;
        if !fits {
            return super::generic::rotary::<Self>(x, cos, sin);
        }
        let (shape, dtype) = (x.shape.clone(), x.dtype);
        custom_op::<B, _>("medpipe_rotary", [x, cos, sin], shape, dtype, |desc| {
            Rotary::<B> {
                desc,
                _backend: PhantomData,
            }
        })
    }

    /// A decode step's attention (few query rows, see `cube::decode_attention_fits`) as one
    /// custom op; prefill stays burn's attention.
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<burn::tensor::ops::BoolTensor<Self>>,
    ) -> FloatTensor<Self> {
        let fits = super::cube::decode_attention_fits(
            (&q.shape, q.dtype),
            (&k.shape, k.dtype),
            (&v.shape, v.dtype),
            mask.as_ref().map(|m| &m.shape),
        );
        if !fits {
            return super::generic::sdpa::<Self>(q, k, v, mask);
        }
        let (shape, dtype) = (q.shape.clone(), q.dtype);
        let mut inputs = vec![q, k, v];
        inputs.extend(mask);
        custom_op::<B, _>("medpipe_decode_attention", inputs, shape, dtype, |desc| {
            DecodeAttention::<B> {
                desc,
                _backend: PhantomData,
            }
        })
    }

    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        let (shape, dtype) = ([x.shape[0], w.shape[0]], x.dtype);
        let inputs = [x, w.packed.clone(), w.absmax.clone(), w.code.clone()];
        custom_op::<B, _>("medpipe_nf4_matmul", inputs, shape, dtype, |desc| {
            Nf4Matmul::<B> {
                desc,
                shape: w.shape,
                blocksize: w.blocksize,
                _backend: PhantomData,
            }
        })
    }
}

/// The fused backend's RMSNorm of a few rows (decode), as one kernel.
#[derive(Clone, Debug)]
struct RmsNorm<B> {
    desc: CustomOpIr,
    eps: f64,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for RmsNorm<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, weight], [out]) = self.desc.as_fixed();
        let x = handles.get_float_tensor::<B>(x);
        let weight = handles.get_float_tensor::<B>(weight);
        handles.register_float_tensor::<B>(&out.id, B::rms_norm(x, weight, self.eps));
    }
}

/// The fused backend's rotary embedding of a decode step's q or k, as one kernel.
#[derive(Clone, Debug)]
struct Rotary<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for Rotary<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x, cos, sin], [out]) = self.desc.as_fixed();
        let (x, cos, sin) = (
            handles.get_float_tensor::<B>(x),
            handles.get_float_tensor::<B>(cos),
            handles.get_float_tensor::<B>(sin),
        );
        handles.register_float_tensor::<B>(&out.id, B::rotary(x, cos, sin));
    }
}

/// The fused backend's attention of a decode step's few query rows (its flash-decoding).
#[derive(Clone, Debug)]
struct DecodeAttention<B> {
    desc: CustomOpIr,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend + Kernels> Operation<B::FusionRuntime> for DecodeAttention<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        // Inputs: q, k, v and, when the step has one, the mask.
        let inputs = &self.desc.inputs;
        let [q, k, v] = [0, 1, 2].map(|i| handles.get_float_tensor::<B>(&inputs[i]));
        let mask = inputs.get(3).map(|m| handles.get_bool_tensor::<B>(m));
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, B::sdpa(q, k, v, mask));
    }
}

/// Rows (batch × positions) up to which RMSNorm and the rotary embedding run as one custom
/// op on the fusion backend (decode steps of a batch); more rows (prefill) stay burn's tensor
/// ops, which fuse with their neighbours.
const DECODE_MAX_ROWS: usize = 64;

/// Registers the custom op `op` makes from its description: `inputs` in, one tensor of
/// `shape` and `dtype` out, run by the fused backend when the stream reaches it.
fn custom_op<B, O>(
    id: &'static str,
    inputs: impl IntoIterator<Item = FloatTensor<Fusion<B>>>,
    shape: impl Into<Shape>,
    dtype: DType,
    op: impl FnOnce(CustomOpIr) -> O,
) -> FloatTensor<Fusion<B>>
where
    B: FusionBackend,
    O: Operation<B::FusionRuntime> + 'static,
{
    let inputs: Vec<_> = inputs.into_iter().collect();
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let out = TensorIr::uninit(client.create_empty_handle(), shape.into(), dtype);
    let ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(id, &ir, &[out]);
    client
        .register(streams, OperationIr::Custom(desc.clone()), op(desc))
        .output()
}
