//! The float precision model work computes in (`--dtype`): f32 everywhere; f16 on wgpu and
//! CUDA; bf16 on CUDA only (WGSL has no bf16, NdArray computes in f32).
//!
//! It is the backend device's default float dtype, set before the first tensor is made, so
//! weights load and activations flow in that dtype while the model keeps transformers' f32
//! islands (RMSNorm variance, rotary tables, the loss) by explicit casts.

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

    /// Whether `device` can compute in this precision: f32 everywhere; half precision not on
    /// the CPU (burn would find out only at the first op, with a panic).
    ///
    /// # Errors
    /// [`PrecisionError::Unsupported`] for f16 or bf16 on the CPU.
    pub fn supported_on(self, device: Device) -> Result<(), PrecisionError> {
        if self != Self::F32 && device == Device::Cpu {
            return Err(PrecisionError::Unsupported {
                dtype: self,
                device: device.to_string(),
                reason: "the CPU backend computes in f32".into(),
            });
        }
        Ok(())
    }

    /// Makes this the default float dtype of `device` (backend `B`, the device `target`).
    /// Call before any tensor is created there. f32 is the default already.
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
            Self::F32 => return Ok(()),
            Self::F16 => FloatDType::F16,
            Self::Bf16 => FloatDType::BF16,
        };
        // Both GPU backends built here (`Wgpu<f32, i32>`, `Cuda<f32, i32>`) use i32 ints.
        burn::tensor::set_default_dtypes::<B>(device, float, IntDType::I32).map_err(|e| {
            PrecisionError::Unsupported {
                dtype: self,
                device: target.to_string(),
                reason: format!("{e:?}"),
            }
        })
    }
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
    }
}
