//! Which device model work runs on: the setting (`auto`, `cpu`, `cuda`, `cuda:N`, from
//! `probe.device` or a `--device` flag) resolved against this machine (NVML's GPU list) and
//! this binary (built with the `cuda` feature or not). One rule for the probe stage, every
//! stage that runs the model, and the `bench`/`generate`/`forward` commands.

use std::path::Path;

use crate::device::nvml::GpuProbe;
use crate::device::wgpu::AdapterFacts;

/// GPU memory assumed for a model whose weights are not on disk yet, MiB (a 7B model in
/// bf16 with activations and cache).
const UNKNOWN_MODEL_MIB: u64 = 20_480;
/// GPU memory needed per byte of weights on disk: activations and KV cache come on top.
const WEIGHTS_OVERHEAD: f64 = 1.3;

/// A device model work can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// burn's NdArray backend, f32.
    Cpu,
    /// burn's Cuda backend on this CUDA device index.
    Cuda(usize),
    /// burn's Wgpu backend (fusion on) on wgpu's default adapter: Vulkan, Metal or DX12, any
    /// vendor, and software adapters such as Mesa's lavapipe when nothing else exists.
    Wgpu,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{given}` (expected auto, cpu, cuda, cuda:N or wgpu)")]
    Unknown { given: String },
    #[error("device {device} requested, but this binary was built without CUDA (rebuild with `cargo build --release --features cuda`)")]
    NotBuilt { device: Device },
    #[error("device {device} requested, but NVML lists {count} GPU(s)")]
    NoSuchGpu { device: Device, count: usize },
    #[error("device {device} requested, but no GPU can be seen: {why}")]
    NoGpu { device: Device, why: String },
    #[error("device wgpu requested, but wgpu finds no adapter (no Vulkan, Metal or DX12 driver; on Debian `apt-get install mesa-vulkan-drivers` gives a software one)")]
    NoWgpuAdapter,
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N` (`auto` is resolved by [`choose_device`]).
    ///
    /// # Errors
    /// Anything else, with the accepted forms.
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "wgpu" => Ok(Self::Wgpu),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(DeviceError::Unknown {
                    given: s.to_string(),
                }),
            },
        }
    }

    /// Whether this is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Wgpu => write!(f, "wgpu"),
        }
    }
}

/// A resolved device and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    /// `requested explicitly`, or the `auto` rule's reason.
    pub reason: String,
}

/// Whether this binary has the CUDA backend (`--features cuda`).
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// The device rule: an explicit choice wins (checked against what exists); `auto` takes the
/// first GPU with `need_mib` free when the binary has CUDA, else the CPU.
///
/// # Errors
/// An unknown device string, CUDA asked of a binary built without it, or a GPU index that
/// NVML does not list.
pub fn choose_device(
    wanted: &str,
    gpu: &GpuProbe,
    need_mib: u64,
    cuda_built: bool,
) -> Result<(Device, String), DeviceError> {
    if wanted != "auto" {
        let device = Device::parse(wanted)?;
        if let Device::Cuda(n) = device {
            if !cuda_built {
                return Err(DeviceError::NotBuilt { device });
            }
            // NVML ships with the NVIDIA driver: without it there is no GPU to run on, and the
            // CUDA runtime would fail later with a panic instead of this message.
            if let (true, Some(why)) = (gpu.gpus.is_empty(), &gpu.note) {
                return Err(DeviceError::NoGpu {
                    device,
                    why: why.clone(),
                });
            }
            if n >= gpu.gpus.len() {
                return Err(DeviceError::NoSuchGpu {
                    device,
                    count: gpu.gpus.len(),
                });
            }
        }
        return Ok((device, "requested explicitly".into()));
    }
    if gpu.gpus.is_empty() {
        let why = gpu.note.clone().unwrap_or_else(|| "no GPU found".into());
        return Ok((Device::Cpu, format!("auto: {why}")));
    }
    if !cuda_built {
        return Ok((
            Device::Cpu,
            "auto: GPU present but this binary was built without the `cuda` feature".into(),
        ));
    }
    let need = need_mib << 20;
    match gpu.gpus.iter().find(|g| g.memory_free_bytes >= need) {
        Some(g) => Ok((
            Device::Cuda(g.index),
            format!(
                "auto: {} has {} MiB free, model needs ~{need_mib} MiB",
                g.name,
                g.memory_free_bytes >> 20
            ),
        )),
        None => Ok((
            Device::Cpu,
            format!("auto: no GPU has the ~{need_mib} MiB the model needs free"),
        )),
    }
}

