//! Qwen2-VL / Qwen2.5-VL image processor: decoded image → `pixel_values` `[num_patches, C·T·P·P]`
//! plus `image_grid_thw`.
//!
//! Follows transformers 5 `models/qwen2_vl/image_processing_qwen2_vl.py`, class
//! `Qwen2VLImageProcessor(TorchvisionBackend)`. In transformers 5 that torchvision class is what
//! `AutoImageProcessor` builds for Qwen2.5-VL by default (the PIL/NumPy one moved to
//! `image_processing_pil_qwen2_vl.py` as `Qwen2VLImageProcessorPil`), and it is the class the
//! fixtures in `shared/fixtures/qwen2_5_vl_tiny` were made with. Steps, in its order:
//!
//! 1. convert to RGB (`convert_to_rgb`: an alpha channel is composited over white, as PIL's
//!    `alpha_composite` onto a white RGBA canvas does);
//! 2. [`smart_resize`]: both sides a multiple of `patch_size·merge_size`, pixel count within
//!    `[min_pixels, max_pixels]`, aspect ratio kept; a ratio above 200 is an error;
//! 3. bicubic resize with antialiasing. The torchvision backend on CPU resizes `uint8` tensors with
//!    torch's native `uint8` antialiased bicubic kernel (torchvision `_do_native_uint8_resize_on_cpu`
//!    is true for BICUBIC), which is a port of Pillow's `ImagingResample`; the PIL backend calls
//!    Pillow itself. [`resize_bicubic`] implements Pillow's algorithm (Keys cubic with a = -0.5,
//!    support stretched by the downscale factor, 22-bit fixed-point weights, horizontal pass then
//!    vertical, each rounded to `u8`). It is bit-exact with Pillow 12.3 on the test images
//!    (`resize_matches_pillow_bicubic_bit_for_bit`). Torch's `uint8` kernel keeps that
//!    horizontal-first order but uses 16-bit weights, so it may differ by one `u8` level on rare
//!    pixels, i.e. at most `1/255/std ≈ 0.0146` in a normalized value (not measured here: no torch
//!    on this machine). Pillow 13 (python-pillow/Pillow#9549) does the vertical pass first when the
//!    height shrinks much more than the width; we measured up to 13 `u8` levels of difference from
//!    that order, and follow the torch/Pillow-12 order;
//! 4. rescale by `rescale_factor` and normalize with `image_mean`/`image_std`, fused the way the
//!    torchvision backend fuses them (`(x - mean/rescale) / (std/rescale)` in f32);
//! 5. repeat the frame `temporal_patch_size` times and flatten into patches in the reference's
//!    order: `[t, h/m, w/m, m, m] × [C, T, P, P]` (the permute `(0, 3, 6, 4, 7, 2, 1, 5, 8)`).
//!
//! Several images are processed one by one and concatenated along the patch axis.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::Deserialize;

/// CLIP image mean, the transformers default for `image_mean` (`OPENAI_CLIP_MEAN`).
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP image std, the transformers default for `image_std` (`OPENAI_CLIP_STD`).
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// transformers default `size.shortest_edge` (= min pixels): 56·56.
const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
/// transformers default `size.longest_edge` (= max pixels): 28·28·1280.
const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// `PILImageResampling.BICUBIC`, the only resampling this processor implements.
const PIL_BICUBIC: u32 = 3;
/// Largest aspect ratio `smart_resize` accepts (transformers raises above it).
const MAX_ASPECT_RATIO: f64 = 200.0;
/// Largest image, in pixels, that is decoded at all: Pillow's decompression-bomb limit
/// (`Image.MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3`), checked on the header before decoding.
pub const DEFAULT_MAX_INPUT_PIXELS: u64 = 1024 * 1024 * 1024 / 4 / 3;

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

/// A number or a per-channel list, as transformers accepts for `image_mean`/`image_std`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Each(Vec<f64>),
}

/// `size` in the transformers-5 form `{shortest_edge, longest_edge}` (both are pixel counts here).
#[derive(Debug, Clone, Default, Deserialize)]
struct HfSize {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

/// `preprocessor_config.json` of a Qwen2-VL-family checkpoint, with HF names and defaults.
/// Unknown keys (`image_processor_type`, `processor_class`, …) are ignored, as transformers does.
#[derive(Debug, Clone, Deserialize)]
pub struct HfPreprocessorConfig {
    /// Resize with [`smart_resize`] (default true).
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// PIL resampling code; only 3 (BICUBIC, the default) is supported.
    #[serde(default = "bicubic")]
    pub resample: u32,
    /// Multiply pixel values by `rescale_factor` (default true).
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Rescale factor (default 1/255).
    #[serde(default = "one_over_255")]
    pub rescale_factor: f64,
    /// Normalize with `image_mean`/`image_std` (default true).
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default)]
    image_mean: Option<PerChannel>,
    #[serde(default)]
    image_std: Option<PerChannel>,
    /// Convert to RGB first (default true; grayscale/alpha inputs need it).
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    /// Lower bound of the resized pixel count; overrides `size.shortest_edge`.
    #[serde(default)]
    pub min_pixels: Option<u64>,
    /// Upper bound of the resized pixel count; overrides `size.longest_edge`.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    #[serde(default)]
    size: Option<HfSize>,
    /// Spatial patch side, pixels (default 14).
    #[serde(default = "fourteen")]
    pub patch_size: u32,
    /// Frames per temporal patch (default 2).
    #[serde(default = "two")]
    pub temporal_patch_size: u32,
    /// Spatial merge factor of the vision merger (default 2).
    #[serde(default = "two")]
    pub merge_size: u32,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    PIL_BICUBIC
}
fn one_over_255() -> f64 {
    1.0 / 255.0
}
fn fourteen() -> u32 {
    14
}
fn two() -> u32 {
    2
}

