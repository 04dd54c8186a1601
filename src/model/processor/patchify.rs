//! Rescale/normalize into channel-first planes and flatten them into the reference's patch
//! order (steps 4 and 5 of [`super`]).

use image::RgbImage;

use super::config::ProcessorConfig;

/// Channel-first f32 planes `[3, h, w]` after rescale/normalize, with the torchvision backend's
/// arithmetic: when both are on it divides `(x - mean/rescale)` by `std/rescale` in f32.
pub(super) fn normalize(img: &RgbImage, c: &ProcessorConfig) -> Vec<f32> {
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
pub(super) fn patchify(
    planes: &[f32],
    w: usize,
    h: usize,
    c: &ProcessorConfig,
    out: &mut Vec<f32>,
) {
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
