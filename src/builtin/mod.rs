//! `builtin:tiny`: the embedded default model, materialized from a seed in exactly the
//! Hugging Face layout of a Qwen2.5-VL checkpoint, so everything downstream loads it like any
//! other checkpoint.
//!
//! Files: `config.json`, `generation_config.json`, `preprocessor_config.json`,
//! `model.safetensors` (seeded f32 weights), `tokenizer.json` (byte-level BPE trained on
//! clinical text), `tokenizer_config.json` and `chat_template.json`. The same seed and corpus
//! give byte-identical files.

pub mod spec;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fs::{self, FsError};
pub use spec::TinySpec;

/// Embedding rows are padded to a multiple of this many tokens (as Qwen pads 151,665 tokens
/// to 152,064 rows), so the vocabulary size stays a round number if BPE learns fewer merges.
const VOCAB_MULTIPLE: usize = 64;
/// Longest sequence the tokenizer config advertises, tokens.
const MODEL_MAX_LENGTH: usize = 4096;

/// Errors materializing `builtin:tiny`.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("serializing builtin:tiny weights")]
    Safetensors(#[source] safetensors::SafeTensorError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// What [`materialize`] wrote.
#[derive(Debug, Clone)]
pub struct Materialized {
    /// The model directory.
    pub dir: PathBuf,
    /// The dimensions used.
    pub spec: TinySpec,
    /// Tokens in the tokenizer, special ones included.
    pub tokenizer_size: usize,
    /// File names written, sorted.
    pub files: Vec<String>,
}

/// Writes `builtin:tiny` for `seed` into `dir` (through `<dir>.partial`, renamed at the end,
/// so a crash never leaves a half-written model under `dir`). The tokenizer is trained on
/// `corpus`.
///
/// # Errors
/// Tokenizer training or any I/O failure, naming the path.
pub fn materialize(dir: &Path, seed: u64, corpus: &[String]) -> Result<Materialized, BuiltinError> {
    materialize_with(dir, seed, corpus, TinySpec::tiny)
}

/// [`materialize`] with other dimensions: `spec` maps the tokenizer's padded vocabulary
/// size to the model's shapes. For models of a chosen size with the tiny model's tokenizer
/// and processor (the memory planner's tests measure one).
///
/// # Errors
/// As [`materialize`].
pub fn materialize_with(
    dir: &Path,
    seed: u64,
    corpus: &[String],
    spec: impl FnOnce(usize) -> TinySpec,
) -> Result<Materialized, BuiltinError> {
    let trained = tokenizer::train(corpus)?;
    let spec = spec(trained.size.div_ceil(VOCAB_MULTIPLE) * VOCAB_MULTIPLE);
    let weights = weights::safetensors_bytes(&spec, seed).map_err(BuiltinError::Safetensors)?;
    let partial = crate::fs::fresh_partial(dir)?;
    let json_files: [(&str, Value); 5] = [
        ("config.json", spec.config_json(&trained.ids)),
        ("generation_config.json", spec.generation_json(&trained.ids)),
        ("preprocessor_config.json", spec.preprocessor_json()),
        (
            "tokenizer_config.json",
            tokenizer::tokenizer_config_json(MODEL_MAX_LENGTH),
        ),
        ("chat_template.json", tokenizer::chat_template_json()),
    ];
    let mut files = Vec::new();
    for (name, value) in &json_files {
        fs::write_json_atomic(&partial.join(name), value)?;
        files.push(name.to_string());
    }
    fs::write_atomic(&partial.join("tokenizer.json"), trained.json.as_bytes())?;
    fs::write_atomic(&partial.join("model.safetensors"), &weights)?;
    files.extend([
        "tokenizer.json".to_string(),
        "model.safetensors".to_string(),
    ]);
    files.sort();
    fs::commit_dir(&partial, dir)?;
    tracing::info!(dir = %dir.display(), seed, vocab = spec.vocab_size, "materialized builtin:tiny");
    Ok(Materialized {
        dir: dir.to_path_buf(),
        spec,
        tokenizer_size: trained.size,
        files,
    })
}

/// Clinical document text for training the tokenizer: `n` documents of the synthetic
/// generator (the same vocabulary, layouts and units the pipeline trains and evaluates on).
pub fn tokenizer_corpus(seed: u64, n: usize) -> Vec<String> {
    crate::data::synthetic::corpus(seed, n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn materialize_writes_the_hf_layout_and_repeats_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tokenizer_corpus(0, 300);
        let a = materialize(&tmp.path().join("a/base"), 5, &corpus).unwrap();
        materialize(&tmp.path().join("b/base"), 5, &corpus).unwrap();
        let (fa, fb) = (
            read_dir_bytes(&tmp.path().join("a/base")),
            read_dir_bytes(&tmp.path().join("b/base")),
        );
        let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            a.files.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!(
            names,
            [
                "chat_template.json",
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        assert_eq!(fa, fb, "same seed must give identical bytes");
        assert!(!tmp.path().join("a/base.partial").exists());
    }

    #[test]
    fn config_ids_name_the_tokenizers_special_tokens_and_shapes_match_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("base");
        materialize(&dir, 1, &tokenizer_corpus(1, 300)).unwrap();
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        for (key, token) in [
            ("image_token_id", "<|image_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("eos_token_id", "<|im_end|>"),
            ("pad_token_id", "<|endoftext|>"),
        ] {
            assert_eq!(
                cfg[key].as_u64(),
                tok.token_to_id(token).map(u64::from),
                "{key}"
            );
        }
        let spec: TinySpec = serde_json::from_value(cfg.clone()).unwrap();
        assert!(tok.get_vocab_size(true) <= spec.vocab_size);
        let mrope: usize = cfg["rope_scaling"]["mrope_section"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .sum();
        assert_eq!(mrope * 2, spec.head_dim());
        assert_eq!(spec.vision_config.out_hidden_size, spec.hidden_size);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let layout = weights::layout(&spec);
        assert_eq!(st.len(), layout.len());
        for (k, (shape, _)) in layout {
            assert_eq!(st.tensor(&k).unwrap().shape(), shape.as_slice(), "{k}");
        }
    }

    #[test]
    fn builtin_tiny_loads_like_any_checkpoint_and_generates_from_an_image_prompt() {
        use crate::model::processor::{ImageInput as Img, ImageProcessor};
        use crate::model::prompt::PromptBuilder;
        use crate::model::{GenerateConfig, ImageInput, Qwen25Vl, Request};
        use crate::test_util::TB;

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("base");
        materialize(&dir, 0, &tokenizer_corpus(0, 300)).unwrap();
        let dev = Default::default();
        let model = Qwen25Vl::<TB>::load(&dir, &dev).unwrap();
        let proc = ImageProcessor::from_config_file(dir.join("preprocessor_config.json")).unwrap();
        let page = image::DynamicImage::new_rgb8(100, 60);
        let px = proc.preprocess(&[Img::Image(page)]).unwrap();
        let prompt = PromptBuilder::from_dir(&dir).unwrap();
        let ids = prompt
            .encode_chat(None, "List the lab values as JSON.", &px.grid_thw)
            .unwrap();
        let images = ImageInput::<TB>::from_processed(px, &dev);
        let cfg = GenerateConfig {
            max_new_tokens: 4,
            ..Default::default()
        };
        let out = model
            .generate(
                &[Request {
                    input_ids: ids.clone(),
                    images: Some(images),
                }],
                &cfg,
                &dev,
            )
            .unwrap();
        assert_eq!(out[0].prompt_tokens, ids.len());
        assert!(!out[0].tokens.is_empty() && out[0].tokens.len() <= 4);
        prompt.decode(&out[0].tokens).unwrap();
    }
}