/// [`choose_device`] plus wgpu: an explicit `wgpu` needs an adapter, and `auto` takes a
/// hardware wgpu adapter when CUDA is not there to take, never a software one (lavapipe is
/// for tests, and slower than the CPU backend). `adapters` is asked only when needed.
///
/// # Errors
/// As [`choose_device`]; [`DeviceError::NoWgpuAdapter`] for `wgpu` without an adapter.
pub fn choose_with_wgpu(
    wanted: &str,
    gpu: &GpuProbe,
    need_mib: u64,
    cuda_built: bool,
    adapters: impl Fn() -> Vec<AdapterFacts>,
) -> Result<(Device, String), DeviceError> {
    let (device, reason) = choose_device(wanted, gpu, need_mib, cuda_built)?;
    if device == Device::Wgpu && adapters().is_empty() {
        return Err(DeviceError::NoWgpuAdapter);
    }
    if wanted == "auto" && device == Device::Cpu && (!cuda_built || gpu.gpus.is_empty()) {
        if let Some(a) = adapters().into_iter().find(|a| !a.software) {
            let why = format!(
                "auto: wgpu adapter {} ({}, {})",
                a.name, a.device_type, a.backend
            );
            return Ok((Device::Wgpu, why));
        }
    }
    Ok((device, reason))
}

/// Resolves `wanted` on this machine for the model at `model` (a source such as
/// `builtin:tiny` or a directory): GPUs from NVML, the memory need from
/// `min_gpu_memory_mib` (0: [`estimate_model_mib`]). NVML is not asked for `cpu`.
///
/// # Errors
/// As [`choose_device`].
pub fn resolve(
    wanted: &str,
    min_gpu_memory_mib: u64,
    model: &str,
) -> Result<Placement, DeviceError> {
    if wanted == "cpu" {
        return Ok(Placement {
            device: Device::Cpu,
            reason: "requested explicitly".into(),
        });
    }
    let gpu = crate::device::nvml::probe();
    let need = if min_gpu_memory_mib > 0 {
        min_gpu_memory_mib
    } else {
        estimate_model_mib(model)
    };
    let (device, reason) = choose_with_wgpu(
        wanted,
        &gpu,
        need,
        cuda_built(),
        crate::device::wgpu::adapters,
    )?;
    tracing::info!(%device, %reason, "device chosen");
    Ok(Placement { device, reason })
}

