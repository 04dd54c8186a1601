//! Seeded scan-like degradations of a rendered page: rotation, blur, speckle and JPEG.

use image::{GrayImage, Luma};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `[prepare.render.degrade]`: scan-like damage, each drawn per page from the seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DegradeConfig {
    /// Share of pages rotated, 0..=1.
    #[serde(default = "default_rotate_prob")]
    pub rotate_prob: f64,
    /// Largest rotation, degrees (either direction).
    #[serde(default = "default_rotate_deg")]
    pub rotate_max_deg: f32,
    /// Share of pages blurred, 0..=1.
    #[serde(default = "default_blur_prob")]
    pub blur_prob: f64,
    /// Gaussian blur sigma, pixels.
    #[serde(default = "default_blur_sigma")]
    pub blur_sigma: f32,
    /// Share of pages with speckle noise, 0..=1.
    #[serde(default = "default_speckle_prob")]
    pub speckle_prob: f64,
    /// Share of pages passed through JPEG compression, 0..=1.
    #[serde(default = "default_jpeg_prob")]
    pub jpeg_prob: f64,
    /// JPEG quality for those pages, 1..=100.
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: u8,
}

fn default_rotate_prob() -> f64 {
    0.3
}
fn default_rotate_deg() -> f32 {
    1.0
}
fn default_blur_prob() -> f64 {
    0.15
}
fn default_blur_sigma() -> f32 {
    0.5
}
fn default_speckle_prob() -> f64 {
    0.25
}
fn default_jpeg_prob() -> f64 {
    0.2
}
fn default_jpeg_quality() -> u8 {
    75
}

impl Default for DegradeConfig {
    fn default() -> Self {
        Self {
            rotate_prob: default_rotate_prob(),
            rotate_max_deg: default_rotate_deg(),
            blur_prob: default_blur_prob(),
            blur_sigma: default_blur_sigma(),
            speckle_prob: default_speckle_prob(),
            jpeg_prob: default_jpeg_prob(),
            jpeg_quality: default_jpeg_quality(),
        }
    }
}

impl DegradeConfig {
    /// No degradation at all.
    pub fn none() -> Self {
        Self {
            rotate_prob: 0.0,
            blur_prob: 0.0,
            speckle_prob: 0.0,
            jpeg_prob: 0.0,
            ..Self::default()
        }
    }
}

/// Applies the degradations drawn from `seed`; returns their names.
pub(super) fn apply(img: &mut GrayImage, cfg: &DegradeConfig, seed: u64) -> Vec<&'static str> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut applied = Vec::new();
    // Draw every decision up front so enabling one kind does not shift the others.
    let rotate = rng.random_bool(cfg.rotate_prob.clamp(0.0, 1.0));
    let angle = rng.random_range(-1.0f32..=1.0) * cfg.rotate_max_deg;
    let blur = rng.random_bool(cfg.blur_prob.clamp(0.0, 1.0));
    let speckle = rng.random_bool(cfg.speckle_prob.clamp(0.0, 1.0));
    let jpeg = rng.random_bool(cfg.jpeg_prob.clamp(0.0, 1.0));
    if rotate && angle.abs() > 0.05 {
        *img = rotate_about_center(img, angle.to_radians());
        applied.push("rotate");
    }
    if blur && cfg.blur_sigma > 0.0 {
        *img = gaussian_blur(img, cfg.blur_sigma);
        applied.push("blur");
    }
    if speckle {
        let n = (img.width() * img.height()) as usize / 400;
        for _ in 0..n {
            let x = rng.random_range(0..img.width());
            let y = rng.random_range(0..img.height());
            let shade: u8 = rng.random_range(40..200);
            img.put_pixel(x, y, Luma([shade]));
        }
        applied.push("speckle");
    }
    if jpeg {
        let mut buf = Vec::new();
        let q = cfg.jpeg_quality.clamp(1, 100);
        let ok = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q)
            .encode_image(&*img)
            .ok()
            .and_then(|_| image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg).ok());
        if let Some(decoded) = ok {
            *img = decoded.to_luma8();
            applied.push("jpeg");
        }
    }
    applied
}

