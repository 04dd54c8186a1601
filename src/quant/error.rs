//! Errors of the NF4 area: checkpoint parsing, validation and I/O, each naming the tensor or
//! the file it is about.

use std::path::PathBuf;

/// Everything that can go wrong reading, validating, quantizing or writing NF4 tensors.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A tensor that a 4-bit Linear needs is absent.
    #[error("tensor `{key}` is missing")]
    Missing { key: String },
    /// A tensor has the wrong dtype.
    #[error("tensor `{key}`: dtype {found}, expected {expected}")]
    Dtype {
        key: String,
        found: String,
        expected: &'static str,
    },
    /// A tensor has the wrong shape or length.
    #[error("tensor `{key}`: shape {found:?}, expected {expected}")]
    Shape {
        key: String,
        found: Vec<usize>,
        expected: String,
    },
    /// The `quant_state.bitsandbytes__nf4` blob is not the JSON bitsandbytes writes.
    #[error("tensor `{key}`: corrupt quant_state blob: {reason}")]
    Blob { key: String, reason: String },
    /// Input outside what the quantizer accepts (empty tensor, bad blocksize).
    #[error("tensor `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// Reading or parsing a safetensors file.
    #[error("reading safetensors {path}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// Any other I/O failure, with the path.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index) that does not parse.
    #[error("parsing {path}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The output directory is the checkpoint itself, lies inside it, or contains it:
    /// replacing it would destroy the input.
    #[error(
        "output {out} would overwrite the input checkpoint {model}; choose a directory outside it"
    )]
    OutputOverlapsInput { out: PathBuf, model: PathBuf },
    /// The input's config.json already carries a `quantization_config`.
    #[error("{path} is already quantized (quantization_config.quant_method = {method}); quantize the original checkpoint instead")]
    AlreadyQuantized { path: PathBuf, method: String },
    /// A skip entry matches no Linear weight of the checkpoint (a typo would otherwise
    /// quantize what the user meant to keep).
    #[error("skip entry `{entry}` matches no Linear weight in {path}; {hint}")]
    SkipMatchesNothing {
        entry: String,
        path: PathBuf,
        /// Examples of what does exist.
        hint: String,
    },
    /// Atomic file writing failed.
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
}
