//! Device memory of the GPU a model runs on, two ways:
//!
//! - **NVML** (`nvmlDeviceGetMemoryInfo`): memory in use on the whole device (this process,
//!   any other, and the driver's reservations). Thread-safe, so a sampler thread can read it
//!   while the model runs.
//! - **The allocator** (cubecl's memory manager, `ComputeClient::memory_usage`): bytes this
//!   process's tensors occupy and bytes the pools hold. cubecl keeps one pool per stream,
//!   and a stream per thread, so it must be read on the thread that runs the model.
//!
//! On a CPU run neither applies, and every reading is `None` with [`DeviceMemory::note`]
//! saying why.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::choice::Device;
use crate::device::nvml::{Nvml, NvmlError};

/// What the allocator holds, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AllocatorUsage {
    /// Bytes of live tensors (no padding).
    pub bytes_in_use: u64,
    /// Bytes the memory pools hold on the device (≥ in use: padding and free pages).
    pub bytes_reserved: u64,
    /// Live allocations.
    pub allocations: u64,
}

/// Reads the device memory of one device (see the module doc).
#[derive(Debug)]
pub struct DeviceMemory {
    device: Device,
    /// NVML and the NVML index of the device, when NVML answers.
    nvml: Option<(Arc<Nvml>, usize)>,
    note: String,
}

impl DeviceMemory {
    /// Readings for `device`: none on the CPU, NVML (opened now) and the allocator on a GPU.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cpu => Self::cpu(),
            Device::Cuda(_) => Self::with_nvml(device, Nvml::open()),
            Device::Wgpu => Self {
                device,
                nvml: None,
                note: "device memory: wgpu adapter, no NVML reading; allocator: cubecl's memory manager of this process".into(),
            },
        }
    }

    fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            nvml: None,
            note: "cpu run: there is no device memory to measure (see the RSS figures)".into(),
        }
    }

    /// Readings for `device` with NVML as opened (or not) by the caller.
    pub fn with_nvml(device: Device, nvml: Result<Nvml, NvmlError>) -> Self {
        let Device::Cuda(cuda_index) = device else {
            return Self::cpu();
        };
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let index = nvml_index(cuda_index, visible.as_deref());
        let allocator = if cfg!(feature = "cuda") {
            "allocator: cubecl's memory manager of this process, read on the model's thread after loading and after each generate call"
        } else {
            "allocator: not read (this binary has no CUDA backend)"
        };
        match nvml {
            Ok(nvml) => Self {
                device,
                nvml: Some((Arc::new(nvml), index)),
                note: format!(
                    "device memory: NVML used memory of GPU {index} (NVML order) for {device}, device-wide (every process and the driver's reservations); {allocator}"
                ),
            },
            Err(e) => Self {
                device,
                nvml: None,
                note: format!("device memory: NVML unavailable ({e}); {allocator}"),
            },
        }
    }

    /// The device read.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Where the figures come from, or why they are absent.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// Memory in use on the device now (NVML, device-wide), bytes; `None` on the CPU or
    /// without NVML.
    pub fn used_bytes(&self) -> Option<u64> {
        self.nvml_reading().map(|m| m.used)
    }

    /// Memory free on the device now (NVML, the GPU that `CUDA_VISIBLE_DEVICES` maps the
    /// CUDA index to), bytes; `None` on the CPU or without NVML.
    pub fn free_bytes(&self) -> Option<u64> {
        self.nvml_reading().map(|m| m.free)
    }

    fn nvml_reading(&self) -> Option<super::nvml::MemoryInfo> {
        let (nvml, index) = self.nvml.as_ref()?;
        nvml.memory(*index)
            .map_err(|e| tracing::debug!(error = %e, "NVML memory query failed"))
            .ok()
    }

    /// What the allocator holds now; `None` on the CPU, in a build without CUDA, or when the
    /// runtime does not answer. Call it on the thread that runs the model.
    pub fn allocator(&self) -> Option<AllocatorUsage> {
        match self.device {
            Device::Cpu => None,
            Device::Cuda(index) => allocator_usage(index),
            Device::Wgpu => Some(wgpu_allocator_usage()),
        }
    }
}

/// The NVML index of CUDA device `cuda_index`: the `cuda_index`-th entry of a numeric
/// `CUDA_VISIBLE_DEVICES` list, else `cuda_index` itself (NVML counts in PCI bus order; so
/// does CUDA with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and on single-GPU machines).
fn nvml_index(cuda_index: usize, visible: Option<&str>) -> usize {
    visible
        .and_then(|v| {
            v.split(',')
                .map(|s| s.trim().parse::<usize>().ok())
                .collect::<Option<Vec<_>>>()
        })
        .and_then(|list| list.get(cuda_index).copied())
        .unwrap_or(cuda_index)
}

#[cfg(feature = "cuda")]
fn allocator_usage(index: usize) -> Option<AllocatorUsage> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice { index });
    match client.memory_usage() {
        Ok(u) => Some(AllocatorUsage {
            bytes_in_use: u.bytes_in_use,
            bytes_reserved: u.bytes_reserved,
            allocations: u.number_allocs,
        }),
        Err(e) => {
            tracing::debug!(error = ?e, "cubecl memory_usage failed");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn allocator_usage(_index: usize) -> Option<AllocatorUsage> {
    None
}

/// cubecl's allocator on wgpu's default adapter (the one [`Device::Wgpu`] runs on).
fn wgpu_allocator_usage() -> AllocatorUsage {
    use cubecl::Runtime;
    let client = cubecl::wgpu::WgpuRuntime::client(&cubecl::wgpu::WgpuDevice::DefaultDevice);
    match client.memory_usage() {
        Ok(u) => AllocatorUsage {
            bytes_in_use: u.bytes_in_use,
            bytes_reserved: u.bytes_reserved,
            allocations: u.number_allocs,
        },
        Err(e) => {
            tracing::debug!(error = ?e, "cubecl memory_usage failed");
            AllocatorUsage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_run_reads_nothing_and_says_why() {
        let m = DeviceMemory::for_device(Device::Cpu);
        assert_eq!(m.used_bytes(), None);
        assert_eq!(m.allocator(), None);
        assert!(m.note().starts_with("cpu run"), "{}", m.note());
    }

    #[test]
    fn a_gpu_without_nvml_reads_nothing_and_names_the_cause() {
        let missing = Nvml::open_from(&["libmedpipe-no-such-nvml.so"]);
        let m = DeviceMemory::with_nvml(Device::Cuda(0), missing);
        assert_eq!(m.used_bytes(), None);
        assert!(m.note().contains("NVML unavailable"), "{}", m.note());
        assert!(m.note().contains("not found"), "{}", m.note());
        if !cfg!(feature = "cuda") {
            assert_eq!(m.allocator(), None);
        }
    }

    #[test]
    fn cuda_visible_devices_maps_cuda_indices_to_nvml_indices() {
        assert_eq!(nvml_index(0, None), 0);
        assert_eq!(nvml_index(1, Some("3,2")), 2);
        assert_eq!(nvml_index(0, Some("GPU-8f1c,GPU-aa")), 0, "UUIDs: identity");
        assert_eq!(nvml_index(4, Some("3,2")), 4, "out of the list: identity");
    }
}
