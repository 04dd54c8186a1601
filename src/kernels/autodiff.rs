//! The kernels on the autodiff backend: forward through the inner backend's kernel, and a
//! backward op that keeps only the packed weight.
//!
//! Why an op of our own: with burn's matmul, a weight dequantized inside `forward` is kept
//! alive by the matmul's backward node until `backward()` (BURN_NOTES §3), so QLoRA training
//! would hold every layer's dequantized weight at once. [`FrozenMatmulBackward`] stores the
//! packed weight (reference-counted tensors shared with the module) and decodes it again in
//! backward, a tile of rows at a time (`nf4_generic::matmul_input_grad`), so no full weight
//! is alive then either. The frozen NF4 weight gets no gradient; only `x` does. A bf16 weight kept as
//! bits ([`Bf16Weight`]) works the same way.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata};

use super::{Bf16Weight, Kernels, Nf4Weight, PackedLayout};

/// The inner backend's view of an autodiff weight (the packed codes are plain int tensors
/// on both; the float constants are unwrapped).
fn inner<B: Kernels, C: CheckpointStrategy>(w: &Nf4Weight<Autodiff<B, C>>) -> Nf4Weight<B> {
    Nf4Weight {
        packed: w.packed.clone(),
        absmax: w.absmax.primitive.clone(),
        code: w.code.primitive.clone(),
        shape: w.shape,
        blocksize: w.blocksize,
    }
}

/// A frozen weight stored in a compact form (NF4 codes, bf16 bits) that the inner backend
/// can expand to a dense float weight `[out, in]`.
trait Frozen<B: Kernels>: Clone + Send + std::fmt::Debug + 'static {
    /// `dy · W`: `dy` `[m, out]` → `[m, in]`.
    fn input_grad(&self, dy: FloatTensor<B>) -> FloatTensor<B>;
}

impl<B: Kernels> Frozen<B> for Nf4Weight<B> {
    /// Decoded a tile of rows at a time: the full weight is never alive.
    fn input_grad(&self, dy: FloatTensor<B>) -> FloatTensor<B> {
        super::nf4_generic::matmul_input_grad(dy, self, super::nf4_generic::TILE_ELEMENTS)
    }
}

impl<B: Kernels> Frozen<B> for Bf16Weight<B> {
    fn input_grad(&self, dy: FloatTensor<B>) -> FloatTensor<B> {
        let weight = B::bf16_widen(self, dy.dtype());
        B::float_matmul(dy, weight)
    }
}

/// Backward of `y = x · Wᵀ` with a frozen compact `W`: `dx = dy · W`, expanded again.
#[derive(Debug)]
struct FrozenMatmulBackward<W>(std::marker::PhantomData<W>);

impl<B: Kernels, W: Frozen<B>> Backward<B, 1> for FrozenMatmulBackward<W> {
    type State = W;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| w.input_grad(dy));
    }
}

/// `y` (the inner backend's `x · Wᵀ`) recorded with a backward that keeps only `w`.
fn frozen_matmul<B: Kernels, C: CheckpointStrategy, W: Frozen<B>>(
    x: &FloatTensor<Autodiff<B, C>>,
    w: W,
    y: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match FrozenMatmulBackward::<W>(std::marker::PhantomData)
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

fn inner_bf16<B: Kernels, C: CheckpointStrategy>(w: &Bf16Weight<Autodiff<B, C>>) -> Bf16Weight<B> {
    Bf16Weight {
        bits: w.bits.clone(),
        shape: w.shape,
    }
}

impl<B: Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
    fn nf4_layout() -> PackedLayout {
        B::nf4_layout()
    }

    fn max_buffer_bytes(device: &Self::Device) -> Option<u64> {
        B::max_buffer_bytes(device)
    }

    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        // A constant: it has no parents and records nothing.
        <Self as AutodiffBackend>::from_inner(B::nf4_dequantize(&inner(w), dtype))
    }

    fn nf4_matmul(x: FloatTensor<Self>, w: &Nf4Weight<Self>) -> FloatTensor<Self> {
        let w = inner(w);
        let y = B::nf4_matmul(x.primitive.clone(), &w);
        frozen_matmul::<B, C, _>(&x, w, y)
    }

    fn keeps_bf16_bits() -> bool {
        B::keeps_bf16_bits()
    }

    fn bf16_widen(w: &Bf16Weight<Self>, dtype: DType) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::bf16_widen(&inner_bf16(w), dtype))
    }

    fn bf16_rows(table: &Bf16Weight<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        // A frozen table: the rows are constants.
        <Self as AutodiffBackend>::from_inner(B::bf16_rows(&inner_bf16(table), ids))
    }

    fn bf16_matmul(x: FloatTensor<Self>, w: &Bf16Weight<Self>) -> FloatTensor<Self> {
        let w = inner_bf16(w);
        let y = B::bf16_matmul(x.primitive.clone(), &w);
        frozen_matmul::<B, C, _>(&x, w, y)
    }
}
