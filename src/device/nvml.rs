//! NVML (the NVIDIA Management Library) loaded at run time with `dlopen`
//! (`libnvidia-ml.so.1`): the only GPU dependency the default build has, so the same binary
//! runs on machines without a driver. Used by the probe stage (which GPUs, how much memory)
//! and by the benchmark harness (device memory in use while a model runs).
//!
//! Signatures follow `nvml.h` (v2 entry points, as in the CUDA 12 toolkit's header).

use std::ffi::{c_char, c_int, c_uint, c_void};

use serde::{Deserialize, Serialize};

/// Library names tried in order.
const LIBRARY_NAMES: [&str; 3] = ["libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"];

/// One GPU as NVML reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpuInfo {
    /// NVML index (PCI bus order).
    pub index: usize,
    pub name: String,
    /// Device memory, bytes.
    pub memory_total_bytes: u64,
    /// Device memory free when probed, bytes.
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

/// Device memory of one GPU, bytes (`nvmlMemory_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct MemoryInfo {
    pub total: u64,
    pub free: u64,
    /// In use on the whole device: every process, plus the driver's reservations.
    pub used: u64,
}

/// Why NVML could not answer.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    #[error("NVML (libnvidia-ml) not found: no NVIDIA driver on this machine (tried {tried})")]
    NotFound { tried: String },
    #[error("NVML lacks {symbol}: {source}")]
    MissingSymbol {
        symbol: &'static str,
        #[source]
        source: libloading::Error,
    },
    #[error("NVML init failed (code {code}): driver not loaded?")]
    Init { code: i32 },
    #[error("NVML {function} failed for GPU {index} (code {code})")]
    Call {
        function: &'static str,
        index: usize,
        code: i32,
    },
}

type DeviceHandle = *mut c_void;

/// The NVML entry points medpipe calls.
struct Functions {
    shutdown: unsafe extern "C" fn() -> c_int,
    count: unsafe extern "C" fn(*mut c_uint) -> c_int,
    handle: unsafe extern "C" fn(c_uint, *mut DeviceHandle) -> c_int,
    name: unsafe extern "C" fn(DeviceHandle, *mut c_char, c_uint) -> c_int,
    memory: unsafe extern "C" fn(DeviceHandle, *mut MemoryInfo) -> c_int,
    compute_capability: unsafe extern "C" fn(DeviceHandle, *mut c_int, *mut c_int) -> c_int,
    driver_version: unsafe extern "C" fn(*mut c_char, c_uint) -> c_int,
    cuda_version: unsafe extern "C" fn(*mut c_int) -> c_int,
}

/// An initialized NVML. Thread-safe (NVML's calls are); shut down when dropped.
pub struct Nvml {
    fns: Functions,
    /// Keeps the code behind `fns` mapped; dropped after `Drop::drop` shut NVML down.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nvml")
    }
}

impl Nvml {
    /// Loads and initializes NVML from the driver's usual library names.
    ///
    /// # Errors
    /// No library, a missing entry point, or `nvmlInit` failing.
    pub fn open() -> Result<Self, NvmlError> {
        Self::open_from(&LIBRARY_NAMES)
    }

