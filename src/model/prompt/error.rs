//! Errors building prompts.

use std::path::PathBuf;

/// Errors building prompts. File errors name the file; token errors name the token.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// `tokenizer.json` is missing or does not load.
    #[error("loading tokenizer {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// A JSON side file (config, tokenizer config, chat template) could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON side file does not parse.
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A special token the Qwen format needs is not in the vocabulary.
    #[error("tokenizer in {dir} has no `{token}` token")]
    MissingToken { dir: PathBuf, token: String },
    /// `config.json` and the tokenizer disagree on a special token id.
    #[error("{key} = {config_id} in config.json but the tokenizer maps `{token}` to {tokenizer_id} ({dir})")]
    TokenIdMismatch {
        dir: PathBuf,
        key: &'static str,
        token: String,
        config_id: u32,
        tokenizer_id: u32,
    },
    /// The chat template does not compile or fails while rendering.
    #[error("rendering chat template from {source_file}")]
    Template {
        source_file: PathBuf,
        #[source]
        source: minijinja::Error,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizer {what}: {source}")]
    Tokenize {
        what: &'static str,
        #[source]
        source: tokenizers::Error,
    },
    /// The prompt's image placeholders and the images do not pair up.
    #[error("prompt has {placeholders} image placeholders but {images} images were given")]
    ImageCountMismatch { placeholders: usize, images: usize },
    /// No pad token is configured but padding was asked for.
    #[error("no pad token: config.json has no pad_token_id and tokenizer_config.json no pad_token ({dir})")]
    NoPadToken { dir: PathBuf },
}
