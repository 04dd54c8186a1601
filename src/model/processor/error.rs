//! Why preprocessing failed: a bad size ([`GeometryError`]) or a file, config or image error
//! ([`ProcessorError`]).

use std::path::PathBuf;

/// Why an image size does not work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeometryError {
    /// A side (or the factor) is zero.
    #[error("height {height}, width {width} and factor {factor} must be positive")]
    Empty {
        height: u32,
        width: u32,
        factor: u32,
    },
    /// Longer side over shorter side exceeds 200 (transformers raises too).
    #[error("absolute aspect ratio must be smaller than 200, got {ratio}")]
    AspectRatio { ratio: f64 },
    /// The computed target size does not fit (zero or beyond `u32`).
    #[error("resized size {width}x{height} is unusable")]
    Unusable { height: f64, width: f64 },
    /// With `do_resize` off, the size must already be on the patch·merge grid.
    #[error(
        "size is not a positive multiple of patch_size·merge_size = {unit} (do_resize is off)"
    )]
    OffGrid { unit: u32 },
}

/// An `image` error as the last link of an error chain. Its message already ends with its
/// inner error's ("Format error decoding Png: Invalid PNG signature."), so also chaining that
/// inner error would print it twice.
#[derive(Debug)]
pub struct ImageErrorMessage(pub image::ImageError);

impl std::fmt::Display for ImageErrorMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ImageErrorMessage {}

/// Errors of the image processor. Every variant names the file or image it is about.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The preprocessor config could not be read.
    #[error("reading preprocessor config {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The preprocessor config is not the JSON we expect.
    #[error("parsing preprocessor config {path}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The preprocessor config parses but its values cannot work.
    #[error("preprocessor config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    /// Overridden resize bounds (`[model] min_pixels`/`max_pixels`) that cannot work with
    /// the model's processor config.
    #[error("min_pixels {min} is above max_pixels {max} (set by [model] or the model's preprocessor_config.json)")]
    PixelBounds { min: u64, max: u64 },
    /// The image file could not be opened.
    #[error("opening image {path}")]
    OpenImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image file does not decode (corrupt, truncated, unsupported format).
    #[error("decoding image {path}")]
    DecodeImage {
        path: PathBuf,
        #[source]
        source: ImageErrorMessage,
    },
    /// The image header announces more pixels than we are willing to decode.
    #[error(
        "image {path} is {width}x{height} = {pixels} pixels, more than the limit of {max_pixels}; \
         refusing to decode it"
    )]
    ImageTooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    /// The image geometry cannot be resized or patchified the Qwen way.
    #[error("image {image} ({width}x{height})")]
    Geometry {
        image: String,
        width: u32,
        height: u32,
        #[source]
        source: GeometryError,
    },
    /// `preprocess` was called with no image.
    #[error("no image to preprocess")]
    NoImages,
}