impl Default for HfPreprocessorConfig {
    fn default() -> Self {
        // serde defaults are the transformers defaults; an empty object yields them all.
        serde_json::from_str("{}").expect("every field of HfPreprocessorConfig has a default")
    }
}

/// Validated processor settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Resize with [`smart_resize`].
    pub do_resize: bool,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Rescale factor applied to `u8` values.
    pub rescale_factor: f64,
    /// Normalize with `image_mean`/`image_std`.
    pub do_normalize: bool,
    /// Per-channel mean (RGB), in rescaled units.
    pub image_mean: [f64; 3],
    /// Per-channel std (RGB), in rescaled units.
    pub image_std: [f64; 3],
    /// Convert to RGB (alpha over white) before anything else.
    pub do_convert_rgb: bool,
    /// Lower bound of the resized pixel count, pixels.
    pub min_pixels: u64,
    /// Upper bound of the resized pixel count, pixels.
    pub max_pixels: u64,
    /// Spatial patch side, pixels.
    pub patch_size: u32,
    /// Frames per temporal patch.
    pub temporal_patch_size: u32,
    /// Spatial merge factor.
    pub merge_size: u32,
}

impl HfPreprocessorConfig {
    /// Checks the values and resolves `min_pixels`/`max_pixels` against `size` the way the
    /// transformers-5 constructor does (`min_pixels`/`max_pixels` win over `size`).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidConfig`] naming `path` and the offending key.
    pub fn resolve(&self, path: &Path) -> Result<ProcessorConfig, ProcessorError> {
        let bad = |reason: String| ProcessorError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        if self.resample != PIL_BICUBIC {
            return Err(bad(format!(
                "`resample` {} is not supported (only 3, bicubic, is implemented)",
                self.resample
            )));
        }
        let size = self.size.clone().unwrap_or_default();
        let min_pixels = match (self.min_pixels, size.shortest_edge, &self.size) {
            (Some(v), _, _) | (None, Some(v), _) => v,
            (None, None, None) => DEFAULT_MIN_PIXELS,
            (None, None, Some(_)) => {
                return Err(bad(
                    "`size` must contain `shortest_edge` and `longest_edge`".into(),
                ))
            }
        };
        let max_pixels = match (self.max_pixels, size.longest_edge, &self.size) {
            (Some(v), _, _) | (None, Some(v), _) => v,
            (None, None, None) => DEFAULT_MAX_PIXELS,
            (None, None, Some(_)) => {
                return Err(bad(
                    "`size` must contain `shortest_edge` and `longest_edge`".into(),
                ))
            }
        };
        if max_pixels == 0 || min_pixels > max_pixels {
            return Err(bad(format!(
                "min_pixels {min_pixels} / max_pixels {max_pixels} do not form a range"
            )));
        }
        for (key, v) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
        ] {
            if v == 0 {
                return Err(bad(format!("`{key}` must be positive")));
            }
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return Err(bad(format!(
                "`rescale_factor` {} must be positive",
                self.rescale_factor
            )));
        }
        let channels = |key: &str, v: &Option<PerChannel>, default: [f64; 3]| match v {
            None => Ok(default),
            Some(PerChannel::One(x)) => Ok([*x; 3]),
            Some(PerChannel::Each(xs)) => <[f64; 3]>::try_from(xs.as_slice())
                .map_err(|_| bad(format!("`{key}` has {} values, expected 3", xs.len()))),
        };
        let image_mean = channels("image_mean", &self.image_mean, OPENAI_CLIP_MEAN)?;
        let image_std = channels("image_std", &self.image_std, OPENAI_CLIP_STD)?;
        if image_std.iter().any(|s| !(s.is_finite() && *s != 0.0)) {
            return Err(bad(format!(
                "`image_std` {image_std:?} must be finite and non-zero"
            )));
        }
        Ok(ProcessorConfig {
            do_resize: self.do_resize,
            do_rescale: self.do_rescale,
            rescale_factor: self.rescale_factor,
            do_normalize: self.do_normalize,
            image_mean,
            image_std,
            do_convert_rgb: self.do_convert_rgb,
            min_pixels,
            max_pixels,
            patch_size: self.patch_size,
            temporal_patch_size: self.temporal_patch_size,
            merge_size: self.merge_size,
        })
    }
}

