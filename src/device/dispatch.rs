//! Runs backend-generic work on the backend of a [`Device`]: NdArray (f32) for the CPU,
//! burn's `Wgpu<f32, i32>` (fusion) on any Vulkan/Metal/DX12 adapter, and burn's
//! `Cuda<f32, i32>` (fusion + autotune) for an NVIDIA GPU when the binary is built with
//! `--features cuda`. Every backend implements the kernel seam ([`crate::kernels::Kernels`]).
//!
//! Rust has no generic closures, so the work is a value implementing [`BackendJob`] (or
//! [`AutodiffJob`] for training): its `run::<B>` is monomorphized once per backend built in,
//! and [`run_on`] picks one at run time.
//!
//! ```
//! use burn::prelude::*;
//! use medpipe::device::{run_on, BackendJob, Device, Target};
//! use medpipe::kernels::Kernels;
//!
//! struct Sum(Vec<f32>);
//! impl BackendJob for Sum {
//!     type Output = f32;
//!     fn run<B: Kernels>(self, device: B::Device, _target: Target) -> f32 {
//!         let n = self.0.len();
//!         let t = Tensor::<B, 1>::from_data(TensorData::new(self.0, [n]), &device);
//!         t.sum().into_scalar().elem()
//!     }
//! }
//! assert_eq!(run_on(Device::Cpu, Sum(vec![1.0, 2.0])).unwrap(), 3.0);
//! ```

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, NdArray};

use crate::device::choice::{Device, DeviceError};
use crate::device::dtype::{Precision, PrecisionError};
use crate::kernels::{AutodiffKernels, Kernels};

/// The CPU backend.
pub type CpuBackend = NdArray<f32>;
/// The wgpu backend (fused CubeCL kernels compiled to WGSL/SPIR-V).
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;
/// The CUDA backend (fused, autotuned CubeCL kernels).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

/// Where a job runs, for the records it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub device: Device,
    /// burn backend name: `ndarray`, `wgpu` or `cuda`.
    pub backend: &'static str,
}

/// Work generic over an inference backend.
pub trait BackendJob {
    type Output;
    /// Does the work on `device` of backend `B`.
    fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output;
}

/// Work generic over a training (autodiff) backend.
pub trait AutodiffJob {
    type Output;
    /// Does the work on `device` of backend `B` (its inner backend does the arithmetic).
    fn run<B: AutodiffKernels>(self, device: B::Device, target: Target) -> Self::Output;
}

/// Runs `job` on the backend of `device`.
///
/// # Errors
/// [`DeviceError::NotBuilt`] for a GPU in a binary built without `--features cuda`.
pub fn run_on<J: BackendJob>(device: Device, job: J) -> Result<J::Output, DeviceError> {
    match device {
        Device::Cpu => Ok(job.run::<CpuBackend>(NdArrayDevice::Cpu, cpu_target())),
        Device::Cuda(index) => cuda::run(index, job),
        Device::Wgpu => Ok(job.run::<WgpuBackend>(WgpuDevice::DefaultDevice, wgpu_target())),
    }
}

/// Runs `job` on the autodiff backend over the backend of `device`.
///
/// # Errors
/// As [`run_on`].
pub fn run_autodiff_on<J: AutodiffJob>(device: Device, job: J) -> Result<J::Output, DeviceError> {
    match device {
        Device::Cpu => Ok(job.run::<Autodiff<CpuBackend>>(NdArrayDevice::Cpu, cpu_target())),
        Device::Cuda(index) => cuda::run_autodiff(index, job),
        Device::Wgpu => {
            Ok(job.run::<Autodiff<WgpuBackend>>(WgpuDevice::DefaultDevice, wgpu_target()))
        }
    }
}

/// Runs `job` on the backend of `device` with `precision` as the device's default float dtype
/// (set before the job makes its first tensor).
///
/// # Errors
/// As [`run_on`]; the inner result is a precision the device does not support.
pub fn run_on_as<J: BackendJob>(
    device: Device,
    precision: Precision,
    job: J,
) -> Result<Result<J::Output, PrecisionError>, DeviceError> {
    struct AtPrecision<J>(J, Precision);
    impl<J: BackendJob> BackendJob for AtPrecision<J> {
        type Output = Result<J::Output, PrecisionError>;
        fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output {
            self.1.apply::<B>(&device, target.device)?;
            Ok(self.0.run::<B>(device, target))
        }
    }
    run_on(device, AtPrecision(job, precision))
}

/// [`run_autodiff_on`] with `precision` as the device's default float dtype: the frozen
/// model computes in it, while the trainable LoRA params stay f32 (`model::lora`).
///
/// # Errors
/// As [`run_on_as`].
pub fn run_autodiff_on_as<J: AutodiffJob>(
    device: Device,
    precision: Precision,
    job: J,
) -> Result<Result<J::Output, PrecisionError>, DeviceError> {
    struct AtPrecision<J>(J, Precision);
    impl<J: AutodiffJob> AutodiffJob for AtPrecision<J> {
        type Output = Result<J::Output, PrecisionError>;
        fn run<B: AutodiffKernels>(self, device: B::Device, target: Target) -> Self::Output {
            self.1.apply::<B>(&device, target.device)?;
            Ok(self.0.run::<B>(device, target))
        }
    }
    run_autodiff_on(device, AtPrecision(job, precision))
}

