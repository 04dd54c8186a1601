//! The device model work runs on, and running backend-generic code there.
//!
//! - `choice`: the device rule (`auto`, `cpu`, `cuda`, `cuda:N`, `wgpu`) shared by the probe stage,
//!   the model stages and the CLI
//! - `dispatch`: [`run_on`] / [`run_autodiff_on`] run a [`BackendJob`] / [`AutodiffJob`] on
//!   NdArray, burn's Wgpu backend or, with `--features cuda`, burn's Cuda backend
//! - `wgpu`: the wgpu adapters of this machine (name, type, driver; software or not)
//! - `nvml`: NVML loaded at run time (GPU list, memory in use)
//! - `memory`: device memory of a running model (NVML and cubecl's allocator)

pub mod choice;
pub mod dispatch;
pub mod dtype;
pub mod memory;
pub mod nvml;
pub mod wgpu;

pub use choice::{choose_device, resolve, Device, DeviceError, Placement};
pub use dispatch::{
    backend_device, run_autodiff_on, run_autodiff_on_as, run_on, run_on_as, AutodiffJob,
    BackendJob, Target,
};
pub use dtype::{compute_dtype, dtype_name, float_dtype, Precision, PrecisionError};
pub use memory::{AllocatorUsage, DeviceMemory};
