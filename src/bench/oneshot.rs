//! `medpipe generate`: one prompt with its images through the model, answered with timings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bench::run::BenchError;
use crate::device::{run_on, BackendJob, Device, Target};
use crate::kernels::Kernels;
use crate::model::loader::{load_model, InputEncoder};
use crate::model::processor::ImageInput as RawImage;
use crate::model::{GenerateConfig, Sampling};

/// What one `generate` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Decoded new tokens (special tokens skipped).
    pub text: String,
    /// Prompt tokens (image tokens included).
    pub prompt_tokens: usize,
    /// New tokens.
    pub new_tokens: usize,
    /// Whether generation stopped on an end-of-sequence token.
    pub stopped_on_eos: bool,
    /// Files → model ready, ms.
    pub load_ms: f64,
    /// Image preprocessing and tokenization, ms.
    pub preprocess_ms: f64,
    /// Prefill incl. vision tower and first token, ms.
    pub prefill_ms: f64,
    /// Remaining decode steps, ms.
    pub decode_ms: f64,
}

/// [`generate_answer`] on the backend of `device`.
///
/// # Errors
/// As [`generate_answer`]; [`BenchError::Device`] for a GPU in a build without CUDA.
pub fn generate_answer_on(
    device: Device,
    model_dir: &Path,
    images: &[PathBuf],
    prompt: &str,
    max_new_tokens: usize,
) -> Result<Answer, BenchError> {
    struct Job<'a> {
        model_dir: &'a Path,
        images: &'a [PathBuf],
        prompt: &'a str,
        max_new_tokens: usize,
    }
    impl BackendJob for Job<'_> {
        type Output = Result<Answer, BenchError>;
        fn run<B: Kernels>(self, device: B::Device, _target: Target) -> Self::Output {
            generate_answer::<B>(
                self.model_dir,
                self.images,
                self.prompt,
                self.max_new_tokens,
                &device,
            )
        }
    }
    run_on(
        device,
        Job {
            model_dir,
            images,
            prompt,
            max_new_tokens,
        },
    )?
}

/// Loads `model_dir` and answers `prompt` about `images` greedily.
///
/// # Errors
/// Model, processor (a missing or undecodable image names its path) or prompt errors.
pub fn generate_answer<B: Kernels>(
    model_dir: &Path,
    images: &[PathBuf],
    prompt: &str,
    max_new_tokens: usize,
    device: &B::Device,
) -> Result<Answer, BenchError> {
    let loaded = load_model::<B>(model_dir, None, device)?;
    let (model, load_ms) = (loaded.model, loaded.load_ms);

    let t = Instant::now();
    let encoder = InputEncoder::from_dir(model_dir)?;
    let raw: Vec<RawImage> = images.iter().map(|p| RawImage::Path(p.clone())).collect();
    let request = encoder.encode(&raw, prompt)?.request(device);
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

    let cfg = GenerateConfig {
        max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        eos_token_ids: None,
    };
    let gens = model.generate(&[request], &cfg, device)?;
    let Some(g) = gens.into_iter().next() else {
        return Err(BenchError::Invalid {
            name: "generate",
            reason: "the model returned no generation for one request".into(),
        });
    };
    Ok(Answer {
        text: encoder.prompts().decode(&g.tokens)?,
        prompt_tokens: g.prompt_tokens,
        new_tokens: g.tokens.len(),
        stopped_on_eos: g.stopped_on_eos,
        load_ms,
        preprocess_ms,
        prefill_ms: g.prefill_ms,
        decode_ms: g.decode_ms,
    })
}