    /// Loads and initializes NVML from the first of `names` that `dlopen` finds.
    ///
    /// # Errors
    /// As [`Nvml::open`].
    pub fn open_from(names: &[&str]) -> Result<Self, NvmlError> {
        // SAFETY: loading the NVIDIA driver library runs its initializers, which have no
        // preconditions; a library of another origin under these names is out of scope.
        let lib = names
            .iter()
            .find_map(|n| unsafe { libloading::Library::new(n) }.ok())
            .ok_or_else(|| NvmlError::NotFound {
                tried: names.join(", "),
            })?;
        macro_rules! sym {
            ($name:literal, $t:ty) => {
                // SAFETY: `$t` is the entry point's signature in nvml.h.
                *unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) }.map_err(|source| {
                    NvmlError::MissingSymbol {
                        symbol: $name,
                        source,
                    }
                })?
            };
        }
        let init = sym!("nvmlInit_v2", unsafe extern "C" fn() -> c_int);
        let fns = Functions {
            shutdown: sym!("nvmlShutdown", unsafe extern "C" fn() -> c_int),
            count: sym!(
                "nvmlDeviceGetCount_v2",
                unsafe extern "C" fn(*mut c_uint) -> c_int
            ),
            handle: sym!(
                "nvmlDeviceGetHandleByIndex_v2",
                unsafe extern "C" fn(c_uint, *mut DeviceHandle) -> c_int
            ),
            name: sym!(
                "nvmlDeviceGetName",
                unsafe extern "C" fn(DeviceHandle, *mut c_char, c_uint) -> c_int
            ),
            memory: sym!(
                "nvmlDeviceGetMemoryInfo",
                unsafe extern "C" fn(DeviceHandle, *mut MemoryInfo) -> c_int
            ),
            compute_capability: sym!(
                "nvmlDeviceGetCudaComputeCapability",
                unsafe extern "C" fn(DeviceHandle, *mut c_int, *mut c_int) -> c_int
            ),
            driver_version: sym!(
                "nvmlSystemGetDriverVersion",
                unsafe extern "C" fn(*mut c_char, c_uint) -> c_int
            ),
            cuda_version: sym!(
                "nvmlSystemGetCudaDriverVersion_v2",
                unsafe extern "C" fn(*mut c_int) -> c_int
            ),
        };
        // SAFETY: nvmlInit_v2 takes no arguments; it is reference counted with nvmlShutdown.
        let code = unsafe { init() };
        if code != 0 {
            return Err(NvmlError::Init { code });
        }
        Ok(Self { fns, _lib: lib })
    }

    /// GPUs NVML can see.
    pub fn device_count(&self) -> usize {
        let mut count: c_uint = 0;
        // SAFETY: one out-pointer to a live c_uint.
        match unsafe { (self.fns.count)(&mut count) } {
            0 => count as usize,
            _ => 0,
        }
    }

    fn handle(&self, index: usize) -> Result<DeviceHandle, NvmlError> {
        let mut dev: DeviceHandle = std::ptr::null_mut();
        // SAFETY: one out-pointer to a live handle slot.
        let code = unsafe { (self.fns.handle)(index as c_uint, &mut dev) };
        match code {
            0 => Ok(dev),
            code => Err(NvmlError::Call {
                function: "nvmlDeviceGetHandleByIndex_v2",
                index,
                code,
            }),
        }
    }

    /// Memory of GPU `index` (NVML order) now.
    ///
    /// # Errors
    /// No such GPU, or the query failing.
    pub fn memory(&self, index: usize) -> Result<MemoryInfo, NvmlError> {
        let dev = self.handle(index)?;
        let mut mem = MemoryInfo::default();
        // SAFETY: a handle NVML returned and one out-pointer to a `#[repr(C)]` nvmlMemory_t.
        match unsafe { (self.fns.memory)(dev, &mut mem) } {
            0 => Ok(mem),
            code => Err(NvmlError::Call {
                function: "nvmlDeviceGetMemoryInfo",
                index,
                code,
            }),
        }
    }

    /// Every GPU with its name, memory and compute capability, and the driver's versions.
    pub fn gpus(&self) -> GpuProbe {
        let mut out = GpuProbe::default();
        let mut buf = [0 as c_char; 96];
        // SAFETY: a buffer and its length; NVML NUL-terminates what it writes.
        if unsafe { (self.fns.driver_version)(buf.as_mut_ptr(), buf.len() as c_uint) } == 0 {
            out.driver_version = Some(c_text(&buf));
        }
        let mut cuda: c_int = 0;
        // SAFETY: one out-pointer to a live c_int.
        if unsafe { (self.fns.cuda_version)(&mut cuda) } == 0 {
            out.cuda_version = Some(format!("{}.{}", cuda / 1000, (cuda % 1000) / 10));
        }
        for index in 0..self.device_count() {
            let Ok(dev) = self.handle(index) else {
                continue;
            };
            let mut name = [0 as c_char; 96];
            let (mut major, mut minor) = (0, 0);
            // SAFETY: a handle NVML returned, a buffer with its length, two out-pointers.
            unsafe {
                let _ = (self.fns.name)(dev, name.as_mut_ptr(), name.len() as c_uint);
                let _ = (self.fns.compute_capability)(dev, &mut major, &mut minor);
            }
            let mem = self.memory(index).unwrap_or_default();
            out.gpus.push(GpuInfo {
                index,
                name: c_text(&name),
                memory_total_bytes: mem.total,
                memory_free_bytes: mem.free,
                compute_capability: [major, minor],
            });
        }
        if out.gpus.is_empty() {
            out.note = Some("NVML found no GPU".into());
        }
        out
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: balances the nvmlInit_v2 of `open_from`; the library is still loaded.
        let _ = unsafe { (self.fns.shutdown)() };
    }
}

/// The NUL-terminated text NVML wrote into `buf` (the whole buffer if it is not terminated).
fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What NVML reports about the machine's GPUs now: the list, or an empty list with the
/// reason (no driver, no GPU), never an error.
pub fn probe() -> GpuProbe {
    match Nvml::open() {
        Ok(nvml) => nvml.gpus(),
        Err(e) => GpuProbe {
            note: Some(e.to_string()),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_what_was_tried() {
        let err = Nvml::open_from(&["libmedpipe-no-such-nvml.so"]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, NvmlError::NotFound { .. }), "{text}");
        assert!(text.contains("libmedpipe-no-such-nvml.so"), "{text}");
    }

    #[test]
    fn the_probe_lists_gpus_or_says_why_there_are_none() {
        let p = probe();
        assert!(
            !p.gpus.is_empty() || p.note.as_deref().is_some_and(|n| !n.is_empty()),
            "{p:?}"
        );
    }

    #[test]
    fn c_text_stops_at_the_terminator_and_tolerates_none() {
        let mut buf = [0 as c_char; 8];
        for (i, b) in b"H100".iter().enumerate() {
            buf[i] = *b as c_char;
        }
        assert_eq!(c_text(&buf), "H100");
        assert_eq!(c_text(&[b'a' as c_char, b'b' as c_char]), "ab");
    }
}
