//! What goes wrong reading or validating a model configuration.

use std::path::PathBuf;

/// What went wrong reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading model config {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON or misses a required field.
    #[error("parsing model config {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Two spellings of one setting (e.g. `in_chans` and `in_channels`, or a top-level text
    /// field and its `text_config` copy) are both present and disagree.
    #[error("model config {path}: `{first}` = {first_value} and `{second}` = {second_value} disagree; they are two spellings of one setting, so they must match")]
    Conflict {
        /// The file.
        path: PathBuf,
        /// One spelling (dotted path in the JSON).
        first: String,
        /// Its value (JSON).
        first_value: String,
        /// The other spelling.
        second: String,
        /// Its value (JSON).
        second_value: String,
    },
    /// A value is inconsistent with the architecture.
    #[error("invalid model config: {field}: {reason}")]
    Invalid {
        /// The offending field (HF name).
        field: &'static str,
        /// Why it is rejected, with the numbers.
        reason: String,
    },
}
