//! Decoding: an image file read with its EXIF orientation under a decode limit, and
//! transformers' `convert_to_rgb` (alpha composited over white with Pillow's arithmetic).

use std::io::{BufRead, Cursor, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use super::error::{ImageErrorMessage, ProcessorError};

/// Largest image, in pixels, that is decoded at all: Pillow's decompression-bomb limit
/// (`Image.MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3`), checked on the header before decoding.
pub const DEFAULT_MAX_INPUT_PIXELS: u64 = 1024 * 1024 * 1024 / 4 / 3;

/// Decodes an image file and applies its EXIF orientation, refusing before decoding one whose
/// header announces more than `max_input_pixels` (what
/// [`ImageProcessor::load_image`](super::ImageProcessor::load_image) does).
///
/// # Errors
/// `OpenImage`, `ImageTooLarge` or `DecodeImage`, each naming `path`.
pub(super) fn load_image(
    path: &Path,
    max_input_pixels: u64,
) -> Result<DynamicImage, ProcessorError> {
    let open = || {
        ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|source| ProcessorError::OpenImage {
                path: path.to_path_buf(),
                source,
            })
    };
    decode_with_limit(path, open, max_input_pixels)
}

/// [`load_image`] for an encoded image already in memory (an upload), named `name` in errors.
///
/// # Errors
/// `ImageTooLarge` or `DecodeImage` (not an image, truncated, unsupported), naming `name`.
pub(super) fn decode_bytes(
    name: &str,
    bytes: &[u8],
    max_input_pixels: u64,
) -> Result<DynamicImage, ProcessorError> {
    let path = Path::new(name);
    let open = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|source| ProcessorError::OpenImage {
                path: path.to_path_buf(),
                source,
            })
    };
    decode_with_limit(path, open, max_input_pixels)
}

/// Reads the header of what `open` gives, refuses more than `max_input_pixels`, then decodes
/// and applies the EXIF orientation.
fn decode_with_limit<R: BufRead + Seek>(
    path: &Path,
    open: impl Fn() -> Result<ImageReader<R>, ProcessorError>,
    max_input_pixels: u64,
) -> Result<DynamicImage, ProcessorError> {
    let decode_err = |source| ProcessorError::DecodeImage {
        path: path.to_path_buf(),
        source: ImageErrorMessage(source),
    };
    let (width, height) = open()?.into_dimensions().map_err(decode_err)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_input_pixels {
        return Err(ProcessorError::ImageTooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            max_pixels: max_input_pixels,
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