/// Fixed-point bits of the blur weights (they sum to exactly `1 << BLUR_BITS`).
const BLUR_BITS: u32 = 10;

/// Separable Gaussian blur with integer weights (radius ⌈2σ⌉, edges clamped). Cheaper
/// than `image::imageops::blur` for the sub-pixel sigmas used here. The centre weight takes
/// the rounding slack so the weights sum to a power of two and normalizing is a shift; the
/// vertical pass accumulates whole rows so it runs along memory.
fn gaussian_blur(img: &GrayImage, sigma: f32) -> GrayImage {
    let r = (2.0 * sigma).ceil().max(1.0) as usize;
    let raw: Vec<f32> = (0..=2 * r)
        .map(|i| {
            let d = i as f32 - r as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = raw.iter().sum();
    let one = 1u32 << BLUR_BITS;
    let mut weights: Vec<u32> = raw
        .iter()
        .map(|w| (w / total * one as f32).round() as u32)
        .collect();
    let others: u32 = weights.iter().sum::<u32>() - weights[r];
    weights[r] = one.saturating_sub(others);
    let half = one / 2;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut tmp = vec![0u8; src.len()];
    for (srow, trow) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        for (x, t) in trow.iter_mut().enumerate() {
            let acc: u32 = if x >= r && x + r < w {
                weights
                    .iter()
                    .zip(&srow[x - r..=x + r])
                    .map(|(wt, &p)| wt * p as u32)
                    .sum()
            } else {
                weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * srow[(x + k).saturating_sub(r).min(w - 1)] as u32)
                    .sum()
            };
            *t = ((acc + half) >> BLUR_BITS) as u8;
        }
    }
    let mut out = vec![0u8; src.len()];
    let mut acc = vec![0u32; w];
    for (y, orow) in out.chunks_exact_mut(w).enumerate() {
        acc.fill(half);
        for (k, &wt) in weights.iter().enumerate() {
            let sy = (y + k).saturating_sub(r).min(h - 1);
            for (a, &p) in acc.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                *a += wt * p as u32;
            }
        }
        for (o, a) in orow.iter_mut().zip(&acc) {
            *o = (a >> BLUR_BITS) as u8;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).expect("the buffer has width × height bytes")
}

/// Fractional bits of the fixed-point source coordinates in [`rotate_about_center`].
const ROT_FRAC_BITS: u32 = 16;

