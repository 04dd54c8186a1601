//! Rasterizing: glyph coverage bitmaps cached per thread and size, blitted on whole pixels;
//! filled rules; painting a laid-out [`Page`]; and the contact sheet of page thumbnails.

use std::cell::RefCell;
use std::collections::HashMap;

use ab_glyph::{Font, GlyphId, PxScale, ScaleFont};
use image::{GrayImage, Luma};

use super::layout::{advance_unscaled, font, Op, Page};

/// Draws every operation of `page` on a white `width` × `height` image.
pub(super) fn paint(page: &Page, width: u32, height: u32) -> GrayImage {
    let mut img = GrayImage::from_pixel(width, height, Luma([255]));
    for op in &page.ops {
        match op {
            Op::Text {
                x,
                y,
                text,
                px,
                bold,
            } => draw_text(&mut img, *x, *y, text, *px, *bold),
            Op::Rule {
                x0,
                x1,
                y,
                thick,
                shade,
            } => fill_rect(&mut img, *x0, *y, *x1, *y + *thick, *shade),
        }
    }
    img
}

/// A glyph's coverage bitmap at one size, offset from the pen position on the baseline.
struct GlyphBitmap {
    left: i32,
    top: i32,
    width: u32,
    coverage: Vec<u8>,
}

thread_local! {
    /// (bold, size in 1/4 px) → that font size's bitmaps.
    static GLYPHS: RefCell<HashMap<(bool, u32), SizeCache>> = RefCell::new(HashMap::new());
}

/// The bitmaps of one font at one size: ASCII by code (one index per character), the rest
/// by glyph. Each entry is `None` until rasterized, `Some(None)` for outline-less glyphs.
#[derive(Default)]
struct SizeCache {
    ascii: Vec<Option<Option<GlyphBitmap>>>,
    other: HashMap<GlyphId, Option<GlyphBitmap>>,
}

impl SizeCache {
    /// The bitmap of `c` (glyph `id`), rasterized on first use.
    fn get(&mut self, c: char, id: GlyphId, bold: bool, px: f32) -> Option<&GlyphBitmap> {
        let code = u32::from(c) as usize;
        if code < 128 {
            if self.ascii.is_empty() {
                self.ascii.resize_with(128, || None);
            }
            self.ascii[code]
                .get_or_insert_with(|| rasterize(bold, id, px))
                .as_ref()
        } else {
            self.other
                .entry(id)
                .or_insert_with(|| rasterize(bold, id, px))
                .as_ref()
        }
    }
}

fn rasterize(bold: bool, id: GlyphId, px: f32) -> Option<GlyphBitmap> {
    let glyph = id.with_scale_and_position(PxScale::from(px), ab_glyph::point(0.0, 0.0));
    let outlined = font(bold).outline_glyph(glyph)?;
    let b = outlined.px_bounds();
    let (w, h) = (b.width() as u32, b.height() as u32);
    let mut coverage = vec![0u8; (w * h) as usize];
    outlined.draw(|x, y, c| {
        if x < w && y < h {
            coverage[(y * w + x) as usize] = (c.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    });
    Some(GlyphBitmap {
        left: b.min.x as i32,
        top: b.min.y as i32,
        width: w,
        coverage,
    })
}

/// Draws black `text` with its baseline at `y`, starting at `x`, glyphs on whole pixels.
pub(super) fn draw_text(img: &mut GrayImage, x: f32, y: f32, text: &str, px: f32, bold: bool) {
    let scaled = font(bold).as_scaled(PxScale::from(px));
    let factor = scaled.h_scale_factor();
    let key_px = (px * 4.0).round() as u32;
    let (iw, ih) = (img.width() as i32, img.height() as i32);
    let buf: &mut [u8] = img;
    let base_y = y.round() as i32;
    let mut pen = x;
    GLYPHS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let sized = cache.entry((bold, key_px)).or_default();
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(bm) = sized.get(c, id, bold, px) {
                let gw = bm.width as i32;
                let gh = bm.coverage.len() as i32 / gw.max(1);
                let ox = pen.round() as i32 + bm.left;
                let oy = base_y + bm.top;
                // The glyph's rows and columns that land on the page.
                let (gx0, gx1) = ((-ox).max(0), gw.min(iw - ox));
                let (gy0, gy1) = ((-oy).max(0), gh.min(ih - oy));
                if gx0 < gx1 {
                    for gy in gy0..gy1 {
                        let src = &bm.coverage[(gy * gw + gx0) as usize..(gy * gw + gx1) as usize];
                        let at = ((oy + gy) * iw + ox + gx0) as usize;
                        let dst = &mut buf[at..at + src.len()];
                        for (d, &cov) in dst.iter_mut().zip(src) {
                            if cov > 0 {
                                *d = (*d as u32 * (255 - cov as u32) / 255) as u8;
                            }
                        }
                    }
                }
            }
            pen += advance_unscaled(c, bold) * factor;
        }
    });
}