/// `device` as a device of backend `B`, when `B` is the backend [`run_on`] runs `device` on
/// (a data parallel run's further devices, inside a job already generic over `B`); `None`
/// when it is another backend's, or a GPU in a binary built without CUDA.
pub fn backend_device<B: burn::tensor::backend::Backend>(device: Device) -> Option<B::Device> {
    let any: Box<dyn std::any::Any> = match device {
        Device::Cpu => Box::new(NdArrayDevice::Cpu),
        Device::Wgpu => Box::new(WgpuDevice::DefaultDevice),
        Device::Cuda(index) => cuda::device(index)?,
    };
    any.downcast::<B::Device>().ok().map(|d| *d)
}

fn cpu_target() -> Target {
    Target {
        device: Device::Cpu,
        backend: "ndarray",
    }
}

fn wgpu_target() -> Target {
    Target {
        device: Device::Wgpu,
        backend: "wgpu",
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Autodiff;

    use super::{AutodiffJob, BackendJob, CudaBackend, Target};
    use crate::device::choice::{Device, DeviceError};

    fn target(index: usize) -> Target {
        Target {
            device: Device::Cuda(index),
            backend: "cuda",
        }
    }

    pub(super) fn run<J: BackendJob>(index: usize, job: J) -> Result<J::Output, DeviceError> {
        Ok(job.run::<CudaBackend>(CudaDevice { index }, target(index)))
    }

    pub(super) fn device(index: usize) -> Option<Box<dyn std::any::Any>> {
        Some(Box::new(CudaDevice { index }))
    }

    pub(super) fn run_autodiff<J: AutodiffJob>(
        index: usize,
        job: J,
    ) -> Result<J::Output, DeviceError> {
        Ok(job.run::<Autodiff<CudaBackend>>(CudaDevice { index }, target(index)))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::{AutodiffJob, BackendJob};
    use crate::device::choice::{Device, DeviceError};

    pub(super) fn run<J: BackendJob>(index: usize, _job: J) -> Result<J::Output, DeviceError> {
        Err(DeviceError::NotBuilt {
            device: Device::Cuda(index),
        })
    }

    pub(super) fn device(_index: usize) -> Option<Box<dyn std::any::Any>> {
        None
    }

    pub(super) fn run_autodiff<J: AutodiffJob>(
        index: usize,
        _job: J,
    ) -> Result<J::Output, DeviceError> {
        Err(DeviceError::NotBuilt {
            device: Device::Cuda(index),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;

    use super::*;
    use crate::device::choice::Device;

    #[test]
    fn a_device_converts_to_its_own_backends_device_type_only() {
        use burn::backend::ndarray::NdArrayDevice;
        assert_eq!(
            backend_device::<Autodiff<CpuBackend>>(Device::Cpu),
            Some(NdArrayDevice::Cpu)
        );
        assert_eq!(
            backend_device::<WgpuBackend>(Device::Wgpu),
            Some(WgpuDevice::DefaultDevice)
        );
        assert_eq!(backend_device::<CpuBackend>(Device::Wgpu), None);
        assert_eq!(backend_device::<WgpuBackend>(Device::Cpu), None);
    }

    /// Reports the backend's float dtype and the target it was given.
    struct WhereAmI;
    impl BackendJob for WhereAmI {
        type Output = (String, Target);
        fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output {
            let t = Tensor::<B, 1>::ones([2], &device);
            (format!("{:?}", t.dtype()), target)
        }
    }

    /// One gradient through the autodiff backend: d(sum(x²))/dx at x = 3 is 6.
    struct Grad;
    impl AutodiffJob for Grad {
        type Output = f32;
        fn run<B: AutodiffKernels>(self, device: B::Device, _target: Target) -> f32 {
            let x = Tensor::<B, 1>::from_data(TensorData::new(vec![3.0f32], [1]), &device)
                .require_grad();
            let grads = (x.clone() * x.clone()).sum().backward();
            x.grad(&grads)
                .map(|g| g.into_scalar().elem())
                .unwrap_or(f32::NAN)
        }
    }

    #[test]
    fn the_cpu_runs_on_ndarray_in_f32() {
        let (dtype, target) = run_on(Device::Cpu, WhereAmI).unwrap();
        assert_eq!(dtype, "F32");
        assert_eq!(target, cpu_target());
        assert_eq!(target.backend, "ndarray");
    }

    #[test]
    fn training_work_gets_an_autodiff_backend() {
        assert_eq!(run_autodiff_on(Device::Cpu, Grad).unwrap(), 6.0);
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_gpu_asked_of_a_cpu_build_is_refused_with_the_rebuild_command() {
        let err = run_on(Device::Cuda(0), WhereAmI).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
        assert!(matches!(
            run_autodiff_on(Device::Cuda(1), Grad).unwrap_err(),
            DeviceError::NotBuilt {
                device: Device::Cuda(1)
            }
        ));
    }
}
