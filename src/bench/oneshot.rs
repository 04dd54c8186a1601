//! `medpipe generate`: one prompt with its images through the model, answered with timings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bench::run::BenchError;
use crate::device::{BackendJob, Device, Target};
use crate::kernels::Kernels;
use crate::model::loader::{load_model, InputEncoder};
use crate::model::processor::ImageInput as RawImage;
use crate::model::{GenerateConfig, HfConfig, Sampling};

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

/// One `generate` request: the model, an optional adapter, images, prompt and budget.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Checkpoint directory (HF layout).
    pub model_dir: PathBuf,
    /// peft LoRA adapter directory attached to the language model, as `forward --adapter`.
    pub adapter: Option<PathBuf>,
    /// Image files.
    pub images: Vec<PathBuf>,
    /// The user prompt.
    pub prompt: String,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Greedy, or a seeded draw on the device.
    pub sampling: Sampling,
    /// Seed of the draw.
    pub seed: u64,
}

/// [`generate_answer`] on the backend of `device`, computing in `precision` (`--dtype`).
///
/// # Errors
/// As [`generate_answer`]; [`BenchError::Device`] for a GPU in a build without CUDA; a
/// precision the device does not support.
pub fn generate_answer_as(
    device: Device,
    precision: crate::device::Precision,
    job: &GenerateJob,
) -> Result<Answer, BenchError> {
    struct Job<'a>(&'a GenerateJob);
    impl BackendJob for Job<'_> {
        type Output = Result<Answer, BenchError>;
        fn run<B: Kernels>(self, device: B::Device, _target: Target) -> Self::Output {
            generate_answer::<B>(self.0, &device)
        }
    }
    crate::device::run_on_as(device, precision, Job(job))??
}

/// Refuses a prompt of `prompt_tokens` plus `max_new_tokens` that the model cannot hold
/// (`max_position_embeddings` of `config.json`), before any weight is loaded.
///
/// # Errors
/// [`BenchError::Invalid`] naming the three numbers and the largest budget that fits.
pub fn check_length(
    prompt_tokens: usize,
    max_new_tokens: usize,
    max_position_embeddings: usize,
) -> Result<(), BenchError> {
    match prompt_tokens.checked_add(max_new_tokens) {
        Some(total) if total <= max_position_embeddings => Ok(()),
        _ => Err(BenchError::Invalid {
            name: "--max-new-tokens",
            reason: format!(
                "a prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the model's max_position_embeddings {max_position_embeddings} (allowed: at most {} new tokens)",
                max_position_embeddings.saturating_sub(prompt_tokens)
            ),
        }),
    }
}

/// Loads the job's model (and adapter) and answers its prompt about its images greedily.
/// The prompt is encoded first, so a request longer than the model can hold is refused
/// before the weights are read.
///
/// # Errors
/// Model, adapter, processor (a missing or undecodable image names its path) or prompt
/// errors; [`BenchError::Invalid`] from [`check_length`].
pub fn generate_answer<B: Kernels>(
    job: &GenerateJob,
    device: &B::Device,
) -> Result<Answer, BenchError> {
    let model_dir: &Path = &job.model_dir;
    let max_new_tokens = job.max_new_tokens;
    job.sampling.check().map_err(|reason| BenchError::Invalid {
        name: "sampling",
        reason,
    })?;
    let t = Instant::now();
    let encoder = InputEncoder::from_dir(model_dir)?;
    let raw: Vec<RawImage> = job
        .images
        .iter()
        .map(|p| RawImage::Path(p.clone()))
        .collect();
    let encoded = encoder.encode(&raw, &job.prompt)?;
    let max_pos = HfConfig::from_dir(model_dir)
        .map_err(crate::model::ModelError::from)?
        .text
        .max_position_embeddings;
    check_length(encoded.input_ids.len(), max_new_tokens, max_pos)?;
    let request = encoded.request(device);
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

    let loaded = load_model::<B>(model_dir, job.adapter.as_deref(), device)?;
    let (model, load_ms) = (loaded.model, loaded.load_ms);

    let cfg = GenerateConfig {
        max_new_tokens,
        sampling: job.sampling.clone(),
        seed: job.seed,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_longer_than_the_model_holds_is_refused_naming_what_fits() {
        check_length(100, 28, 128).unwrap();
        let err = check_length(100, 100_000, 128).unwrap_err().to_string();
        assert!(err.contains("100 tokens plus 100000 new tokens"), "{err}");
        assert!(err.contains("max_position_embeddings 128"), "{err}");
        assert!(err.contains("at most 28 new tokens"), "{err}");
        // 2^64-1 used to overflow into "KV cache full".
        let err = check_length(100, usize::MAX, 128).unwrap_err().to_string();
        assert!(err.contains("at most 28 new tokens"), "{err}");
    }
}
