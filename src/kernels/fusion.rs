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
        let w = Nf4Weight::<B> {
            packed: handles.get_int_tensor::<B>(packed),
            absmax: handles.get_float_tensor::<B>(absmax),
            code: handles.get_float_tensor::<B>(code),
            shape: self.shape,
            blocksize: self.blocksize,
        };
        let weight = B::nf4_dequantize(&w, self.dtype);
        handles.register_float_tensor::<B>(&out.id, weight);
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
        let w = Nf4Weight::<B> {
            packed: handles.get_int_tensor::<B>(packed),
            absmax: handles.get_float_tensor::<B>(absmax),
            code: handles.get_float_tensor::<B>(code),
            shape: self.shape,
            blocksize: self.blocksize,
        };
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
        let client = w.packed.client.clone();
        let streams = OperationStreams::with_inputs([&w.packed, &w.absmax, &w.code]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new(w.shape), dtype);
        let desc = CustomOpIr::new(
            "medpipe_nf4_dequantize",
            &[
                w.packed.clone().into_ir(),
                w.absmax.clone().into_ir(),
                w.code.clone().into_ir(),
            ],
            &[out],
        );
        let op = Nf4Dequantize::<B> {
            desc: desc.clone(),
            shape: w.shape,
            blocksize: w.blocksize,
            dtype,
            _backend: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .output()
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
        let (rows, client) = (x.shape[0], x.client.clone());
        let mut inputs = vec![x.clone(), weight.clone()];
        inputs.extend(bias.clone());
        let streams = OperationStreams::with_inputs(inputs.iter());
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([rows, weight.shape[0]]),
            x.dtype,
        );
        let ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("medpipe_dense_linear", &ir, &[out]);
        let op = DenseLinear::<B> {
            desc: desc.clone(),
            _backend: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .output()
    }

    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        let client = x.client.clone();
        let streams = OperationStreams::with_inputs([&x, &w.packed, &w.absmax, &w.code]);
        let m = x.shape[0];
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::new([m, w.shape[0]]),
            x.dtype,
        );
        let desc = CustomOpIr::new(
            "medpipe_nf4_matmul",
            &[
                x.clone().into_ir(),
                w.packed.clone().into_ir(),
                w.absmax.clone().into_ir(),
                w.code.clone().into_ir(),
            ],
            &[out],
        );
        let op = Nf4Matmul::<B> {
            desc: desc.clone(),
            shape: w.shape,
            blocksize: w.blocksize,
            _backend: PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .output()
    }
}
