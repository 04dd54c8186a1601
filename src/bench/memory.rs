//! Process memory, as the benchmark harness reports it: resident set size now and the peak,
//! read from `/proc/self/status` (Linux; `VmRSS`, `VmHWM`), and on a GPU run the device
//! memory in use (NVML, through `crate::device::DeviceMemory`). A sampler thread records the
//! curve while work runs, so a leak shows as a slope (soak mode) and the peak of one phase can
//! be told from another's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::device::{AllocatorUsage, DeviceMemory};

/// Resident memory of this process: (current, peak) in bytes, `None` where the OS does not
/// expose them.
pub fn rss_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// [`rss_bytes`] of another process, by pid (a server under test, say).
pub fn rss_bytes_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&status)
}

/// Parses `VmRSS` and `VmHWM` (kB) from a `/proc/<pid>/status` text.
fn parse_status(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// One sample of the memory curve.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MemSample {
    /// Seconds since the sampler started.
    pub t_s: f64,
    pub rss_bytes: u64,
    /// Device memory in use (NVML, device-wide), bytes; `null` on the CPU or without NVML.
    #[serde(default)]
    pub device_used_bytes: Option<u64>,
}

/// Samples RSS (and device memory, when given one) every `interval` on a background thread
/// until stopped.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<MemSample>>>,
    handle: Option<JoinHandle<()>>,
}

impl MemorySampler {
    /// Starts sampling RSS now.
    pub fn start(interval: Duration) -> Self {
        Self::start_with(interval, None)
    }

    /// Starts sampling RSS and, with `device`, its memory in use now.
    pub fn start_with(interval: Duration, device: Option<Arc<DeviceMemory>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            loop {
                if let Some((rss, _)) = rss_bytes() {
                    if let Ok(mut v) = v.lock() {
                        v.push(MemSample {
                            t_s: t0.elapsed().as_secs_f64(),
                            rss_bytes: rss,
                            device_used_bytes: device.as_ref().and_then(|d| d.used_bytes()),
                        });
                    }
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(interval);
            }
        });
        Self {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    /// Stops and returns the samples (at least one, taken at the stop, where RSS is readable).
    pub fn finish(mut self) -> Vec<MemSample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Device memory of one model's run: the [`DeviceMemory`] a sampler reads (on a GPU), and
/// the allocator's largest figures, read by [`DeviceWatch::after_call`] on the model's thread
/// (cubecl keeps a pool per thread's stream).
#[derive(Debug)]
pub struct DeviceWatch {
    memory: Arc<DeviceMemory>,
    /// Largest in-use and largest reserved seen (each its own maximum).
    peak: Option<AllocatorUsage>,
}

impl DeviceWatch {
    /// Watches `memory`, with the allocator's figures now as the first reading.
    pub fn new(memory: DeviceMemory) -> Self {
        let memory = Arc::new(memory);
        let peak = memory.allocator();
        Self { memory, peak }
    }

    /// The readings.
    pub fn memory(&self) -> &DeviceMemory {
        &self.memory
    }

    /// What a [`MemorySampler`] should read beside RSS: the device on a GPU, nothing on the
    /// CPU.
    pub fn sampled(&self) -> Option<Arc<DeviceMemory>> {
        self.memory.device().is_cuda().then(|| self.memory.clone())
    }

    /// Reads the allocator (after a generate call, on the thread that ran it).
    pub fn after_call(&mut self) {
        if let Some(now) = self.memory.allocator() {
            let p = self.peak.get_or_insert(now);
            p.bytes_in_use = p.bytes_in_use.max(now.bytes_in_use);
            p.bytes_reserved = p.bytes_reserved.max(now.bytes_reserved);
            p.allocations = p.allocations.max(now.allocations);
        }
    }

    /// The allocator's largest figures so far; `None` on the CPU or without the CUDA backend.
    pub fn peak(&self) -> Option<AllocatorUsage> {
        self.peak
    }

    /// Peak memory of the model for the report's `peak_memory_bytes`: on a GPU the bytes the
    /// allocator's pools held (else NVML's device-wide peak `device_peak`), on the CPU the
    /// process's resident peak `rss_peak`.
    pub fn peak_memory_bytes(
        &self,
        device_peak: Option<u64>,
        rss_peak: Option<u64>,
    ) -> Option<u64> {
        if self.memory.device().is_cuda() {
            self.peak.map(|p| p.bytes_reserved).or(device_peak)
        } else {
            rss_peak
        }
    }
}

/// Least-squares slope of RSS over time, in bytes per second (a leak is a positive slope
/// that does not level off). `None` for fewer than two samples or no time span.
pub fn growth_bytes_per_s(samples: &[MemSample]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mt = samples.iter().map(|s| s.t_s).sum::<f64>() / n;
    let mr = samples.iter().map(|s| s.rss_bytes as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.t_s - mt) * (s.rss_bytes as f64 - mr);
        den += (s.t_s - mt).powi(2);
    }
    (den > 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields_are_read_in_bytes() {
        let text = "Name:\tmedpipe\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status(text), Some((1 << 20, 2 << 20)));
        assert_eq!(parse_status("Name: x\n"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn rss_sees_a_large_allocation() {
        let (before, _) = rss_bytes().unwrap();
        let big = vec![1u8; 64 << 20];
        let (after, peak) = rss_bytes().unwrap();
        assert!(after >= before + (60 << 20), "{before} -> {after}");
        assert!(peak >= after);
        drop(big);
    }

    #[test]
    fn growth_is_the_least_squares_slope() {
        let s: Vec<MemSample> = (0..5)
            .map(|i| MemSample {
                t_s: i as f64,
                rss_bytes: 1000 + 10 * i,
                device_used_bytes: None,
            })
            .collect();
        assert!((growth_bytes_per_s(&s).unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(growth_bytes_per_s(&s[..1]), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn sampler_records_until_finished() {
        let s = MemorySampler::start(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        let samples = s.finish();
        assert!(samples.len() >= 2);
        assert!(samples.windows(2).all(|w| w[0].t_s <= w[1].t_s));
        assert!(samples.iter().all(|s| s.device_used_bytes.is_none()));
    }

    #[test]
    fn on_the_cpu_the_peak_memory_is_the_resident_peak_and_the_device_is_not_sampled() {
        let mut w = DeviceWatch::new(DeviceMemory::for_device(crate::device::Device::Cpu));
        w.after_call();
        assert_eq!(w.peak(), None);
        assert!(w.sampled().is_none());
        assert_eq!(w.peak_memory_bytes(Some(7), Some(42)), Some(42));
    }

    #[test]
    fn on_a_gpu_without_readings_the_peak_memory_is_absent_not_the_rss() {
        let missing = crate::device::nvml::Nvml::open_from(&["libmedpipe-no-such-nvml.so"]);
        let mem = DeviceMemory::with_nvml(crate::device::Device::Cuda(0), missing);
        let w = DeviceWatch::new(mem);
        assert!(w.sampled().is_some());
        if !cfg!(feature = "cuda") {
            assert_eq!(w.peak_memory_bytes(None, Some(42)), None);
            assert_eq!(w.peak_memory_bytes(Some(7), Some(42)), Some(7));
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_sampler_given_a_cpu_device_records_no_device_memory() {
        let cpu = Arc::new(DeviceMemory::for_device(crate::device::Device::Cpu));
        let s = MemorySampler::start_with(Duration::from_millis(1), Some(cpu));
        std::thread::sleep(Duration::from_millis(5));
        let samples = s.finish();
        assert!(!samples.is_empty());
        assert!(samples.iter().all(|s| s.device_used_bytes.is_none()));
    }
}
