//! Dynamic loss scaling for training with an f16 base (torch.amp.GradScaler's rule).
//!
//! In f16 a gradient below 6e-8 flushes to zero: with the loss a mean over thousands of
//! answer tokens, the per-logit gradients of a real run are about that small. So the loss is
//! multiplied by `scale` before the backward and the LoRA gradients (f32) divided by it
//! after. A step whose scaled gradients overflowed (inf or NaN) is skipped and the scale
//! halved; after [`GROWTH_INTERVAL`] good steps in a row it doubles. bf16 has f32's range
//! and f32 needs none, so only f16 runs carry a scaler.

use serde::{Deserialize, Serialize};

/// The first scale (torch's default, 2^16).
pub const INIT_SCALE: f64 = 65536.0;
/// Good steps in a row after which the scale doubles (torch's default).
pub const GROWTH_INTERVAL: u32 = 2000;

/// The scale and its history, saved with each checkpoint so a resumed run scales exactly as
/// an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// What the loss is multiplied by before the backward.
    pub scale: f64,
    /// Steps applied since the scale last changed.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// Records a step whose scaled gradients were `finite` or not; returns whether the step
    /// is to be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflow_skips_the_step_and_halves_the_scale_and_good_steps_double_it() {
        let mut s = LossScaler::default();
        assert!(!s.update(false));
        assert_eq!(
            s,
            LossScaler {
                scale: 32768.0,
                good_steps: 0
            }
        );
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!(
            s,
            LossScaler {
                scale: 65536.0,
                good_steps: 0
            }
        );
        // An overflow restarts the count.
        s.update(true);
        s.update(false);
        assert_eq!(
            s,
            LossScaler {
                scale: 32768.0,
                good_steps: 0
            }
        );
    }

    /// Why f16 needs it: a gradient of 1e-9 reaching an f16 op flushes to zero, and the same
    /// gradient scaled by 2^16 survives and unscales to the f32 answer (wgpu in f16; lavapipe
    /// in CI, on `WgpuDevice::Cpu`, which this test binary computes in f16).
    #[test]
    fn a_gradient_too_small_for_f16_survives_when_the_loss_is_scaled() {
        use burn::backend::wgpu::WgpuDevice;
        use burn::backend::{Autodiff, Wgpu};
        use burn::prelude::*;
        use burn::tensor::DType;

        use crate::device::{Device, Precision};
        type W = Autodiff<Wgpu>;
        if !crate::test_util::wgpu_available(
            "a_gradient_too_small_for_f16_survives_when_the_loss_is_scaled",
        ) {
            return;
        }
        let dev = WgpuDevice::Cpu;
        Precision::F16.apply::<W>(&dev, Device::Wgpu).unwrap();
        // An f32 param (as LoRA's), through an f16 op (as the base's), into an f32 loss.
        let grad = |scale: f64| {
            let p = Tensor::<W, 1>::from_data(
                TensorData::new(vec![1.0f32; 4], [4]),
                (&dev, DType::F32),
            )
            .require_grad();
            let y = p.clone().cast(DType::F16).mul_scalar(3.0).cast(DType::F32);
            let loss = y.sum().mul_scalar(1e-9 * scale);
            let g = p.grad(&loss.backward()).unwrap();
            g.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0] as f64 / scale
        };
        assert_eq!(grad(1.0), 0.0, "unscaled, the gradient underflows in f16");
        let scaled = grad(INIT_SCALE);
        assert!((scaled / 3e-9 - 1.0).abs() < 1e-3, "scaled: {scaled:e}");
    }
}
