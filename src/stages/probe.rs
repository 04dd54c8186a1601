//! probe: what machine is this, and which device will the later stages use?
//!
//! Writes `reports/environment.json`. GPUs are read through NVML, loaded at run time
//! (`crate::device::nvml`), so the same binary runs on machines without a driver: no NVML or
//! no GPU gives an empty list and the reason, never an error. The device rule is
//! `crate::device::choose_device`, the same one every model stage and command applies.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::ModelConfig;
pub use crate::device::nvml::{GpuInfo, GpuProbe};
use crate::device::{choice::estimate_model_mib, nvml};
pub use crate::device::{choose_device, Device};
use crate::fs::space::human_bytes;
use crate::pipeline::{Settings, Stage, StageCtx, StageOutput, Workspace};

/// `[probe]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// `auto` (CUDA when a GPU with enough memory is present and the binary has CUDA, else a
    /// hardware wgpu adapter, else CPU), `cpu`, `cuda`, `cuda:N` or `wgpu`. `medpipe run
    /// --device` sets this.
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

impl crate::pipeline::SectionConfig for ProbeConfig {
    /// Checks `[probe]`: a device this medpipe understands (whether this machine has it is
    /// the probe's question).
    ///
    /// # Errors
    /// A device other than `auto`, `cpu`, `cuda`, `cuda:N`, `wgpu`.
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        crate::pipeline::settings::check(
            self.device == "auto" || Device::parse(&self.device).is_ok(),
            "probe.device",
            format!("{:?}", self.device),
            "must be auto, cpu, cuda, cuda:N or wgpu",
        )
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            device: default_device(),
            min_gpu_memory_mib: 0,
        }
    }
}

/// What NVML reports about the machine's GPUs now (empty with a note where there is no
/// driver); the benchmark records it as the platform.
pub fn gpu_probe() -> GpuProbe {
    nvml::probe()
}

/// Backends compiled into this binary.
pub fn built_backends() -> Vec<&'static str> {
    let mut b = vec!["ndarray (cpu)", "wgpu (vulkan/metal/dx12)"];
    if cfg!(feature = "cuda") {
        b.push("cuda");
    }
    b
}

/// `environment.json` (probe): the few fields the report shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EnvironmentMetrics {
    /// Device the model stages use (`cpu`, `cuda:0`).
    pub device: String,
    /// Why that device was chosen.
    pub device_reason: String,
    /// CPU model and threads.
    pub cpu: CpuInfo,
    /// Machine RAM.
    pub memory: MemoryInfo,
    /// GPUs NVML listed.
    pub gpu: GpuList,
    /// Backends compiled into the binary.
    pub backends_built: Vec<String>,
}

/// CPU of the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuInfo {
    pub model: String,
    /// Logical CPU threads.
    pub logical_threads: usize,
}

/// RAM of the machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryInfo {
    /// Total RAM, bytes.
    pub total_bytes: u64,
}

/// GPUs seen by NVML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuList {
    /// One entry per GPU.
    pub gpus: Vec<GpuEntry>,
    /// NVIDIA driver version.
    pub driver_version: Option<String>,
    /// CUDA version the driver supports.
    pub cuda_version: Option<String>,
}

/// One GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuEntry {
    /// GPU name as NVML reports it.
    pub name: String,
    /// GPU memory, bytes.
    pub memory_total_bytes: u64,
}

/// The probe stage.
pub struct Probe;

/// The device model work runs on: the one the probe resolved (`metrics.device` of
/// `reports/environment.json`), so every stage uses the device that was hashed into its
/// inputs. The stage must declare `probe` as upstream.
///
/// # Errors
/// No probe upstream, or an artifact without a valid `metrics.device`.
pub fn device(ctx: &StageCtx<'_>) -> anyhow::Result<Device> {
    let env = ctx.upstream_metrics::<Probe>()?;
    Device::parse(&env.device)
        .map_err(|e| anyhow::Error::new(e).context("reports/environment.json metrics.device"))
}

impl Stage for Probe {
    const NAME: &'static str = "probe";
    type Config = ProbeConfig;
    type Metrics = EnvironmentMetrics;

