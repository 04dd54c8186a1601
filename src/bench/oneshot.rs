//! `medpipe generate`: one prompt with its images through the model, answered with timings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;

use crate::bench::run::BenchError;
use crate::model::processor::{ImageInput as RawImage, ImageProcessor};
use crate::model::prompt::PromptBuilder;
use crate::model::{GenerateConfig, ImageInput, Qwen25Vl, Request, Sampling};

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

/// Loads `model_dir` and answers `prompt` about `images` greedily.
///
/// # Errors
/// Model, processor (a missing or undecodable image names its path) or prompt errors.
pub fn generate_answer<B: Backend>(
    model_dir: &Path,
    images: &[PathBuf],
    prompt: &str,
    max_new_tokens: usize,
    device: &B::Device,
) -> Result<Answer, BenchError> {
    let t = Instant::now();
    let model = Qwen25Vl::<B>::load(model_dir, device)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let prompts = PromptBuilder::from_dir(model_dir)?;
    let (input_ids, images) = if images.is_empty() {
        (prompts.encode_chat(None, prompt, &[])?, None)
    } else {
        let processor =
            ImageProcessor::from_config_file(model_dir.join("preprocessor_config.json"))?;
        let raw: Vec<RawImage> = images.iter().map(|p| RawImage::Path(p.clone())).collect();
        let p = processor.preprocess(&raw)?;
        let ids = prompts.encode_chat(None, prompt, &p.grid_thw)?;
        (ids, Some(ImageInput::from_processed(p, device)))
    };
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;

    let cfg = GenerateConfig {
        max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        eos_token_ids: None,
    };
    let gens = model.generate(&[Request { input_ids, images }], &cfg, device)?;
    let Some(g) = gens.into_iter().next() else {
        return Err(BenchError::Invalid {
            name: "generate",
            reason: "the model returned no generation for one request".into(),
        });
    };
    Ok(Answer {
        text: prompts.decode(&g.tokens)?,
        prompt_tokens: g.prompt_tokens,
        new_tokens: g.tokens.len(),
        stopped_on_eos: g.stopped_on_eos,
        load_ms,
        preprocess_ms,
        prefill_ms: g.prefill_ms,
        decode_ms: g.decode_ms,
    })
}
