//! The model area's error type: loading a checkpoint, validating inputs, running.

use std::path::PathBuf;

use crate::model::config::ConfigError;
use crate::model::lora::TARGET_MODULES;

/// What went wrong loading or running Qwen2.5-VL.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json / generation_config.json is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file could not be opened or mapped.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("safetensors file {path} is truncated or corrupt")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// `model.safetensors.index.json` does not parse.
    #[error("parsing shard index {path}")]
    ShardIndex {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The directory holds neither `model.safetensors` nor a shard index.
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// The same tensor appears twice (two shards, or both key layouts).
    #[error("tensor `{key}` appears twice: in {first} and {second}")]
    DuplicateTensor {
        /// Canonical key.
        key: String,
        /// Where it was first seen.
        first: PathBuf,
        /// Where it was seen again.
        second: PathBuf,
    },
    /// The checkpoint's tensors do not match what the config describes.
    #[error("checkpoint {dir} does not match its config ({} problems):\n  {}", problems.len(), problems.join("\n  "))]
    Checkpoint {
        /// The model directory.
        dir: PathBuf,
        /// One line per missing, unexpected or mis-shaped tensor, naming file and shapes.
        problems: Vec<String>,
    },
    /// A tensor is larger than the device's largest buffer: wgpu caps one buffer per
    /// adapter, and a larger upload fails on the runtime's own thread, leaving zeros.
    #[error(
        "checkpoint {dir}: tensor `{key}` takes {bytes} bytes on this device ({dtype}), more \
         than the largest buffer it allows ({limit} bytes); run it on CUDA or the CPU, in f16 \
         if that brings it under, or quantize it"
    )]
    TooLargeForDevice {
        dir: PathBuf,
        key: String,
        bytes: u64,
        dtype: String,
        limit: u64,
    },
    /// One tensor of the work asked for is larger than the device's largest buffer: on
    /// wgpu it would not be allocated, the runtime would log a failed task, and the result
    /// would read as garbage.
    #[error(
        "{what} would take {bytes} bytes in one buffer, more than this device allows ({limit} \
         bytes); shorten the prompt or the sequence, lower the batch size or \
         model.max_pixels, or run on CUDA or the CPU"
    )]
    WorkTooLargeForDevice {
        /// The tensor, with its shape and dtype.
        what: String,
        bytes: u64,
        limit: u64,
    },
    /// A tensor is stored in a dtype this loader does not convert.
    #[error(
        "tensor `{key}` in {path} has dtype {dtype}; only F32, F64, BF16 and F16 are supported"
    )]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// Key as stored.
        key: String,
        /// The dtype.
        dtype: String,
    },
    /// The model asked for a tensor the checkpoint lacks (a bug if the manifest check passed).
    #[error("tensor `{key}` not found in the checkpoint (expected shape {expected:?})")]
    MissingTensor {
        /// Canonical key.
        key: String,
        /// Shape the model needs.
        expected: Vec<usize>,
    },
    /// The number of image placeholder tokens differs from the image features produced.
    #[error(
        "image features and image tokens do not match: {tokens} image tokens, {features} features"
    )]
    ImageTokens {
        /// Placeholders in `input_ids`.
        tokens: usize,
        /// Rows of the vision tower output.
        features: usize,
    },
    /// An input tensor has the wrong shape or contents.
    #[error("invalid input `{name}`: {reason}")]
    Input {
        /// Input name (`pixel_values`, `image_grid_thw`, `input_ids`…).
        name: &'static str,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// The KV cache would overflow.
    #[error("KV cache full: {needed} positions needed, capacity {capacity}")]
    CacheFull {
        /// Positions the step needs.
        needed: usize,
        /// Preallocated positions.
        capacity: usize,
    },
    /// Writing an output file failed.
    #[error(transparent)]
    Write(#[from] crate::fs::FsError),
    /// An NF4 (bitsandbytes 4-bit) weight is malformed: a part missing, of the wrong dtype
    /// or size, or a corrupt quant-state blob.
    #[error("NF4 weight in {dir}: {source}")]
    Quant {
        /// The checkpoint directory.
        dir: std::path::PathBuf,
        /// What is wrong, naming the tensor.
        #[source]
        source: crate::quant::QuantError,
    },
    /// Reading a tensor back to the host failed.
    #[error("reading tensor `{what}` back from the device: {reason}")]
    Readback {
        /// Which tensor.
        what: &'static str,
        /// burn's message.
        reason: String,
    },
    /// A LoRA adapter directory is unreadable or invalid.
    #[error(transparent)]
    Adapter(#[from] crate::model::lora::LoraError),
    /// A LoRA adapter does not fit the model.
    #[error(transparent)]
    Adapt(#[from] AdaptError),
}

/// Why an adapter does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// The adapter names a projection the model lacks (layer out of range, other module).
    #[error("adapter site {site} does not exist in the model ({layers} decoder layers, targets {targets})", targets = TARGET_MODULES.join(", "))]
    UnknownSite {
        /// peft prefix of the site.
        site: String,
        /// Decoder layers of the model.
        layers: usize,
    },
    /// A pair's shapes do not fit its projection.
    #[error("adapter site {site}: lora_A {a:?} and lora_B {b:?} do not fit the projection (d_in {d_in}, d_out {d_out}): expected [r, {d_in}] and [{d_out}, r]")]
    Shape {
        /// peft prefix of the site.
        site: String,
        /// `lora_A` shape `[r, d_in]`.
        a: [usize; 2],
        /// `lora_B` shape `[d_out, r]`.
        b: [usize; 2],
        /// Input features of the projection.
        d_in: usize,
        /// Output features of the projection.
        d_out: usize,
    },
    /// Export was asked of a model without LoRA pairs.
    #[error("the model has no LoRA pairs attached")]
    NoLora,
    /// The attached pairs disagree on rank, scaling or dropout (one peft config cannot hold them).
    #[error("LoRA pairs disagree: {first} has r {r0}, scaling {s0}, dropout {d0}; {other} has r {r1}, scaling {s1}, dropout {d1}")]
    Mixed {
        first: String,
        r0: usize,
        s0: f64,
        d0: f64,
        other: String,
        r1: usize,
        s1: f64,
        d1: f64,
    },
}
