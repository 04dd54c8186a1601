//! Process memory, as the benchmark harness reports it: resident set size now and the peak,
//! read from `/proc/self/status` (Linux; `VmRSS`, `VmHWM`). A sampler thread records the
//! curve while work runs, so a leak shows as a slope (soak mode) and the peak of one phase can
//! be told from another's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Resident memory of this process: (current, peak) in bytes, `None` where the OS does not
/// expose them.
pub fn rss_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
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
}

/// Samples RSS every `interval` on a background thread until stopped.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<MemSample>>>,
    handle: Option<JoinHandle<()>>,
}

impl MemorySampler {
    /// Starts sampling now.
    pub fn start(interval: Duration) -> Self {
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
    }
}
