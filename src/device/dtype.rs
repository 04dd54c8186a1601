//! The float precision model work computes in (`--dtype`): f32 everywhere; f16 on wgpu and
//! CUDA; bf16 on CUDA only (WGSL has no bf16, NdArray computes in f32).
//!
//! It is the backend device's default float dtype, set before the first tensor is made, so
//! weights load and activations flow in that dtype while the model keeps transformers' f32
//! islands (RMSNorm variance, rotary tables, the loss) by explicit casts.

use burn::tensor::backend::DeviceError;
use burn::tensor::{DType, FloatDType, IntDType};

use crate::device::choice::Device;
use crate::kernels::Kernels;

/// A compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

/// Errors setting a precision.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error("unknown dtype `{0}` (expected f32, f16 or bf16)")]
    Unknown(String),
    #[error("dtype {dtype} is not supported on {device} ({reason}); f32 runs everywhere, f16 on wgpu and cuda, bf16 on cuda")]
    Unsupported {
        dtype: Precision,
        device: String,
        reason: String,
    },
}

impl Precision {
    /// Parses `f32`, `f16` or `bf16`.
    ///
    /// # Errors
    /// Anything else, naming the accepted values.
    pub fn parse(s: &str) -> Result<Self, PrecisionError> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(PrecisionError::Unknown(s.to_string())),
        }
    }

    /// The burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Whether `device` can compute in this precision: f32 everywhere, f16 on GPUs, bf16 on
    /// CUDA (burn would find out only at the first op, with a panic).
    ///
    /// # Errors
    /// [`PrecisionError::Unsupported`] for f16 or bf16 on the CPU, bf16 on wgpu.
    pub fn supported_on(self, device: Device) -> Result<(), PrecisionError> {
        let reason = match (self, device) {
            (Self::F16 | Self::Bf16, Device::Cpu) => "the CPU backend computes in f32",
            (Self::Bf16, Device::Wgpu) => "WGSL has no bf16",
            _ => return Ok(()),
        };
        Err(PrecisionError::Unsupported {
            dtype: self,
            device: device.to_string(),
            reason: reason.into(),
        })
    }

    /// Makes this the default float dtype of `device` (backend `B`, the device `target`).
    /// burn fixes a device's dtype once per process, at its first tensor: a device already
    /// computing in this precision (an earlier stage of the same run) is accepted, one
    /// fixed to another is refused rather than computing silently in the wrong one.
    ///
    /// # Errors
    /// As [`Precision::supported_on`]; a dtype the backend does not support, or a device
    /// already fixed to another dtype.
    pub fn apply<B: Kernels>(
        self,
        device: &B::Device,
        target: Device,
    ) -> Result<(), PrecisionError> {
        self.supported_on(target)?;
        let float = match self {
            Self::F32 => FloatDType::F32,
            Self::F16 => FloatDType::F16,
            Self::Bf16 => FloatDType::BF16,
        };
        let refused = |reason: String| PrecisionError::Unsupported {
            dtype: self,
            device: target.to_string(),
            reason,
        };
        // Both GPU backends built here (`Wgpu<f32, i32>`, `Cuda<f32, i32>`) use i32 ints;
        // f32 is every backend's default, so it needs no setting, only the check below.
        if self != Self::F32 {
            match burn::tensor::set_default_dtypes::<B>(device, float, IntDType::I32) {
                Ok(()) => return Ok(()),
                Err(DeviceError::AlreadyInitialized { .. }) => {}
                Err(e) => return Err(refused(e.to_string())),
            }
        }
        let current = burn::tensor::get_device_settings::<B>(device).float_dtype;
        if current == float {
            Ok(())
        } else {
            Err(refused(format!(
                "this process already computes in {current:?} there; a device's precision \
                 is fixed at its first tensor"
            )))
        }
    }
}

/// The float `B` makes tensors in on `device`: what a `--dtype` or `model.dtype` set.
pub fn float_dtype<B: burn::tensor::backend::Backend>(device: &B::Device) -> DType {
    burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into()
}

/// [`float_dtype`] as the records a run writes name it (`f32`, `f16`, `bf16`).
pub fn compute_dtype<B: burn::tensor::backend::Backend>(device: &B::Device) -> String {
    dtype_name(float_dtype::<B>(device))
}

/// `f32`, `f16`, `bf16`: burn's name of `dtype` in lower case.
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_parse_or_name_the_accepted_values() {
        assert_eq!(Precision::parse("f16").unwrap(), Precision::F16);
        assert_eq!(Precision::parse("bfloat16").unwrap(), Precision::Bf16);
        let err = Precision::parse("fp8").unwrap_err().to_string();
        assert!(err.contains("f32, f16 or bf16"), "{err}");
    }

    #[test]
    fn the_cpu_refuses_half_precision_with_the_reason() {
        let dev = Default::default();
        let err = Precision::F16
            .apply::<burn::backend::NdArray<f32>>(&dev, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("computes in f32"), "{err}");
        assert!(Precision::F32
            .apply::<burn::backend::NdArray<f32>>(&dev, Device::Cpu)
            .is_ok());
        assert!(Precision::Bf16.supported_on(Device::Cpu).is_err());
        assert!(Precision::F16.supported_on(Device::Wgpu).is_ok());
        let err = Precision::Bf16.supported_on(Device::Wgpu).unwrap_err();
        assert!(err.to_string().contains("WGSL has no bf16"), "{err}");
        assert!(Precision::Bf16.supported_on(Device::Cuda(0)).is_ok());
    }

    /// burn fixes a device's dtype at its first tensor. A second stage of the same run asking
    /// for the same precision proceeds; asking for another is refused, never run silently in
    /// the first one. (`WgpuDevice::Cpu`, lavapipe in CI: no other test uses that device.)
    #[test]
    fn a_device_keeps_its_first_precision_and_refuses_another() {
        use crate::device::dispatch::WgpuBackend;
        if !crate::test_util::wgpu_available(
            "a_device_keeps_its_first_precision_and_refuses_another",
        ) {
            return;
        }
        let dev = burn::backend::wgpu::WgpuDevice::Cpu;
        Precision::F16
            .apply::<WgpuBackend>(&dev, Device::Wgpu)
            .unwrap();
        assert_eq!(compute_dtype::<WgpuBackend>(&dev), "f16");
        Precision::F16
            .apply::<WgpuBackend>(&dev, Device::Wgpu)
            .unwrap();
        let err = Precision::F32
            .apply::<WgpuBackend>(&dev, Device::Wgpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already computes in F16"), "{err}");
        assert_eq!(compute_dtype::<WgpuBackend>(&dev), "f16");
    }

    #[test]
    fn the_compute_dtype_is_the_devices_default_float() {
        let dev = Default::default();
        assert_eq!(compute_dtype::<burn::backend::NdArray<f32>>(&dev), "f32");
    }
}
