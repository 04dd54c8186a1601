//! `medpipe plan --measure`: one batched generation at the planner's worst case (an image at
//! the processor's `max_pixels`), its measured peak beside the prediction for the very same
//! work, so the planner is checked on the machine and model it plans for.
//!
//! On the CPU the measure is the growth of the process's resident set: the peak
//! (`VmHWM`, reset through `/proc/self/clear_refs` first) minus the resident set before the
//! model loads. Mapped f32 weights count as they are touched, as the planner counts them.

use std::path::Path;

use image::{DynamicImage, Rgb, RgbImage};
use serde::Serialize;

use crate::bench::memory::rss_bytes;
use crate::bench::run::BenchError;
use crate::device::{BackendJob, Device, Target};
use crate::kernels::Kernels;
use crate::model::loader::{load_model, InputEncoder};
use crate::model::plan::{self, Engine, Footprint, Generation, WeightFormat};
use crate::model::processor::ImageInput as RawImage;
use crate::model::{GenerateConfig, HfConfig, Sampling};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Requests in the batch.
    pub batch: usize,
    /// New tokens per request.
    pub new_tokens: usize,
    /// The processor's resize bounds `[min, max]` (`None`: the model's).
    pub pixel_bounds: [Option<u64>; 2],
    /// The weights' storage (NF4 when the checkpoint is quantized).
    pub format: WeightFormat,
    /// How the checkpoint stores its dense tensors.
    pub stored: plan::Stored,
}

/// A prediction and the measure of the same generation.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Prompt tokens per request (image tokens included).
    pub prompt_tokens: usize,
    /// Pixels of the image after the processor's resize.
    pub image_pixels: u64,
    pub batch: usize,
    pub new_tokens: usize,
    pub predicted: Footprint,
    pub predicted_bytes: u64,
    /// Peak resident growth over the process before loading, bytes.
    pub measured_bytes: u64,
    /// `measured / predicted`.
    pub ratio: f64,
}

/// Measures `probe` on the CPU. Other devices are refused: their peaks are read through
/// other means (`scripts/gpu-check` for CUDA).
///
/// # Errors
/// A device other than the CPU, no `/proc` (not Linux), or any model, processor or
/// generation error.
pub fn measure(device: Device, model_dir: &Path, probe: &Probe) -> Result<Measured, BenchError> {
    if device != Device::Cpu {
        return Err(BenchError::Invalid {
            name: "--measure",
            reason: format!("measures the CPU's resident memory; {device} is not measured here"),
        });
    }
    struct Job<'a>(&'a Path, &'a Probe);
    impl BackendJob for Job<'_> {
        type Output = Result<Measured, BenchError>;
        fn run<B: Kernels>(self, device: B::Device, _: Target) -> Self::Output {
            measure_on::<B>(self.0, self.1, &device)
        }
    }
    crate::device::run_on(device, Job(model_dir, probe))?
}

fn measure_on<B: Kernels>(
    model_dir: &Path,
    probe: &Probe,
    device: &B::Device,
) -> Result<Measured, BenchError> {
    let no_proc = || BenchError::Invalid {
        name: "--measure",
        reason: "needs /proc/self/status (Linux) to read the resident set".into(),
    };
    let config = HfConfig::from_dir(model_dir)
        .and_then(|c| c.resolve())
        .map_err(crate::model::ModelError::from)?;
    let encoder = InputEncoder::from_dir(model_dir)?
        .with_pixel_bounds(probe.pixel_bounds[0], probe.pixel_bounds[1])?;
    let max_pixels = encoder
        .processor()
        .map(|p| p.config().max_pixels)
        .ok_or_else(|| BenchError::Invalid {
            name: "--measure",
            reason: format!("{} has no preprocessor_config.json", model_dir.display()),
        })?;
    // The largest square page of whole 28-pixel patches the processor keeps as it is.
    let side = ((max_pixels as f64).sqrt() as u32 / 28 * 28).max(28);
    let page = DynamicImage::ImageRgb8(RgbImage::from_pixel(side, side, Rgb([250, 250, 250])));
    let encoded = encoder.encode(&[RawImage::Image(page)], "List every test and its value.")?;
    let image_pixels = encoded
        .images
        .as_ref()
        .map(|i| {
            let patch = config.vision.patch_size as u64;
            i.grid_thw
                .iter()
                .map(|g| u64::from(g[1]) * u64::from(g[2]))
                .sum::<u64>()
                * patch
                * patch
        })
        .unwrap_or(0);
    let image_tokens = plan::prompt_tokens(&config, 0, image_pixels);
    let text_tokens = encoded.input_ids.len().saturating_sub(image_tokens);
    let work = Generation {
        batch: probe.batch,
        text_tokens,
        image_pixels,
        new_tokens: probe.new_tokens,
    };
    let predicted = plan::generation(
        &config,
        &probe.format,
        probe.stored,
        Engine::cpu(rayon::current_num_threads()),
        work,
    );

    let before = rss_bytes().ok_or_else(no_proc)?.0;
    // Reset the peak to now ("5": clear the high-water mark); where the kernel refuses, the
    // peak still counts from process start, which only makes the measure larger.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let loaded = load_model::<B>(model_dir, None, device)?;
    let requests: Vec<_> = (0..probe.batch).map(|_| encoded.request(device)).collect();
    let cfg = GenerateConfig {
        max_new_tokens: probe.new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        eos_token_ids: Some(Vec::new()),
    };
    loaded.model.generate(&requests, &cfg, device)?;
    let peak = rss_bytes().ok_or_else(no_proc)?.1;
    let measured_bytes = peak.saturating_sub(before);
    let predicted_bytes = predicted.total();
    Ok(Measured {
        prompt_tokens: encoded.input_ids.len(),
        image_pixels,
        batch: probe.batch,
        new_tokens: probe.new_tokens,
        predicted,
        predicted_bytes,
        measured_bytes,
        ratio: measured_bytes as f64 / predicted_bytes.max(1) as f64,
    })
}
