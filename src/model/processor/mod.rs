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
//!
//! - `config`: the `preprocessor_config.json` schema and its validated form;
//! - `decode`: reading an image file (EXIF, decode limit) and `convert_to_rgb` (step 1);
//! - `resize`: [`smart_resize`] and the Pillow-exact [`resize_bicubic`] (steps 2–3);
//! - `patchify`: rescale/normalize and the patch order (steps 4–5);
//! - `preprocess`: [`ImageProcessor`], the steps in order; `error`: the error types.

mod config;
mod decode;
mod error;
mod patchify;
mod preprocess;
mod resize;

pub use config::{HfPreprocessorConfig, ProcessorConfig};
pub use decode::{convert_to_rgb, DEFAULT_MAX_INPUT_PIXELS};
pub use error::{GeometryError, ImageErrorMessage, ProcessorError};
pub use preprocess::{ImageInput, ImageProcessor, ProcessedImages};
pub use resize::{resize_bicubic, smart_resize};

#[cfg(test)]
mod tests;
