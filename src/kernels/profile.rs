//! Where a step's time goes, by kernel class (`medpipe bench` reports it per decode step).
//! Each class is timed where its calls pass: the seam's wrappers and generate's token pick.
//!
//! The seam's tensor wrappers ([`super::linear`], [`super::sdpa`], …) are the only way model
//! code reaches a kernel, so timing them covers every kernel call. While a [`Recording`] is
//! open on a thread, each wrapper call on that thread waits for the device before and after
//! itself (`B::sync`), so the time between is that call's, and it counts the bytes the call
//! must read (weights, KV cache, activations); generate times its choice of the next tokens
//! the same way. What is left of a step (embedding lookup, residual adds, casts, and on a
//! fused backend the element-wise ops fused between calls) is the step's time minus the classes'. Waiting around every call
//! stops a fused backend from fusing across calls, so a recorded step is slower than an
//! unrecorded one: read the shares, and the unrecorded step time for speed.

use std::cell::RefCell;
use std::time::Instant;

use burn::prelude::*;

/// What a kernel call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelClass {
    /// Linear projections (NF4, bf16 and dense weights; the logits head included).
    Projection,
    /// Attention (over the KV cache in a decode step).
    Attention,
    /// RMSNorm.
    Norm,
    /// Rotary embedding of q and k.
    Rotary,
    /// The gated MLP's `silu(gate) · up`.
    Activation,
    /// Choosing the next tokens from the logits (argmax or sampling).
    Sampling,
}

impl KernelClass {
    pub const ALL: [KernelClass; 6] = [
        KernelClass::Projection,
        KernelClass::Attention,
        KernelClass::Norm,
        KernelClass::Rotary,
        KernelClass::Activation,
        KernelClass::Sampling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelClass::Projection => "projections",
            KernelClass::Attention => "attention",
            KernelClass::Norm => "rms_norm",
            KernelClass::Rotary => "rotary",
            KernelClass::Activation => "silu_mul",
            KernelClass::Sampling => "sampling",
        }
    }
}

/// Totals per [`KernelClass`] (indexed as [`KernelClass::ALL`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassTotals {
    /// Wall seconds inside the calls.
    pub seconds: [f64; 6],
    pub calls: [u64; 6],
    /// Bytes the calls had to read.
    pub bytes: [u64; 6],
}

thread_local! {
    static TOTALS: RefCell<Option<ClassTotals>> = const { RefCell::new(None) };
}

/// While alive, kernel calls on this thread are timed and counted ([`Recording::take`]).
#[must_use = "recording stops when this is dropped"]
pub struct Recording(());

/// Starts recording kernel calls on this thread (from zero).
pub fn record() -> Recording {
    TOTALS.with(|t| *t.borrow_mut() = Some(ClassTotals::default()));
    Recording(())
}

impl Recording {
    /// The totals so far, restarting from zero (so a caller can drop a prefill's share).
    pub fn take(&self) -> ClassTotals {
        TOTALS.with(|t| {
            t.borrow_mut()
                .replace(ClassTotals::default())
                .unwrap_or_default()
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        TOTALS.with(|t| *t.borrow_mut() = None);
    }
}

/// Restarts the totals of an open recording (no-op otherwise): generate calls it when the
/// prefill is done, so a recording holds decode steps only.
pub fn restart() {
    TOTALS.with(|t| {
        if let Some(totals) = t.borrow_mut().as_mut() {
            *totals = ClassTotals::default();
        }
    });
}

fn recording() -> bool {
    TOTALS.with(|t| t.borrow().is_some())
}

/// Runs `call` (a kernel of `class` on `device`, reading `bytes`); timed when recording.
pub(crate) fn timed<B: Backend, T>(
    class: KernelClass,
    device: &B::Device,
    bytes: u64,
    call: impl FnOnce() -> T,
) -> T {
    if !recording() {
        return call();
    }
    // A sync error surfaces again on the next operation of this device.
    let _ = B::sync(device);
    let start = Instant::now();
    let out = call();
    let _ = B::sync(device);
    let seconds = start.elapsed().as_secs_f64();
    let k = KernelClass::ALL
        .iter()
        .position(|&c| c == class)
        .unwrap_or(0);
    TOTALS.with(|t| {
        if let Some(totals) = t.borrow_mut().as_mut() {
            totals.seconds[k] += seconds;
            totals.calls[k] += 1;
            totals.bytes[k] += bytes;
        }
    });
    out
}

/// Bytes of a tensor of `shape` in `dtype`.
pub(crate) fn bytes_of(shape: &burn::tensor::Shape, dtype: burn::tensor::DType) -> u64 {
    (shape.num_elements() * dtype.size()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    #[test]
    fn a_recording_counts_each_class_and_its_bytes_and_nothing_outside_it() {
        let dev = Default::default();
        let x = Tensor::<TB, 2>::ones([3, 8], &dev);
        let w = Tensor::<TB, 2>::ones([5, 8], &dev);
        let project = || crate::kernels::linear(x.clone(), w.clone(), None);
        project(); // not recording: not counted
        let rec = record();
        project();
        project();
        let norm_w = Tensor::<TB, 1>::ones([8], &dev);
        crate::kernels::rms_norm(x.clone(), norm_w, 1e-6);
        let t = rec.take();
        assert_eq!(t.calls, [2, 0, 1, 0, 0, 0]);
        // Each projection reads its 5×8 f32 weight and 3×8 input.
        assert_eq!(t.bytes[0], 2 * (5 * 8 + 3 * 8) * 4);
        assert!(t.seconds[0] > 0.0 && t.seconds[1] == 0.0);
        assert_eq!(rec.take().calls, [0; 6], "take restarts");
        restart();
        drop(rec);
        project();
        assert!(!recording());
    }
}