/// One image to preprocess: a file to decode, or an image already in memory.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A PNG or JPEG file.
    Path(PathBuf),
    /// An already decoded image.
    Image(DynamicImage),
}

impl From<&Path> for ImageInput {
    fn from(p: &Path) -> Self {
        ImageInput::Path(p.to_path_buf())
    }
}
impl From<PathBuf> for ImageInput {
    fn from(p: PathBuf) -> Self {
        ImageInput::Path(p)
    }
}
impl From<DynamicImage> for ImageInput {
    fn from(i: DynamicImage) -> Self {
        ImageInput::Image(i)
    }
}

/// The processor's output for a list of images, concatenated in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImages {
    /// Row-major `[num_patches, patch_dim]` normalized patch values.
    pub pixel_values: Vec<f32>,
    /// Rows of `pixel_values`: Σ over images of `t·h·w`.
    pub num_patches: usize,
    /// Columns of `pixel_values`: `C · temporal_patch_size · patch_size²` (1176 for Qwen2.5-VL).
    pub patch_dim: usize,
    /// Per image `[grid_t, grid_h, grid_w]` in patches (`image_grid_thw`).
    pub grid_thw: Vec<[u32; 3]>,
}

/// The Qwen2-VL image processor (see the module doc for the exact steps).
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ProcessorConfig,
    max_input_pixels: u64,
}

impl ImageProcessor {
    /// A processor with these settings and the default decode limit
    /// ([`DEFAULT_MAX_INPUT_PIXELS`]).
    pub fn new(config: ProcessorConfig) -> Self {
        Self {
            config,
            max_input_pixels: DEFAULT_MAX_INPUT_PIXELS,
        }
    }

    /// Reads and validates a `preprocessor_config.json`.
    ///
    /// # Errors
    /// `ReadConfig`, `ParseConfig` or `InvalidConfig`, each naming `path`.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self, ProcessorError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ProcessorError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfPreprocessorConfig =
            serde_json::from_str(&text).map_err(|source| ProcessorError::ParseConfig {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::new(hf.resolve(path)?))
    }

    /// Changes the largest image (in pixels, from its header) that will be decoded.
    pub fn with_max_input_pixels(mut self, max_input_pixels: u64) -> Self {
        self.max_input_pixels = max_input_pixels;
        self
    }

    /// The validated settings.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Spatial merge factor: each `merge_size²` patches become one LLM token.
    pub fn merge_size(&self) -> u32 {
        self.config.merge_size
    }