/// Fills `[x0, x1) × [y0, y1)` (clipped) with gray `shade`.
pub(super) fn fill_rect(img: &mut GrayImage, x0: i32, y0: i32, x1: i32, y1: i32, shade: u8) {
    let (w, h) = (img.width() as i32, img.height() as i32);
    let (x0, x1) = (x0.clamp(0, w), x1.clamp(0, w));
    if x0 >= x1 {
        return;
    }
    let buf: &mut [u8] = img;
    for y in y0.max(0)..y1.min(h) {
        buf[(y * w + x0) as usize..(y * w + x1) as usize].fill(shade);
    }
}

/// A grid of page thumbnails, each with a few caption lines under it.
pub fn contact_sheet(pages: &[(GrayImage, Vec<String>)], cols: u32, thumb_w: u32) -> GrayImage {
    let cols = cols.max(1);
    let rows = (pages.len() as u32).div_ceil(cols).max(1);
    let caption_px = 11.0;
    let caption_lines = pages.iter().map(|p| p.1.len()).max().unwrap_or(0) as u32;
    let thumb_h = pages
        .iter()
        .map(|(img, _)| img.height() * thumb_w / img.width().max(1))
        .max()
        .unwrap_or(thumb_w);
    let cell_h = thumb_h + 8 + caption_lines * 14;
    let gap = 10;
    let mut sheet = GrayImage::from_pixel(
        cols * (thumb_w + gap) + gap,
        rows * (cell_h + gap) + gap,
        Luma([235]),
    );
    for (i, (img, caption)) in pages.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        let (x, y) = (gap + c * (thumb_w + gap), gap + r * (cell_h + gap));
        let th = img.height() * thumb_w / img.width().max(1);
        let thumb = image::imageops::resize(
            img,
            thumb_w,
            th.max(1),
            image::imageops::FilterType::Triangle,
        );
        image::imageops::replace(&mut sheet, &thumb, x as i64, y as i64);
        for (k, line) in caption.iter().enumerate() {
            draw_text(
                &mut sheet,
                x as f32,
                (y + th + 14 + k as u32 * 14) as f32,
                line,
                caption_px,
                false,
            );
        }
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::render::tests::ink;

    #[test]
    fn text_at_the_page_edges_is_clipped_to_exactly_what_a_larger_page_shows() {
        // Drawn on a 60×24 page with the text hanging over every edge, versus drawn 20 px
        // further in on a 100×64 page and cropped back: the pixels must agree.
        let mut small = GrayImage::from_pixel(60, 24, Luma([255]));
        draw_text(&mut small, -6.0, 22.0, "Hg Wy 8.5 mmol/L Qj", 14.0, true);
        draw_text(&mut small, 40.0, 6.0, "Top", 14.0, false);
        let mut big = GrayImage::from_pixel(100, 64, Luma([255]));
        draw_text(&mut big, 14.0, 42.0, "Hg Wy 8.5 mmol/L Qj", 14.0, true);
        draw_text(&mut big, 60.0, 26.0, "Top", 14.0, false);
        let crop = image::imageops::crop_imm(&big, 20, 20, 60, 24).to_image();
        assert!(ink(&small) > 20, "the visible part is drawn");
        assert_eq!(small.as_raw(), crop.as_raw());
        let mut off = GrayImage::from_pixel(30, 30, Luma([255]));
        draw_text(&mut off, -200.0, 15.0, "gone", 12.0, false);
        draw_text(&mut off, 5.0, 200.0, "gone", 12.0, false);
        fill_rect(&mut off, -10, -10, -1, 40, 0);
        assert_eq!(ink(&off), 0, "nothing off the page lands on it");
    }
}