/// Rotates by `theta` radians about the centre, bilinear, white outside the page.
///
/// Source coordinates are stepped along each row in 16.16 fixed point and the bilinear
/// weights are 8-bit, so the loop is integer-only (the float version spent most of its time
/// in `floorf`/`roundf` calls); the stepping error over a row is below 0.01 px.
fn rotate_about_center(img: &GrayImage, theta: f32) -> GrayImage {
    let (w, h) = img.dimensions();
    let (wi, hi) = (w as i64, h as i64);
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let (s, c) = (theta as f64).sin_cos();
    let one = (1i64 << ROT_FRAC_BITS) as f64;
    let fixed = |v: f64| (v * one).round() as i64;
    let raw = img.as_raw();
    let at = |x: i64, y: i64| -> u32 {
        if x < 0 || y < 0 || x >= wi || y >= hi {
            255
        } else {
            raw[(y * wi + x) as usize] as u32
        }
    };
    let (step_x, step_y) = (fixed(c), fixed(-s));
    let mut out = vec![0u8; raw.len()];
    for (y, row) in out.chunks_exact_mut(w as usize).enumerate() {
        // Source of pixel (0, y): rotate (0 - cx, y - cy) back by theta.
        let dy = y as f64 - cy;
        let mut sx = fixed(c * -cx + s * dy + cx);
        let mut sy = fixed(-s * -cx + c * dy + cy);
        for o in row.iter_mut() {
            let (x0, y0) = (sx >> ROT_FRAC_BITS, sy >> ROT_FRAC_BITS);
            let fx = ((sx >> (ROT_FRAC_BITS - 8)) & 0xff) as u32;
            let fy = ((sy >> (ROT_FRAC_BITS - 8)) & 0xff) as u32;
            let (p00, p01, p10, p11) = if x0 >= 0 && y0 >= 0 && x0 + 1 < wi && y0 + 1 < hi {
                let i = (y0 * wi + x0) as usize;
                let j = i + w as usize;
                (
                    raw[i] as u32,
                    raw[i + 1] as u32,
                    raw[j] as u32,
                    raw[j + 1] as u32,
                )
            } else {
                (
                    at(x0, y0),
                    at(x0 + 1, y0),
                    at(x0, y0 + 1),
                    at(x0 + 1, y0 + 1),
                )
            };
            let top = p00 * (256 - fx) + p01 * fx;
            let bot = p10 * (256 - fx) + p11 * fx;
            *o = ((top * (256 - fy) + bot * fy + (1 << 15)) >> 16) as u8;
            sx += step_x;
            sy += step_y;
        }
    }
    GrayImage::from_raw(w, h, out).expect("the buffer has width × height bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::render::raster::fill_rect;
    use crate::data::render::render;
    use crate::data::render::tests::plain;
    use crate::data::synthetic;

    /// Bilinear rotation about the centre in plain f64, white outside: the reference the
    /// fixed-point [`rotate_about_center`] is checked against.
    fn rotate_reference(img: &GrayImage, theta: f64) -> GrayImage {
        let (w, h) = img.dimensions();
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        let (s, c) = theta.sin_cos();
        let at = |x: f64, y: f64| -> f64 {
            if x < 0.0 || y < 0.0 || x >= w as f64 || y >= h as f64 {
                255.0
            } else {
                img.get_pixel(x as u32, y as u32).0[0] as f64
            }
        };
        GrayImage::from_fn(w, h, |x, y| {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let (sx, sy) = (c * dx + s * dy + cx, -s * dx + c * dy + cy);
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let top = at(x0, y0) * (1.0 - fx) + at(x0 + 1.0, y0) * fx;
            let bot = at(x0, y0 + 1.0) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0) * fx;
            Luma([(top * (1.0 - fy) + bot * fy).round() as u8])
        })
    }

    /// Gray levels the fixed-point rotation may differ from the f64 reference by: 8-bit
    /// bilinear weights (up to 255/256 of a level each way) plus the final rounding.
    const ROTATE_MAX_LEVEL_DIFF: i32 = 2;

    #[test]
    fn rotation_by_zero_is_the_identity_and_by_a_degree_matches_a_float_reference() {
        let page = render(&synthetic::document(3, 1), &plain(), 0)
            .unwrap()
            .image;
        assert_eq!(rotate_about_center(&page, 0.0).as_raw(), page.as_raw());
        for deg in [1.0f32, -0.7] {
            let fast = rotate_about_center(&page, deg.to_radians());
            let slow = rotate_reference(&page, (deg as f64).to_radians());
            let worst = fast
                .as_raw()
                .iter()
                .zip(slow.as_raw())
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap();
            assert!(
                worst <= ROTATE_MAX_LEVEL_DIFF,
                "{deg}°: off by {worst} levels"
            );
            assert_ne!(fast.as_raw(), page.as_raw(), "{deg}° moves the page");
        }
    }

    #[test]
    fn blur_keeps_flat_areas_and_total_ink_and_softens_edges() {
        let mut img = GrayImage::from_pixel(40, 30, Luma([255]));
        fill_rect(&mut img, 10, 10, 30, 20, 0);
        let b = gaussian_blur(&img, 0.8);
        assert_eq!(b.get_pixel(0, 0).0[0], 255, "flat white stays white");
        assert_eq!(b.get_pixel(20, 15).0[0], 0, "flat black stays black");
        let edge = b.get_pixel(10, 15).0[0];
        assert!(edge > 0 && edge < 255, "the edge is softened: {edge}");
        let sum = |i: &GrayImage| i.as_raw().iter().map(|&p| 255 - p as i64).sum::<i64>();
        // Rounding each of the 1200 pixels in two passes moves the total by a few levels.
        let (before, after) = (sum(&img), sum(&b));
        assert!((before - after).abs() <= 1200, "{before} vs {after}");
    }
}