    /// Decodes an image file and applies its EXIF orientation, refusing before decoding one whose
    /// header announces more than the decode limit.
    ///
    /// # Errors
    /// `OpenImage`, `ImageTooLarge` or `DecodeImage`, each naming `path`.
    pub fn load_image(&self, path: &Path) -> Result<DynamicImage, ProcessorError> {
        let open = || {
            ImageReader::open(path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|source| ProcessorError::OpenImage {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let decode_err = |source| ProcessorError::DecodeImage {
            path: path.to_path_buf(),
            source: ImageErrorMessage(source),
        };
        let (width, height) = open()?.into_dimensions().map_err(decode_err)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_input_pixels {
            return Err(ProcessorError::ImageTooLarge {
                path: path.to_path_buf(),
                width,
                height,
                pixels,
                max_pixels: self.max_input_pixels,
            });
        }
        // transformers' `load_image` applies the EXIF orientation (`ImageOps.exif_transpose`), so
        // a phone photo of a page is upright before it is resized.
        let mut decoder = open()?.into_decoder().map_err(decode_err)?;
        let orientation = decoder.orientation().map_err(decode_err)?;
        let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
        img.apply_orientation(orientation);
        Ok(img)
    }

    /// Preprocesses images (decoding the paths) into concatenated patches.
    ///
    /// # Shapes
    /// - returns `pixel_values` `[Σ t·h·w, C·T·P·P]` and one `[t, h, w]` per image
    ///
    /// # Errors
    /// `NoImages`, any `load_image` error, or `Geometry` (aspect ratio above 200, degenerate size).
    pub fn preprocess(&self, images: &[ImageInput]) -> Result<ProcessedImages, ProcessorError> {
        if images.is_empty() {
            return Err(ProcessorError::NoImages);
        }
        let c = &self.config;
        let patch_dim = 3 * (c.temporal_patch_size * c.patch_size * c.patch_size) as usize;
        let mut out = ProcessedImages {
            pixel_values: Vec::new(),
            num_patches: 0,
            patch_dim,
            grid_thw: Vec::with_capacity(images.len()),
        };
        for (i, input) in images.iter().enumerate() {
            let (label, rgb) = match input {
                ImageInput::Path(p) => (p.display().to_string(), self.to_rgb(self.load_image(p)?)),
                ImageInput::Image(img) => (format!("#{i}"), self.to_rgb(img.clone())),
            };
            let grid = self.process_one(&label, &rgb, &mut out.pixel_values)?;
            out.num_patches += (grid[0] * grid[1] * grid[2]) as usize;
            out.grid_thw.push(grid);
        }
        tracing::debug!(
            images = images.len(),
            patches = out.num_patches,
            "preprocessed images"
        );
        Ok(out)
    }

    fn to_rgb(&self, img: DynamicImage) -> RgbImage {
        if self.config.do_convert_rgb {
            convert_to_rgb(&img)
        } else {
            img.into_rgb8()
        }
    }

    /// Resizes, normalizes and patchifies one RGB image, appending its patches to `out`.
    fn process_one(
        &self,
        label: &str,
        img: &RgbImage,
        out: &mut Vec<f32>,
    ) -> Result<[u32; 3], ProcessorError> {
        let c = &self.config;
        let (width, height) = img.dimensions();
        let geometry = |source: GeometryError| ProcessorError::Geometry {
            image: label.to_string(),
            width,
            height,
            source,
        };
        let resized;
        let img = if c.do_resize {
            let (h, w) = smart_resize(
                height,
                width,
                c.patch_size * c.merge_size,
                c.min_pixels,
                c.max_pixels,
            )
            .map_err(geometry)?;
            resized = resize_bicubic(img, w, h);
            &resized
        } else {
            img
        };
        let (w, h) = img.dimensions();
        let unit = c.patch_size * c.merge_size;
        if w % unit != 0 || h % unit != 0 || w == 0 || h == 0 {
            return Err(geometry(GeometryError::OffGrid { unit }));
        }
        let plane = normalize(img, c);
        patchify(&plane, w as usize, h as usize, c, out);
        Ok([1, h / c.patch_size, w / c.patch_size])
    }
}

/// Target `(height, width)` for an image, transformers' `smart_resize`: both sides multiples of
/// `factor`, pixel count within `[min_pixels, max_pixels]`, aspect ratio kept as well as possible.
///
/// Exactly the reference arithmetic: `round` is Python's (ties to even), then `floor`/`ceil` on
/// `side / beta / factor` resp. `side * beta / factor` in f64.
///
/// # Errors
/// [`GeometryError`] when a side is zero, the aspect ratio exceeds 200, or the result is unusable.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), GeometryError> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(GeometryError::Empty {
            height,
            width,
            factor,
        });
    }
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(GeometryError::AspectRatio { ratio });
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < 1.0 || w_bar < 1.0 || h_bar > f64::from(u32::MAX) || w_bar > f64::from(u32::MAX) {
        return Err(GeometryError::Unusable {
            height: h_bar,
            width: w_bar,
        });
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// transformers `convert_to_rgb`: RGB as is; anything with alpha is alpha-composited onto white
/// with Pillow's integer `alpha_composite` arithmetic; other modes are converted to RGB.
pub fn convert_to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for ch in 0..3 {
            o[ch] = composite_over_white(u32::from(p[ch]), a);
        }
    }
    out
}

/// Pillow `ImagingAlphaComposite` of a pixel with alpha `a` over opaque white, for one channel:
/// with the destination opaque, `coef1 = a·128`, `coef2 = (255 - a)·128` (7 precision bits) and the
/// division by 255 is Pillow's `SHIFTFORDIV255`.
fn composite_over_white(v: u32, a: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 - a) << PRECISION_BITS;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS).min(255) as u8
}

/// Channel-first f32 planes `[3, h, w]` after rescale/normalize, with the torchvision backend's
/// arithmetic: when both are on it divides `(x - mean/rescale)` by `std/rescale` in f32.
fn normalize(img: &RgbImage, c: &ProcessorConfig) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    // Per channel: value = (x - sub) / div, or x * mul.
    let inv = (1.0 / c.rescale_factor) as f32;
    let mut sub = [0f32; 3];
    let mut div = [1f32; 3];
    let mut mul = 1f32;
    for ch in 0..3 {
        if c.do_normalize {
            let (m, s) = (c.image_mean[ch] as f32, c.image_std[ch] as f32);
            (sub[ch], div[ch]) = if c.do_rescale {
                (m * inv, s * inv)
            } else {
                (m, s)
            };
        } else if c.do_rescale {
            mul = c.rescale_factor as f32;
        }
    }
    let mut planes = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for ch in 0..3 {
            let x = f32::from(p[ch]);
            planes[ch * n + i] = if c.do_normalize {
                (x - sub[ch]) / div[ch]
            } else {
                x * mul
            };
        }
    }
    planes
}