    fn description(&self) -> &'static str {
        "record OS, CPU, RAM, disk, GPUs (NVML), wgpu adapters, backends; choose the device"
    }
    fn artifact_file(&self) -> &'static str {
        "environment.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &[]
    }
    /// The device choice reads only the model's source (its size).
    fn shared_sections(&self) -> &[&'static str] {
        &["model.source"]
    }
    /// The `[probe]` section is hashed as the device it resolves to on this machine, so a
    /// spelling that changes nothing (`auto` → `cpu` on a CPU machine, or another
    /// `min_gpu_memory_mib` that `auto` does not need) leaves every stage up to date. A
    /// setting that does not resolve is hashed as written; the run then fails with why.
    fn resolve_config(&self, mut sections: Value, settings: &Settings, ws: &Workspace) -> Value {
        let sections_read = settings
            .section::<ProbeConfig>("probe")
            .and_then(|p| Ok((p, settings.section::<ModelConfig>("model")?)));
        let Ok((probe, model)) = sections_read else {
            return sections;
        };
        if let Ok((device, _)) = choose(&probe, &model, ws) {
            sections["probe"] = json!({ "device": device.to_string() });
        }
        sections
    }
    fn code_version(&self) -> u32 {
        1
    }

    fn run(&self, cfg: &ProbeConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        use sysinfo::System;
        let model: ModelConfig = ctx.settings().section("model")?;
        let mut sys = System::new();
        sys.refresh_memory();
        sys.refresh_cpu_all();
        let cpu_model = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
        // The workspace's own filesystem (statvfs on it), not the mount table's idea of it:
        // sysinfo omits tmpfs and reported the root disk for a workspace on a 3 MiB tmpfs.
        let disk = crate::fs::space::disk_space(ctx.workspace().root())
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
        let disk_free = disk.as_ref().ok().map(|d| d.available_bytes);
        let gpu = nvml::probe();

        let need_mib = need_mib(cfg, &model, ctx.workspace());
        let adapters = crate::device::wgpu::adapters();
        let (device, reason) = crate::device::choice::choose_with_wgpu(
            &cfg.device,
            &gpu,
            need_mib,
            cfg!(feature = "cuda"),
            || adapters.clone(),
        )?;

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
                "mount_point": disk.as_ref().ok().and_then(|d| d.mount_point.clone()),
                "free_bytes": disk_free,
                "total_bytes": disk.as_ref().ok().map(|d| d.total_bytes),
                "error": disk.as_ref().err(),
            },
            "gpu": gpu,
            "wgpu_adapters": adapters,
            "backends_built": built_backends(),
            "versions": {
                "medpipe": env!("CARGO_PKG_VERSION"),
                "rustc": option_env!("MEDPIPE_RUSTC_VERSION"),
                "burn": "0.21.0",
                "git_commit": crate::build_info::git_commit(),
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
                match &disk {
                    Ok(d) => format!(
                        "{} of {} on {}",
                        human_bytes(d.available_bytes),
                        human_bytes(d.total_bytes),
                        d.mount_point
                            .as_deref()
                            .unwrap_or(ctx.workspace().root())
                            .display()
                    ),
                    Err(e) => format!("unknown ({e})"),
                },
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
        summary.push((
            "wgpu adapters".into(),
            if adapters.is_empty() {
                "none".into()
            } else {
                adapters
                    .iter()
                    .map(|a| {
                        let kind = if a.software {
                            "software"
                        } else {
                            &a.device_type
                        };
                        format!("{} ({kind}, {}, {})", a.name, a.backend, a.driver)
                    })
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

/// GPU memory the model needs, MiB: `min_gpu_memory_mib`, or estimated from the weights (a
/// local source resolves against the workspace, as download places it).
fn need_mib(probe: &ProbeConfig, model: &ModelConfig, ws: &Workspace) -> u64 {
    if probe.min_gpu_memory_mib > 0 {
        return probe.min_gpu_memory_mib;
    }
    let source = &model.source;
    if source.starts_with("builtin:") || source.starts_with("hf:") {
        estimate_model_mib(source)
    } else {
        estimate_model_mib(&ws.root().join(source).display().to_string())
    }
}

/// The device `[probe]` resolves to on this machine, by the rule of [`choose_device`].
fn choose(
    probe: &ProbeConfig,
    model: &ModelConfig,
    ws: &Workspace,
) -> Result<(Device, String), crate::device::DeviceError> {
    let wanted = &probe.device;
    if wanted == "cpu" {
        // As `device::resolve`: NVML is not asked for the CPU.
        return Ok((Device::Cpu, "requested explicitly".into()));
    }
    let gpu = nvml::probe();
    crate::device::choice::choose_with_wgpu(
        wanted,
        &gpu,
        need_mib(probe, model, ws),
        cfg!(feature = "cuda"),
        crate::device::wgpu::adapters,
    )
}
