//! The wgpu adapters this machine offers, for the probe's record and the device rule.
//!
//! `auto` must never pick a software adapter (Mesa's lavapipe/llvmpipe, SwiftShader, WARP):
//! they exist for tests and are slower than the CPU backend. wgpu reports them as
//! `DeviceType::Cpu`.

use serde::{Deserialize, Serialize};

/// One adapter as wgpu describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterFacts {
    pub name: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` (software) or `other`.
    pub device_type: String,
    /// Graphics API: `vulkan`, `metal`, `dx12`, `gl`.
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    /// A software rasterizer (lavapipe, llvmpipe, SwiftShader, WARP).
    pub software: bool,
}

/// Every adapter wgpu can open here (Vulkan, Metal, DX12; not GL, which burn does not use),
/// in wgpu's order. Empty when there is no driver. Enumerated once per process (the probe,
/// its config hash and the device rule all ask).
pub fn adapters() -> Vec<AdapterFacts> {
    static ADAPTERS: std::sync::OnceLock<Vec<AdapterFacts>> = std::sync::OnceLock::new();
    ADAPTERS.get_or_init(enumerate).clone()
}

/// Whether the default wgpu adapter computes in f16 (WGSL's optional `shader-f16`; most
/// hardware has it, some adapters do not). Opens the adapter: call only to run on it.
pub fn supports_f16() -> bool {
    use burn::tensor::backend::Backend;
    <crate::device::dispatch::WgpuBackend as Backend>::supports_dtype(
        &burn::backend::wgpu::WgpuDevice::DefaultDevice,
        burn::tensor::DType::F16,
    )
}

fn enumerate() -> Vec<AdapterFacts> {
    let instance = ::wgpu::Instance::new(::wgpu::InstanceDescriptor {
        backends: ::wgpu::Backends::VULKAN | ::wgpu::Backends::METAL | ::wgpu::Backends::DX12,
        ..::wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found = cubecl::future::block_on(instance.enumerate_adapters(::wgpu::Backends::all()));
    found.iter().map(|a| facts(&a.get_info())).collect()
}

fn facts(info: &::wgpu::AdapterInfo) -> AdapterFacts {
    let device_type = match info.device_type {
        ::wgpu::DeviceType::DiscreteGpu => "discrete",
        ::wgpu::DeviceType::IntegratedGpu => "integrated",
        ::wgpu::DeviceType::VirtualGpu => "virtual",
        ::wgpu::DeviceType::Cpu => "cpu",
        ::wgpu::DeviceType::Other => "other",
    };
    let name_says_software = ["llvmpipe", "lavapipe", "swiftshader", "warp"]
        .iter()
        .any(|s| info.name.to_lowercase().contains(s));
    AdapterFacts {
        name: info.name.clone(),
        device_type: device_type.into(),
        backend: info.backend.to_string(),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        software: info.device_type == ::wgpu::DeviceType::Cpu || name_says_software,
    }
}
