//! Dynamic loss scaling for training with an f16 base (torch.amp.GradScaler's rule).
//!
//! In f16 a gradient below 6e-8 flushes to zero: with the loss a mean over thousands of
//! answer tokens, the per-logit gradients of a real run are about that small. So the loss is
//! multiplied by `scale` before the backward and the LoRA gradients (f32) divided by it
//! after. A step whose scaled gradients overflowed (inf or NaN) is skipped and the scale
//! halved; after [`GROWTH_INTERVAL`] good steps in a row it doubles. bf16 has f32's range
//! and f32 needs none, so only f16 runs carry a scaler. The scale lives on the device
//! ([`DeviceScaler`]), so no step waits for a read-back to learn it; a checkpoint saves
//! the host form ([`LossScaler`]).

use burn::prelude::*;
use burn::tensor::DType;
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

/// The scaler on the device, so a step needs no read-back to know its scale: the rule of
/// torch's `_amp_update_scale_` applied with tensors, read back into a [`LossScaler`] at
/// logging intervals and checkpoints.
#[derive(Debug, Clone)]
pub struct DeviceScaler<B: Backend> {
    /// `[scale, good_steps]`, f32 (both exact: powers of two and counts below 2^24).
    state: Tensor<B, 1>,
}

impl<B: Backend> DeviceScaler<B> {
    pub fn new(host: LossScaler, device: &B::Device) -> Self {
        let values = vec![host.scale as f32, host.good_steps as f32];
        Self {
            state: Tensor::from_data(TensorData::new(values, [2]), (device, DType::F32)),
        }
    }

    /// What the loss is multiplied by (`[1]`, f32).
    pub fn scale(&self) -> Tensor<B, 1> {
        self.state.clone().slice(0..1)
    }

    /// `[scale, good_steps]`, for the caller's read-back ([`DeviceScaler::read`]).
    pub fn values(&self) -> Tensor<B, 1> {
        self.state.clone()
    }

    /// The host form of [`DeviceScaler::values`] once read.
    pub fn read(values: [f64; 2]) -> LossScaler {
        LossScaler {
            scale: values[0],
            good_steps: values[1] as u32,
        }
    }

    /// Records a step whose scaled gradients were finite (`applied`, `[1]`) or not: an
    /// overflow halves the scale and restarts the count; [`GROWTH_INTERVAL`] good steps in
    /// a row double it.
    pub fn update(&mut self, applied: Tensor<B, 1, Bool>) {
        let scale = self.scale();
        let good = self.state.clone().slice(1..2).add_scalar(1.0);
        let grow = good.clone().equal_elem(GROWTH_INTERVAL as f64);
        let next_scale = scale.clone().mul_scalar(0.5).mask_where(
            applied.clone(),
            scale.clone().mask_where(grow.clone(), scale * 2.0),
        );
        let next_good = good
            .zeros_like()
            .mask_where(applied, good.mask_fill(grow, 0.0));
        self.state = Tensor::cat(vec![next_scale, next_good], 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's rule (`GradScaler.update` with `growth_interval` 2000), on the host.
    fn torch_rule(s: &mut LossScaler, finite: bool) {
        if !finite {
            s.scale *= 0.5;
            s.good_steps = 0;
            return;
        }
        s.good_steps += 1;
        if s.good_steps == GROWTH_INTERVAL {
            s.scale *= 2.0;
            s.good_steps = 0;
        }
    }

    #[test]
    fn the_device_scaler_follows_torchs_rule_an_overflow_halves_and_good_steps_double() {
        let dev = Default::default();
        let mut device = DeviceScaler::<crate::test_util::TB>::new(LossScaler::default(), &dev);
        let mut host = LossScaler::default();
        let flag = |f: bool| Tensor::<crate::test_util::TB, 1, Bool>::from_data([f], &dev);
        // Two overflows, a full growth interval, a restart, and one more overflow.
        let mut flags = vec![false, false];
        flags.extend(std::iter::repeat_n(true, GROWTH_INTERVAL as usize + 3));
        flags.extend([false, true]);
        let mut seen = Vec::new();
        for f in flags {
            torch_rule(&mut host, f);
            device.update(flag(f));
            let v = device
                .values()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .unwrap();
            assert_eq!(
                DeviceScaler::<crate::test_util::TB>::read([v[0], v[1]]),
                host
            );
            seen.push(host.scale);
        }
        // The scale went down twice, up once, and down again.
        assert_eq!(seen[1], 16384.0);
        assert_eq!(seen[2 + GROWTH_INTERVAL as usize - 1], 32768.0);
        assert_eq!(*seen.last().unwrap(), 16384.0);
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
