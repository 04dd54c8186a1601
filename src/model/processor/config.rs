//! The `preprocessor_config.json` schema ([`HfPreprocessorConfig`], transformers names and
//! defaults) and its validated form ([`ProcessorConfig`]).

use std::path::Path;

use serde::Deserialize;

use super::error::ProcessorError;

/// CLIP image mean, the transformers default for `image_mean` (`OPENAI_CLIP_MEAN`).
pub(super) const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP image std, the transformers default for `image_std` (`OPENAI_CLIP_STD`).
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// transformers default `size.shortest_edge` (= min pixels): 56·56.
const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
/// transformers default `size.longest_edge` (= max pixels): 28·28·1280.
const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// `PILImageResampling.BICUBIC`, the only resampling this processor implements.
const PIL_BICUBIC: u32 = 3;

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
