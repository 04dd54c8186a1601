//! Geometry and resampling: transformers' [`smart_resize`] target size and Pillow's bicubic
//! resize ([`resize_bicubic`], bit-exact with Pillow 12.3; see [`super`] for the pass order).

use image::RgbImage;

use super::error::GeometryError;

/// Largest aspect ratio `smart_resize` accepts (transformers raises above it).
const MAX_ASPECT_RATIO: f64 = 200.0;

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