/// GPU memory a model source needs, in MiB: weights on disk × [`WEIGHTS_OVERHEAD`], or
/// [`UNKNOWN_MODEL_MIB`] when the weights are not on disk yet.
pub fn estimate_model_mib(source: &str) -> u64 {
    if source.starts_with("builtin:") {
        return 256;
    }
    let dir = Path::new(source);
    if !dir.is_dir() {
        return UNKNOWN_MODEL_MIB;
    }
    let bytes: u64 = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    if bytes == 0 {
        UNKNOWN_MODEL_MIB
    } else {
        (bytes as f64 * WEIGHTS_OVERHEAD / (1u64 << 20) as f64).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::nvml::GpuInfo;

    fn h100(free_gib: u64) -> GpuProbe {
        GpuProbe {
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H100".into(),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: free_gib << 30,
                compute_capability: [9, 0],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn explicit_device_wins() {
        let (d, why) = choose_device("cpu", &h100(80), 100, true).unwrap();
        assert_eq!(d, Device::Cpu);
        assert_eq!(why, "requested explicitly");
    }

    #[test]
    fn auto_picks_a_gpu_with_enough_memory_when_built_with_cuda() {
        let (d, _) = choose_device("auto", &h100(80), 20_000, true).unwrap();
        assert_eq!(d, Device::Cuda(0));
        let (d, why) = choose_device("auto", &h100(4), 20_000, true).unwrap();
        assert_eq!(d, Device::Cpu);
        assert!(why.contains("20000 MiB"), "{why}");
    }

    #[test]
    fn auto_without_cuda_build_or_gpu_falls_back_to_cpu_with_reason() {
        let (d, why) = choose_device("auto", &h100(80), 1, false).unwrap();
        assert_eq!(d, Device::Cpu);
        assert!(why.contains("without the `cuda` feature"), "{why}");
        let none = GpuProbe {
            note: Some("NVML not found".into()),
            ..Default::default()
        };
        let (d, why) = choose_device("auto", &none, 1, true).unwrap();
        assert_eq!(d, Device::Cpu);
        assert!(why.contains("NVML not found"));
    }

    #[test]
    fn cuda_requested_of_a_cpu_build_is_an_error() {
        let err = choose_device("cuda:0", &h100(80), 1, false).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }

    #[test]
    fn cuda_requested_where_no_driver_is_found_is_an_error_with_the_reason() {
        let none = GpuProbe {
            note: Some("NVML (libnvidia-ml) not found".into()),
            ..Default::default()
        };
        let err = choose_device("cuda", &none, 1, true).unwrap_err();
        assert!(matches!(err, DeviceError::NoGpu { .. }), "{err}");
        assert!(err.to_string().contains("libnvidia-ml"), "{err}");
    }

    #[test]
    fn a_gpu_index_nvml_does_not_list_is_an_error() {
        let err = choose_device("cuda:1", &h100(80), 1, true).unwrap_err();
        assert!(
            matches!(err, DeviceError::NoSuchGpu { count: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn device_strings_parse_or_explain() {
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert!(Device::parse("tpu")
            .unwrap_err()
            .to_string()
            .contains("expected auto, cpu, cuda"));
        assert!(Device::parse("cuda:x").is_err());
        assert_eq!(Device::parse("wgpu").unwrap(), Device::Wgpu);
        assert_eq!(Device::Wgpu.to_string(), "wgpu");
    }

    fn adapter(name: &str, device_type: &str, software: bool) -> AdapterFacts {
        AdapterFacts {
            name: name.into(),
            device_type: device_type.into(),
            backend: "vulkan".into(),
            driver: String::new(),
            driver_info: String::new(),
            software,
        }
    }

    #[test]
    fn auto_never_picks_a_software_wgpu_adapter_but_takes_a_hardware_one() {
        let none = GpuProbe::default();
        let lavapipe = || vec![adapter("llvmpipe (LLVM 15.0.6, 256 bits)", "cpu", true)];
        let (d, _) = choose_with_wgpu("auto", &none, 1, false, lavapipe).unwrap();
        assert_eq!(d, Device::Cpu);
        let radeon = || vec![adapter("AMD Radeon RX 7900", "discrete", false)];
        let (d, why) = choose_with_wgpu("auto", &none, 1, false, radeon).unwrap();
        assert_eq!(d, Device::Wgpu);
        assert!(why.contains("AMD Radeon RX 7900"), "{why}");
        // A CUDA build with a free NVIDIA GPU keeps CUDA.
        let (d, _) = choose_with_wgpu("auto", &h100(80), 1, true, radeon).unwrap();
        assert_eq!(d, Device::Cuda(0));
    }

    #[test]
    fn explicit_wgpu_takes_a_software_adapter_and_needs_one() {
        let none = GpuProbe::default();
        let lavapipe = || vec![adapter("llvmpipe", "cpu", true)];
        let (d, why) = choose_with_wgpu("wgpu", &none, 1, false, lavapipe).unwrap();
        assert_eq!((d, why.as_str()), (Device::Wgpu, "requested explicitly"));
        let err = choose_with_wgpu("wgpu", &none, 1, false, Vec::new).unwrap_err();
        assert!(matches!(err, DeviceError::NoWgpuAdapter), "{err}");
        assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");
    }

    #[test]
    fn resolving_cpu_never_asks_nvml() {
        let p = resolve("cpu", 0, "builtin:tiny").unwrap();
        assert_eq!(p.device, Device::Cpu);
        assert_eq!(p.reason, "requested explicitly");
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_cpu_build_resolves_auto_to_the_cpu_and_refuses_cuda() {
        assert_eq!(
            resolve("auto", 0, "builtin:tiny").unwrap().device,
            Device::Cpu
        );
        let err = resolve("cuda", 0, "builtin:tiny").unwrap_err();
        assert!(matches!(err, DeviceError::NotBuilt { .. }), "{err}");
    }

    #[test]
    fn the_memory_estimate_scales_the_weights_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            estimate_model_mib(tmp.path().to_str().unwrap()),
            UNKNOWN_MODEL_MIB
        );
        std::fs::write(tmp.path().join("model.safetensors"), vec![0u8; 10 << 20]).unwrap();
        assert_eq!(estimate_model_mib(tmp.path().to_str().unwrap()), 13);
        assert_eq!(estimate_model_mib("builtin:tiny"), 256);
    }
}
