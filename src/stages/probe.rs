//! probe: what machine is this, and which device will the later stages use?
//!
//! Writes `reports/environment.json`. GPUs are read through NVML, loaded at run time
//! (`libnvidia-ml.so.1`), so the same binary runs on machines without a driver: no NVML or
//! no GPU gives an empty list and the reason, never an error.

use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::pipeline::{Stage, StageCtx, StageOutput};

/// `[probe]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// `auto` (CUDA when a GPU with enough memory is present and the binary has CUDA, else
    /// CPU), `cpu`, `cuda` or `cuda:N`. `medpipe run --device` sets this.
    #[serde(default = "default_device")]
    pub device: String,
    /// GPU memory the model needs, in MiB; 0 = estimate from the model's weight files
    /// (×1.3 for activations and cache), or 20,480 MiB when they are not on disk yet.
    #[serde(default)]
    pub min_gpu_memory_mib: u64,
}

fn default_device() -> String {
    "auto".into()
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            device: default_device(),
            min_gpu_memory_mib: 0,
        }
    }
}

/// A device the later stages can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// e.g. `[9, 0]` for Hopper.
    pub compute_capability: [i32; 2],
}

/// What NVML said about the machine's GPUs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct GpuProbe {
    pub gpus: Vec<GpuInfo>,
    pub driver_version: Option<String>,
    /// CUDA version the driver supports, e.g. `13.0`.
    pub cuda_version: Option<String>,
    /// Why the list is empty, when it is.
    pub note: Option<String>,
}

/// What NVML reports about the machine's GPUs now (empty with a note where there is no
/// driver); the benchmark records it as the platform.
pub fn gpu_probe() -> GpuProbe {
    nvml::probe()
}

/// Backends compiled into this binary.
pub fn built_backends() -> Vec<&'static str> {
    let mut b = vec!["ndarray (cpu)"];
    if cfg!(feature = "cuda") {
        b.push("cuda");
    }
    b
}

/// The probe stage.
pub struct Probe;

impl Stage for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn description(&self) -> &'static str {
        "record OS, CPU, RAM, disk, GPUs (NVML), backends; choose the device"
    }
    fn artifact_file(&self) -> &'static str {
        "environment.json"
    }
    fn upstream(&self) -> &'static [&'static str] {
        &[]
    }
    fn config_sections(&self) -> Vec<&'static str> {
        vec!["probe", "model"]
    }
    fn code_version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        use sysinfo::{Disks, System};
        let cfg = &ctx.config().probe;
        let mut sys = System::new();
        sys.refresh_memory();
        sys.refresh_cpu_all();
        let cpu_model = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
        let disk_free = free_disk_bytes(&Disks::new_with_refreshed_list(), ctx.workspace().root());
        let gpu = nvml::probe();

        let need_mib = if cfg.min_gpu_memory_mib > 0 {
            cfg.min_gpu_memory_mib
        } else {
            estimate_model_mib(&ctx.config().model.source)
        };
        let (device, reason) = choose_device(&cfg.device, &gpu, need_mib, cfg!(feature = "cuda"))?;

        let metrics = json!({
            "os": {
                "name": System::name(),
                "version": System::long_os_version(),
                "kernel": System::kernel_version(),
                "arch": std::env::consts::ARCH,
                "hostname": System::host_name(),
            },
            "cpu": {
                "model": cpu_model,
                "physical_cores": sys.physical_core_count(),
                "logical_threads": sys.cpus().len(),
            },
            "memory": {
                "total_bytes": sys.total_memory(),
                "available_bytes": sys.available_memory(),
            },
            "disk": {
                "workspace": ctx.workspace().root(),
                "free_bytes": disk_free,
            },
            "gpu": gpu,
            "backends_built": built_backends(),
            "versions": {
                "medpipe": env!("CARGO_PKG_VERSION"),
                "rustc": option_env!("MEDPIPE_RUSTC_VERSION"),
                "burn": "0.21.0",
                "git_commit": crate::pipeline::runner::git_commit(),
            },
            "model_memory_needed_mib": need_mib,
            "device": device.to_string(),
            "device_reason": reason,
        });
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let mut summary = vec![
            ("device".into(), format!("{device} ({reason})")),
            (
                "cpu".into(),
                format!("{cpu_model}, {} threads", sys.cpus().len()),
            ),
            (
                "ram".into(),
                format!(
                    "{} total, {} available",
                    gib(sys.total_memory()),
                    gib(sys.available_memory())
                ),
            ),
            (
                "disk free".into(),
                disk_free.map(gib).unwrap_or_else(|| "unknown".into()),
            ),
        ];
        summary.push((
            "gpus".into(),
            if gpu.gpus.is_empty() {
                format!("none ({})", gpu.note.clone().unwrap_or_default())
            } else {
                gpu.gpus
                    .iter()
                    .map(|g| format!("{} ({})", g.name, gib(g.memory_total_bytes)))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ));
        Ok(StageOutput {
            metrics,
            summary,
            ..Default::default()
        })
    }
}