/// Appends the patches of one frame (repeated `temporal_patch_size` times) to `out`.
///
/// # Shapes
/// - `planes`: `[3, h, w]`; appends `[(h/P)·(w/P), 3·T·P·P]` rows in the order
///   `[h/(mP), w/(mP), m, m]` × `[C, T, P, P]` (reference permute `(0, 3, 6, 4, 7, 2, 1, 5, 8)`)
fn patchify(planes: &[f32], w: usize, h: usize, c: &ProcessorConfig, out: &mut Vec<f32>) {
    let (p, m, t) = (
        c.patch_size as usize,
        c.merge_size as usize,
        c.temporal_patch_size as usize,
    );
    let (gh, gw) = (h / p, w / p);
    out.reserve(gh * gw * 3 * t * p * p);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for ch in 0..3 {
                        let plane = &planes[ch * w * h..(ch + 1) * w * h];
                        // A still image: every temporal slot holds the same frame.
                        for _ in 0..t {
                            for py in 0..p {
                                let row = (y0 + py) * w + x0;
                                out.extend_from_slice(&plane[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling weights (`32 - 8 - 2`).
const RESAMPLE_PRECISION_BITS: u32 = 22;

/// Keys cubic convolution kernel with a = -0.5, as Pillow's `bicubic_filter` (support 2).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel source window and fixed-point weights along one axis (Pillow
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct AxisCoeffs {
    /// `ksize` weights per output pixel; only the first `bounds[i].1` are used.
    ksize: usize,
    /// `(first source index, number of source pixels)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn axis_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    // Downscaling stretches the kernel (antialiasing); upscaling uses it as is.
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, then clamps to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            *kx = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *kx;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, kx) in k.iter().enumerate().take(n) {
            let w = if total != 0.0 { kx / total } else { *kx };
            let fixed = w * f64::from(1u32 << RESAMPLE_PRECISION_BITS);
            // C `(int)(±0.5 + w·2^22)`: round half away from zero via truncation.
            row[x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    AxisCoeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow `clip8`: fixed-point accumulator to `u8`.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << RESAMPLE_PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> RESAMPLE_PRECISION_BITS) as u8
    }
}

/// Bicubic resize with antialiasing, Pillow's `Image.resize(size, BICUBIC)` on an RGB image:
/// a horizontal pass (skipped when the width is unchanged) then a vertical pass (skipped when the
/// height is unchanged), each with 22-bit fixed-point weights and rounding to `u8`.
pub fn resize_bicubic(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let mut cur: Vec<u8> = src.as_raw().clone();
    let mut cur_w = in_w;
    if ow != in_w {
        let co = axis_coeffs(in_w, ow);
        let mut next = vec![0u8; ow * in_h * 3];
        for y in 0..in_h {
            let line = &cur[y * cur_w * 3..(y + 1) * cur_w * 3];
            for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
                let k = &co.weights[xx * co.ksize..xx * co.ksize + n];
                for ch in 0..3 {
                    let mut ss = 1i64 << (RESAMPLE_PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        ss += i64::from(line[(xmin + x) * 3 + ch]) * i64::from(kx);
                    }
                    next[(y * ow + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        cur = next;
        cur_w = ow;
    }
    if oh != in_h {
        let co = axis_coeffs(in_h, oh);
        let mut next = vec![0u8; cur_w * oh * 3];
        for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
            let k = &co.weights[yy * co.ksize..yy * co.ksize + n];
            for i in 0..cur_w * 3 {
                let mut ss = 1i64 << (RESAMPLE_PRECISION_BITS - 1);
                for (y, &ky) in k.iter().enumerate() {
                    ss += i64::from(cur[(ymin + y) * cur_w * 3 + i]) * i64::from(ky);
                }
                next[yy * cur_w * 3 + i] = clip8(ss);
            }
        }
        cur = next;
    }
    RgbImage::from_raw(out_w, out_h, cur).expect("buffer is out_w·out_h·3 by construction")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, fixture};
    use safetensors::SafeTensors;

    /// The fixture image needs no resize and we do the reference's f32 operations in its order:
    /// measured max |diff| is 0 (bit-exact); 1e-5 leaves room for FMA contraction on other CPUs.
    const PIXEL_ATOL: f32 = 1e-5;

    fn reference() -> Vec<u8> {
        std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap()
    }

    fn tiny_processor() -> ImageProcessor {
        ImageProcessor::from_config_file(fixture("qwen2_5_vl_tiny/preprocessor_config.json"))
            .unwrap()
    }

    #[test]
    fn fixture_image_matches_reference_pixel_values_and_grid() {
        let proc = tiny_processor();
        let out = proc
            .preprocess(&[fixture("qwen2_5_vl_tiny/image0.png").into()])
            .unwrap();
        let bytes = reference();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let pv = st.tensor("pixel_values").unwrap();
        assert_eq!(pv.shape(), &[out.num_patches, out.patch_dim]);
        let want: Vec<f32> = pv
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_close("pixel_values", &out.pixel_values, &want, PIXEL_ATOL);
        let grid = st.tensor("image_grid_thw").unwrap();
        let want_grid: Vec<u32> = grid
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        assert_eq!(
            out.grid_thw,
            vec![[want_grid[0], want_grid[1], want_grid[2]]]
        );
    }

    #[test]
    fn two_images_are_concatenated_in_order() {
        let proc = tiny_processor();
        let path = fixture("qwen2_5_vl_tiny/image0.png");
        let one = proc.preprocess(&[path.clone().into()]).unwrap();
        let small = DynamicImage::ImageRgb8(RgbImage::from_pixel(56, 56, image::Rgb([9, 99, 199])));
        let two = proc.preprocess(&[path.into(), small.into()]).unwrap();
        assert_eq!(two.grid_thw, vec![[1, 8, 10], [1, 4, 4]]);
        assert_eq!(two.num_patches, 80 + 16);
        assert_eq!(two.pixel_values.len(), two.num_patches * two.patch_dim);
        assert_eq!(
            &two.pixel_values[..one.pixel_values.len()],
            &one.pixel_values[..]
        );
    }

    #[test]
    fn config_accepts_size_form_and_defaults_match_transformers() {
        let hf: HfPreprocessorConfig =
            serde_json::from_str(r#"{"size": {"shortest_edge": 1000, "longest_edge": 9000}}"#)
                .unwrap();
        let c = hf.resolve(Path::new("p.json")).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (1000, 9000));
        let d = HfPreprocessorConfig::default()
            .resolve(Path::new("p.json"))
            .unwrap();
        assert_eq!((d.min_pixels, d.max_pixels), (3136, 1_003_520));
        assert_eq!(
            (d.patch_size, d.temporal_patch_size, d.merge_size),
            (14, 2, 2)
        );
        assert_eq!(d.image_mean, OPENAI_CLIP_MEAN);
        assert!(d.do_resize && d.do_rescale && d.do_normalize && d.do_convert_rgb);
        // min_pixels/max_pixels override `size`, as in the transformers-5 constructor.
        let hf: HfPreprocessorConfig = serde_json::from_str(
            r#"{"min_pixels": 5, "max_pixels": 50, "size": {"shortest_edge": 1, "longest_edge": 2}}"#,
        )
        .unwrap();
        let c = hf.resolve(Path::new("p.json")).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (5, 50));
    }

    #[test]
    fn config_with_incomplete_size_or_bad_resample_is_rejected_naming_the_file() {
        let hf: HfPreprocessorConfig =
            serde_json::from_str(r#"{"size": {"shortest_edge": 10}}"#).unwrap();
        let e = hf
            .resolve(Path::new("dir/pp.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dir/pp.json") && e.contains("longest_edge"),
            "{e}"
        );
        let hf: HfPreprocessorConfig = serde_json::from_str(r#"{"resample": 2}"#).unwrap();
        let e = hf
            .resolve(Path::new("dir/pp.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("resample"), "{e}");
    }

    /// Values derived by hand from the reference formula (factor 28):
    /// - 100x150: round(100/28)=4 → 112, round(150/28)=5 → 140; 15680 within [3136, 1003520].
    /// - 70x42: 70/28 = 2.5 rounds to even 2 → 56; 42/28 = 1.5 → 2 → 56 (Python ties-to-even).
    /// - 1000x2000 with max 50176: beta = sqrt(2e6/50176) = 6.3135…; 1000/β/28 = 5.657 → 5 → 140;
    ///   2000/β/28 = 11.31 → 11 → 308; 140·308 = 43120 ≤ 50176.
    /// - 20x30 with min 3136: round → 28x28 = 784 < 3136; beta = sqrt(3136/600) = 2.2862;
    ///   20·β/28 = 1.633 → 2 → 56; 30·β/28 = 2.449 → 3 → 84.
    #[test]
    fn smart_resize_follows_the_reference_rule() {
        assert_eq!(smart_resize(100, 150, 28, 3136, 1_003_520), Ok((112, 140)));
        assert_eq!(smart_resize(70, 42, 28, 3136, 1_003_520), Ok((56, 56)));
        assert_eq!(smart_resize(1000, 2000, 28, 3136, 50176), Ok((140, 308)));
        assert_eq!(smart_resize(20, 30, 28, 3136, 1_003_520), Ok((56, 84)));
        // Already multiples of 28 inside the range: unchanged (the fixture's 112x140).
        assert_eq!(smart_resize(112, 140, 28, 3136, 50176), Ok((112, 140)));
        // A thin strip under max_pixels clamping keeps at least one factor per side.
        assert_eq!(
            smart_resize(30, 5000, 28, 3136, 50176).map(|(h, _)| h),
            Ok(28)
        );
    }

    #[test]
    fn smart_resize_rejects_extreme_aspect_ratio() {
        let e = smart_resize(10, 2001, 28, 3136, 1_003_520).unwrap_err();
        assert_eq!(e, GeometryError::AspectRatio { ratio: 200.1 });
        let img = DynamicImage::ImageRgb8(RgbImage::new(2001, 10));
        let e = tiny_processor().preprocess(&[img.into()]).unwrap_err();
        assert!(
            matches!(e, ProcessorError::Geometry { width: 2001, .. }),
            "{e:?}"
        );
        assert!(smart_resize(10, 2000, 28, 3136, 1_003_520).is_ok());
    }

    #[test]
    fn constant_image_stays_constant_through_resize() {
        let src = RgbImage::from_pixel(45, 33, image::Rgb([7, 128, 250]));
        for (w, h) in [(56, 28), (28, 84), (90, 66), (14, 14)] {
            let out = resize_bicubic(&src, w, h);
            assert!(out.pixels().all(|p| p.0 == [7, 128, 250]), "{w}x{h}");
        }
    }

    /// Upscaling 2x horizontally: output x sits at source position (x+0.5)/2 - 0.5, and the Keys
    /// kernel (a = -0.5) reproduces linear functions exactly away from the borders, so a ramp
    /// v = 10 + 4·x becomes 10 + 4·(x/2 - 0.25) = 9 + 2·x.
    #[test]
    fn linear_ramp_stays_linear_inside_when_upscaling() {
        let src = RgbImage::from_fn(30, 3, |x, _| {
            let v = (10 + 4 * x) as u8;
            image::Rgb([v, v, v])
        });
        let out = resize_bicubic(&src, 60, 3);
        for x in 4..56u32 {
            assert_eq!(out.get_pixel(x, 1)[0], (9 + 2 * x) as u8, "x = {x}");
        }
    }

    /// An impulse of +180 over 20, upscaled 2x: the four outputs around it see the kernel at
    /// distances 0.25, 0.75, 1.25, 1.75, whose Keys(a=-0.5) weights are 0.8671875, 0.2265625,
    /// -0.0703125, -0.0234375 (computed by hand), so the outputs are 20 + 180·w rounded:
    /// 176, 61, 7, 16.
    #[test]
    fn impulse_response_matches_hand_computed_bicubic_weights() {
        let src = RgbImage::from_fn(16, 1, |x, _| {
            let v = if x == 8 { 200 } else { 20 };
            image::Rgb([v, v, v])
        });
        let out = resize_bicubic(&src, 32, 1);
        let row: Vec<u8> = (0..32).map(|x| out.get_pixel(x, 0)[0]).collect();
        // Output 16 is at source 7.75 (distance 0.25 from x = 8), output 17 at 8.25.
        assert_eq!(&row[12..22], &[20, 16, 7, 61, 176, 176, 61, 7, 16, 20]);
    }

    /// Test image used for the Pillow comparison (must match `scripts/pil_bicubic_reference.py`).
    fn synthetic(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 37 + y * 11) % 256) as u8,
                ((x * x + 3 * y * y) % 256) as u8,
                (((x ^ y) * 29 + 5) % 256) as u8,
            ])
        })
    }

    /// `tests/data/pil_bicubic.bin` holds Pillow's `Image.resize(size, Image.BICUBIC)` of
    /// [`synthetic`] images, made by `python3 scripts/pil_bicubic_reference.py` (Pillow 12.3).
    /// Layout: for each case in order, the raw RGB bytes of the output.
    const PIL_CASES: [((u32, u32), (u32, u32)); 5] = [
        ((45, 33), (56, 28)),
        ((100, 75), (84, 56)),
        ((37, 61), (28, 112)),
        ((300, 17), (56, 28)),
        ((60, 60), (56, 28)),
    ];

    /// Tolerance against Pillow: none. The integer algorithm is the same, so every byte must match.
    #[test]
    fn resize_matches_pillow_bicubic_bit_for_bit() {
        let want = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil_bicubic.bin"),
        )
        .unwrap();
        let mut at = 0;
        for ((iw, ih), (ow, oh)) in PIL_CASES {
            let got = resize_bicubic(&synthetic(iw, ih), ow, oh);
            let n = (ow * oh * 3) as usize;
            let diff = got
                .as_raw()
                .iter()
                .zip(&want[at..at + n])
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                diff, 0,
                "{iw}x{ih} -> {ow}x{oh}: {diff} bytes differ from Pillow"
            );
            at += n;
        }
        assert_eq!(at, want.len());
    }

    #[test]
    fn non_multiple_of_28_image_is_resized_to_the_smart_resize_grid() {
        let proc = tiny_processor();
        let img = DynamicImage::ImageRgb8(synthetic(100, 75));
        let out = proc.preprocess(&[img.into()]).unwrap();
        // smart_resize(75, 100): round(75/28)=3 → 84, round(100/28)=4 → 112: grid 6 x 8.
        assert_eq!(out.grid_thw, vec![[1, 6, 8]]);
        assert_eq!(out.num_patches, 48);
        // First value: channel R, top-left pixel of the resized image, normalized.
        let resized = resize_bicubic(&synthetic(100, 75), 112, 84);
        let r = f32::from(resized.get_pixel(0, 0)[0]);
        let want = (r - 0.48145466f32 * 255.0) / (0.26862954f32 * 255.0);
        assert_close("first value", &out.pixel_values[..1], &[want], PIXEL_ATOL);
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let img = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                image::Rgba([0, 0, 0, 0])
            } else {
                image::Rgba([0, 100, 200, 128])
            }
        }));
        let rgb = convert_to_rgb(&img);
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        // (v·128 + 255·127)/255 rounded: 127, 177, 227.
        assert_eq!(rgb.get_pixel(1, 0).0, [127, 177, 227]);
    }

    #[test]
    fn corrupt_png_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.png");
        let good = std::fs::read(fixture("qwen2_5_vl_tiny/image0.png")).unwrap();
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let e = tiny_processor()
            .preprocess(&[path.clone().into()])
            .unwrap_err();
        assert!(matches!(e, ProcessorError::DecodeImage { .. }), "{e:?}");
        assert!(e.to_string().contains("broken.png"), "{e}");
        std::fs::write(&path, b"not an image at all").unwrap();
        let e = tiny_processor().preprocess(&[path.into()]).unwrap_err();
        assert!(e.to_string().contains("broken.png"), "{e}");
        // issue 15: the whole chain says what is wrong once
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain.matches("Invalid PNG signature").count(), 1, "{chain}");
    }

    #[test]
    fn missing_file_is_an_error_naming_the_file() {
        let e = tiny_processor()
            .preprocess(&[PathBuf::from("/nonexistent/scan.png").into()])
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/scan.png"), "{e}");
    }

    #[test]
    fn huge_image_is_refused_from_its_header_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        // A real 3000x2000 PNG header; a low limit makes it "absurdly large" without a huge file.
        RgbImage::new(3000, 2000).save(&path).unwrap();
        let proc = tiny_processor().with_max_input_pixels(5_000_000);
        let e = proc.preprocess(&[path.into()]).unwrap_err();
        match &e {
            ProcessorError::ImageTooLarge { width, height, .. } => {
                assert_eq!((*width, *height), (3000, 2000))
            }
            other => panic!("expected ImageTooLarge, got {other:?}"),
        }
        assert!(e.to_string().contains("huge.png"), "{e}");
    }

    #[test]
    fn huge_header_with_tiny_body_is_refused_not_decoded() {
        // A PNG whose IHDR claims 100000x100000 but has no data: the default limit (Pillow's
        // 89.5 Mpx) refuses it from the header alone.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb.png");
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // An empty IDAT and IEND, so that reading the header finds the start of the pixel data.
        for name in [b"IDAT", b"IEND"] {
            png.extend_from_slice(&0u32.to_be_bytes());
            png.extend_from_slice(name);
            png.extend_from_slice(&crc32(name).to_be_bytes());
        }
        std::fs::write(&path, &png).unwrap();
        let e = tiny_processor().preprocess(&[path.into()]).unwrap_err();
        assert!(matches!(e, ProcessorError::ImageTooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("bomb.png"), "{e}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A PNG file of `img` with an `eXIf` chunk (big-endian TIFF, one IFD entry: Orientation).
    fn png_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
        let mut plain = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut plain),
            image::ImageFormat::Png,
        )
        .unwrap();
        let mut exif =
            b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01".to_vec();
        exif.extend_from_slice(&orientation.to_be_bytes());
        exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut chunk = b"eXIf".to_vec();
        chunk.extend_from_slice(&exif);
        // Signature (8) + IHDR chunk (4 + 4 + 13 + 4) come first; eXIf goes right after.
        let mut out = plain[..33].to_vec();
        out.extend_from_slice(&(exif.len() as u32).to_be_bytes());
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        out.extend_from_slice(&plain[33..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_when_loading_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotated.png");
        // 3 wide, 2 high; orientation 6 means "rotate 90° clockwise to display".
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(x * 10 + y) as u8, 0, 0]));
        std::fs::write(&path, png_with_orientation(&img, 6)).unwrap();
        let loaded = tiny_processor().load_image(&path).unwrap().to_rgb8();
        assert_eq!(loaded.dimensions(), (2, 3));
        // After a clockwise turn the old bottom-left pixel (0, 1) is at the top-left.
        assert_eq!(loaded.get_pixel(0, 0)[0], 1);
        assert_eq!(loaded.get_pixel(1, 0)[0], 0);
        assert_eq!(loaded.get_pixel(0, 2)[0], 21);
    }

    #[test]
    fn unreadable_or_malformed_config_is_an_error_naming_the_file() {
        let e =
            ImageProcessor::from_config_file("/nonexistent/preprocessor_config.json").unwrap_err();
        assert!(matches!(e, ProcessorError::ReadConfig { .. }), "{e:?}");
        assert!(e
            .to_string()
            .contains("/nonexistent/preprocessor_config.json"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(&path, r#"{"patch_size": "fourteen"}"#).unwrap();
        let e = ImageProcessor::from_config_file(&path).unwrap_err();
        assert!(matches!(e, ProcessorError::ParseConfig { .. }), "{e:?}");
        assert!(e.to_string().contains("preprocessor_config.json"), "{e}");
    }

    #[test]
    fn without_resize_a_size_off_the_patch_grid_is_an_error() {
        let mut config = tiny_processor().config().clone();
        config.do_resize = false;
        let img = DynamicImage::ImageRgb8(synthetic(100, 75));
        let e = ImageProcessor::new(config)
            .preprocess(&[img.into()])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProcessorError::Geometry {
                    width: 100,
                    height: 75,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn empty_image_list_is_an_error() {
        assert!(matches!(
            tiny_processor().preprocess(&[]),
            Err(ProcessorError::NoImages)
        ));
    }
}