/// Free bytes on the filesystem holding `path` (the mount with the longest matching prefix).
fn free_disk_bytes(disks: &sysinfo::Disks, path: &Path) -> Option<u64> {
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// GPU memory a model source needs, in MiB: weights on disk × 1.3, or a 7B-sized guess when
/// the weights are not on disk yet.
fn estimate_model_mib(source: &str) -> u64 {
    const UNKNOWN_MIB: u64 = 20_480;
    if source.starts_with("builtin:") {
        return 256;
    }
    let dir = Path::new(source);
    if !dir.is_dir() {
        return UNKNOWN_MIB;
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
        UNKNOWN_MIB
    } else {
        (bytes as f64 * 1.3 / (1u64 << 20) as f64).ceil() as u64
    }
}

/// The device rule: an explicit choice wins (checked against what exists); `auto` takes the
/// first GPU with enough free memory when the binary has CUDA, else the CPU.
///
/// # Errors
/// An unknown device string, CUDA asked of a binary built without it, or a GPU index that
/// does not exist.
pub fn choose_device(
    wanted: &str,
    gpu: &GpuProbe,
    need_mib: u64,
    cuda_built: bool,
) -> anyhow::Result<(Device, String)> {
    if wanted != "auto" {
        let d = Device::parse(wanted)?;
        if let Device::Cuda(n) = d {
            if !cuda_built {
                bail!("device {d} requested, but this binary was built without CUDA (rebuild with `cargo build --release --features cuda`)");
            }
            if n >= gpu.gpus.len() && gpu.note.is_none() {
                bail!(
                    "device {d} requested, but NVML lists {} GPU(s)",
                    gpu.gpus.len()
                );
            }
        }
        return Ok((d, "requested explicitly".into()));
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

/// NVML through `dlopen`: the only GPU dependency the default build has.
mod nvml {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    use super::{GpuInfo, GpuProbe};

    #[repr(C)]
    struct Memory {
        total: u64,
        free: u64,
        used: u64,
    }

    type Device = *mut c_void;

    pub(super) fn probe() -> GpuProbe {
        match unsafe { probe_inner() } {
            Ok(p) => p,
            Err(note) => GpuProbe {
                note: Some(note),
                ..Default::default()
            },
        }
    }

    /// # Safety
    /// Calls NVML C functions with the signatures of nvml.h (v2 entry points).
    unsafe fn probe_inner() -> Result<GpuProbe, String> {
        let lib = ["libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"]
            .iter()
            .find_map(|n| libloading::Library::new(n).ok())
            .ok_or("NVML (libnvidia-ml) not found: no NVIDIA driver on this machine")?;
        macro_rules! sym {
            ($name:literal, $t:ty) => {
                *lib.get::<$t>($name)
                    .map_err(|e| format!("NVML lacks {}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        let init = sym!(b"nvmlInit_v2", unsafe extern "C" fn() -> c_int);
        let shutdown = sym!(b"nvmlShutdown", unsafe extern "C" fn() -> c_int);
        let count_fn = sym!(
            b"nvmlDeviceGetCount_v2",
            unsafe extern "C" fn(*mut c_uint) -> c_int
        );
        let handle_fn = sym!(
            b"nvmlDeviceGetHandleByIndex_v2",
            unsafe extern "C" fn(c_uint, *mut Device) -> c_int
        );
        let name_fn = sym!(
            b"nvmlDeviceGetName",
            unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int
        );
        let mem_fn = sym!(
            b"nvmlDeviceGetMemoryInfo",
            unsafe extern "C" fn(Device, *mut Memory) -> c_int
        );
        let cc_fn = sym!(
            b"nvmlDeviceGetCudaComputeCapability",
            unsafe extern "C" fn(Device, *mut c_int, *mut c_int) -> c_int
        );
        let driver_fn = sym!(
            b"nvmlSystemGetDriverVersion",
            unsafe extern "C" fn(*mut c_char, c_uint) -> c_int
        );
        let cuda_fn = sym!(
            b"nvmlSystemGetCudaDriverVersion_v2",
            unsafe extern "C" fn(*mut c_int) -> c_int
        );

        let rc = init();
        if rc != 0 {
            return Err(format!("NVML init failed (code {rc}): driver not loaded?"));
        }
        let mut out = GpuProbe::default();
        let mut buf = [0 as c_char; 96];
        if driver_fn(buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
            out.driver_version = Some(CStr::from_ptr(buf.as_ptr()).to_string_lossy().into());
        }
        let mut cuda: c_int = 0;
        if cuda_fn(&mut cuda) == 0 {
            out.cuda_version = Some(format!("{}.{}", cuda / 1000, (cuda % 1000) / 10));
        }
        let mut count: c_uint = 0;
        if count_fn(&mut count) == 0 {
            for i in 0..count {
                let mut dev: Device = std::ptr::null_mut();
                if handle_fn(i, &mut dev) != 0 {
                    continue;
                }
                let mut name = [0 as c_char; 96];
                let _ = name_fn(dev, name.as_mut_ptr(), name.len() as c_uint);
                let mut mem = Memory {
                    total: 0,
                    free: 0,
                    used: 0,
                };
                let _ = mem_fn(dev, &mut mem);
                let (mut major, mut minor) = (0, 0);
                let _ = cc_fn(dev, &mut major, &mut minor);
                out.gpus.push(GpuInfo {
                    index: i as usize,
                    name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into(),
                    memory_total_bytes: mem.total,
                    memory_free_bytes: mem.free,
                    compute_capability: [major, minor],
                });
            }
        }
        if out.gpus.is_empty() {
            out.note = Some("NVML found no GPU".into());
        }
        shutdown();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn device_strings_parse_or_explain() {
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("tpu")
            .unwrap_err()
            .to_string()
            .contains("expected auto, cpu, cuda"));
    }
}
