//! Draws a [`Document`] into a grayscale page image with an embedded font (DejaVu Sans,
//! from the `dejavu` crate), then applies optional seeded degradations.
//!
//! Layout: a bold title over a rule, headings, word-wrapped paragraphs, form fields in one or
//! two columns with underlined values, and ruled tables whose cells wrap. The page is
//! `width_px` wide and as tall as its content, both multiples of 28 px (the Qwen2-VL patch ×
//! merge size, so the processor's `smart_resize` never rescales it). When the page would
//! exceed `max_pixels`, the font shrinks a pixel at a time down to `min_font_px`; a document
//! that still does not fit is refused ([`RenderError::TooLarge`]) rather than clipped, so
//! every ground-truth item is on the image.
//!
//! Glyphs are positioned on whole pixels and their coverage bitmaps cached per thread, which
//! makes rendering a blit loop. Same document, config and seed give the same bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont};
use image::{GrayImage, Luma};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::document::{Block, Document};

/// Qwen2-VL patch size (14) × spatial merge size (2): page sides are multiples of this.
pub const SIDE_MULTIPLE: u32 = 28;

/// `[prepare.render]`: page geometry and degradations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RenderConfig {
    /// Page width in pixels (rounded up to a multiple of 28).
    #[serde(default = "default_width")]
    pub width_px: u32,
    /// Largest page area in pixels; taller content shrinks the font, then is refused.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Preferred body font size in pixels.
    #[serde(default = "default_font_px")]
    pub font_px: u32,
    /// Smallest body font size tried before refusing a document, in pixels.
    #[serde(default = "default_min_font_px")]
    pub min_font_px: u32,
    /// Page margin in pixels.
    #[serde(default = "default_margin")]
    pub margin_px: u32,
    /// Seeded degradations applied after drawing.
    #[serde(default)]
    pub degrade: DegradeConfig,
}

fn default_width() -> u32 {
    448
}
fn default_max_pixels() -> u64 {
    448 * 448
}
fn default_font_px() -> u32 {
    12
}
fn default_min_font_px() -> u32 {
    8
}
fn default_margin() -> u32 {
    12
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            width_px: default_width(),
            max_pixels: default_max_pixels(),
            font_px: default_font_px(),
            min_font_px: default_min_font_px(),
            margin_px: default_margin(),
            degrade: DegradeConfig::default(),
        }
    }
}

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

/// Why a document could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("document {id} needs {needed_px} px at the smallest font ({min_font_px} px), more than max_pixels {max_pixels}")]
    TooLarge {
        id: String,
        needed_px: u64,
        min_font_px: u32,
        max_pixels: u64,
    },
}

/// A rendered page and the font size that made it fit.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub image: GrayImage,
    /// Body font size used, pixels.
    pub font_px: u32,
    /// Which degradations were applied (`rotate`, `blur`, `speckle`, `jpeg`).
    pub degradations: Vec<&'static str>,
}

/// Renders `doc` (shrinking the font until it fits), then degrades it from `seed`.
///
/// # Errors
/// [`RenderError::TooLarge`] when even `min_font_px` needs more than `max_pixels`.
pub fn render(doc: &Document, cfg: &RenderConfig, seed: u64) -> Result<Rendered, RenderError> {
    let width = round_up(cfg.width_px.max(SIDE_MULTIPLE * 4), SIDE_MULTIPLE);
    let mut needed = 0u64;
    for font_px in (cfg.min_font_px.max(6)..=cfg.font_px.max(cfg.min_font_px.max(6))).rev() {
        let page = layout(doc, width, font_px as f32, cfg.margin_px as f32);
        let height = round_up(
            (page.height.ceil() as u32).max(SIDE_MULTIPLE * 2),
            SIDE_MULTIPLE,
        );
        needed = width as u64 * height as u64;
        if needed <= cfg.max_pixels {
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
            let degradations = degrade(&mut img, &cfg.degrade, seed);
            return Ok(Rendered {
                image: img,
                font_px,
                degradations,
            });
        }
    }
    Err(RenderError::TooLarge {
        id: doc.id.clone(),
        needed_px: needed,
        min_font_px: cfg.min_font_px,
        max_pixels: cfg.max_pixels,
    })
}

/// PNG bytes of a page (fast deflate, adaptive filter: deterministic).
pub fn encode_png(img: &GrayImage) -> Result<Vec<u8>, image::ImageError> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut out = Vec::with_capacity(img.len() / 4);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::L8,
        )?;
    Ok(out)
}

fn round_up(v: u32, m: u32) -> u32 {
    v.div_ceil(m) * m
}

/// A drawing operation in page coordinates (pixels; text `y` is the baseline).
enum Op {
    Text {
        x: f32,
        y: f32,
        text: String,
        px: f32,
        bold: bool,
    },
    Rule {
        x0: i32,
        x1: i32,
        y: i32,
        thick: i32,
        shade: u8,
    },
}

struct Page {
    ops: Vec<Op>,
    height: f32,
}

fn fonts() -> &'static (FontRef<'static>, FontRef<'static>) {
    static FONTS: OnceLock<(FontRef<'static>, FontRef<'static>)> = OnceLock::new();
    FONTS.get_or_init(|| {
        (
            FontRef::try_from_slice(dejavu::sans::regular())
                .expect("the embedded DejaVu Sans parses"),
            FontRef::try_from_slice(dejavu::sans::bold())
                .expect("the embedded DejaVu Sans Bold parses"),
        )
    })
}

fn font(bold: bool) -> &'static FontRef<'static> {
    let f = fonts();
    if bold {
        &f.1
    } else {
        &f.0
    }
}

/// Unscaled horizontal advances (font units) of the ASCII characters, regular then bold:
/// text measuring is the inner loop of layout, and a cmap lookup per character dominated it.
fn ascii_advances() -> &'static [[f32; 128]; 2] {
    static ADV: OnceLock<[[f32; 128]; 2]> = OnceLock::new();
    ADV.get_or_init(|| {
        let mut t = [[0.0f32; 128]; 2];
        for (b, row) in t.iter_mut().enumerate() {
            let f = font(b == 1);
            for (c, a) in row.iter_mut().enumerate() {
                *a = f.h_advance_unscaled(f.glyph_id(char::from(c as u8)));
            }
        }
        t
    })
}

/// Advance of `c` in font units (unscaled).
fn advance_unscaled(c: char, bold: bool) -> f32 {
    match usize::try_from(u32::from(c)) {
        Ok(i) if i < 128 => ascii_advances()[usize::from(bold)][i],
        _ => {
            let f = font(bold);
            f.h_advance_unscaled(f.glyph_id(c))
        }
    }
}

/// Pixels per font unit at `px`.
fn scale_factor(px: f32, bold: bool) -> f32 {
    font(bold).as_scaled(PxScale::from(px)).h_scale_factor()
}

/// Width of `text` in pixels at `px`, as [`draw_text`] lays it out.
fn text_width(text: &str, px: f32, bold: bool) -> f32 {
    text.chars().map(|c| advance_unscaled(c, bold)).sum::<f32>() * scale_factor(px, bold)
}

/// Greedy word wrap to `max_w` pixels; a word longer than a line gets a line of its own.
/// Widths add up word by word (text width is a sum of advances: no kerning).
fn wrap(text: &str, px: f32, bold: bool, max_w: f32) -> Vec<String> {
    let space = text_width(" ", px, bold);
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        let mut line_w = 0.0;
        for word in para.split_whitespace() {
            let word_w = text_width(word, px, bold);
            if line.is_empty() {
                line.push_str(word);
                line_w = word_w;
            } else if line_w + space + word_w <= max_w {
                line.push(' ');
                line.push_str(word);
                line_w += space + word_w;
            } else {
                lines.push(std::mem::take(&mut line));
                line.push_str(word);
                line_w = word_w;
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// Places every block top to bottom at body size `px`.
fn layout(doc: &Document, width: u32, px: f32, margin: f32) -> Page {
    let line_h = (px * 1.3).ceil();
    let left = margin;
    let avail = width as f32 - 2.0 * margin;
    let mut ops = Vec::new();
    let mut y = margin;
    let text = |ops: &mut Vec<Op>, x: f32, y: f32, t: &str, px: f32, bold: bool| {
        ops.push(Op::Text {
            x,
            y,
            text: t.to_string(),
            px,
            bold,
        });
    };
    let rule = |ops: &mut Vec<Op>, x0: f32, x1: f32, y: f32, thick: i32, shade: u8| {
        ops.push(Op::Rule {
            x0: x0 as i32,
            x1: x1 as i32,
            y: y as i32,
            thick,
            shade,
        });
    };

    let title_px = (px * 1.35).round();
    for l in wrap(&doc.title, title_px, true, avail) {
        y += (title_px * 1.25).ceil();
        text(&mut ops, left, y - title_px * 0.25, &l, title_px, true);
    }
    y += 3.0;
    rule(&mut ops, left, left + avail, y, 2, 0);
    y += 4.0;

    for block in &doc.blocks {
        match block {
            Block::Heading(h) => {
                y += line_h * 0.5;
                for l in wrap(h, px, true, avail) {
                    y += line_h;
                    text(&mut ops, left, y - px * 0.3, &l, px, true);
                }
                y += 2.0;
            }
            Block::Paragraph(p) => {
                for l in wrap(p, px, false, avail) {
                    y += line_h;
                    text(&mut ops, left, y - px * 0.3, &l, px, false);
                }
                y += line_h * 0.3;
            }
            Block::Fields { columns, fields } => {
                let cols = (*columns).clamp(1, 3);
                let gap = px * 1.5;
                let col_w = (avail - gap * (cols as f32 - 1.0)) / cols as f32;
                for row in fields.chunks(cols) {
                    let mut row_bottom = y;
                    for (c, (label, value)) in row.iter().enumerate() {
                        let x = left + c as f32 * (col_w + gap);
                        let label = format!("{label}:");
                        let lw = text_width(&label, px, true) + px * 0.4;
                        let mut cy = y + line_h;
                        text(&mut ops, x, cy - px * 0.3, &label, px, true);
                        // The value sits beside its label when it fits, else wraps below it.
                        let (vx, vw) = if lw + text_width(value, px, false) <= col_w {
                            (x + lw, col_w - lw)
                        } else {
                            cy += line_h;
                            (x, col_w)
                        };
                        let lines = wrap(value, px, false, vw);
                        for (i, l) in lines.iter().enumerate() {
                            if i > 0 {
                                cy += line_h;
                            }
                            text(&mut ops, vx, cy - px * 0.3, l, px, false);
                        }
                        rule(&mut ops, vx, x + col_w, cy - px * 0.3 + 2.0, 1, 170);
                        row_bottom = row_bottom.max(cy);
                    }
                    y = row_bottom + 2.0;
                }
                y += line_h * 0.3;
            }
            Block::Table { header, rows } => {
                let ncol = header
                    .len()
                    .max(rows.iter().map(Vec::len).max().unwrap_or(0))
                    .max(1);
                let pad = px * 0.6;
                let mut natural = vec![px; ncol];
                for (i, h) in header.iter().enumerate() {
                    natural[i] = natural[i].max(text_width(h, px, true) + pad);
                }
                for r in rows {
                    for (i, cell) in r.iter().enumerate() {
                        natural[i] = natural[i].max(text_width(cell, px, false) + pad);
                    }
                }
                let total: f32 = natural.iter().sum();
                let widths: Vec<f32> = if total > avail {
                    natural.iter().map(|w| w * avail / total).collect()
                } else {
                    natural
                };
                let draw_row = |ops: &mut Vec<Op>, y: &mut f32, cells: &[String], bold: bool| {
                    let mut x = left;
                    let mut lines_max = 1;
                    for (i, w) in widths.iter().enumerate() {
                        let cell = cells.get(i).map(String::as_str).unwrap_or("");
                        let lines = wrap(cell, px, bold, w - pad);
                        for (k, l) in lines.iter().enumerate() {
                            text(
                                ops,
                                x,
                                *y + line_h * (k as f32 + 1.0) - px * 0.3,
                                l,
                                px,
                                bold,
                            );
                        }
                        lines_max = lines_max.max(lines.len());
                        x += w;
                    }
                    *y += line_h * lines_max as f32 + 2.0;
                };
                y += 2.0;
                rule(&mut ops, left, left + avail, y, 2, 0);
                y += 1.0;
                draw_row(&mut ops, &mut y, header, true);
                rule(&mut ops, left, left + avail, y, 1, 0);
                for r in rows {
                    draw_row(&mut ops, &mut y, r, false);
                    rule(&mut ops, left, left + avail, y - 1.0, 1, 215);
                }
                rule(&mut ops, left, left + avail, y, 2, 0);
                y += line_h * 0.5;
            }
        }
    }
    Page {
        ops,
        height: y + margin,
    }
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
pub(crate) fn draw_text(img: &mut GrayImage, x: f32, y: f32, text: &str, px: f32, bold: bool) {
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
pub(crate) fn fill_rect(img: &mut GrayImage, x0: i32, y0: i32, x1: i32, y1: i32, shade: u8) {
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

/// Applies the degradations drawn from `seed`; returns their names.
fn degrade(img: &mut GrayImage, cfg: &DegradeConfig, seed: u64) -> Vec<&'static str> {
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
    use crate::data::synthetic;

    fn plain() -> RenderConfig {
        RenderConfig {
            degrade: DegradeConfig::none(),
            ..RenderConfig::default()
        }
    }

    fn ink(img: &GrayImage) -> usize {
        img.pixels().filter(|p| p.0[0] < 128).count()
    }

    #[test]
    fn same_document_and_seed_give_identical_png_bytes() {
        let doc = synthetic::document(1, 4);
        let cfg = RenderConfig {
            degrade: DegradeConfig {
                rotate_prob: 1.0,
                blur_prob: 1.0,
                speckle_prob: 1.0,
                jpeg_prob: 1.0,
                ..DegradeConfig::default()
            },
            ..RenderConfig::default()
        };
        let a = encode_png(&render(&doc, &cfg, 9).unwrap().image).unwrap();
        let b = encode_png(&render(&doc, &cfg, 9).unwrap().image).unwrap();
        assert_eq!(a, b);
        let c = encode_png(&render(&doc, &cfg, 10).unwrap().image).unwrap();
        assert_ne!(a, c, "another seed degrades differently");
    }

    #[test]
    fn page_sides_are_multiples_of_28_and_within_max_pixels() {
        let cfg = plain();
        for doc in synthetic::documents(2, 64) {
            let r = render(&doc, &cfg, 0).unwrap_or_else(|e| panic!("{e}"));
            let (w, h) = r.image.dimensions();
            assert_eq!(w % SIDE_MULTIPLE, 0);
            assert_eq!(h % SIDE_MULTIPLE, 0);
            assert!(w as u64 * h as u64 <= cfg.max_pixels, "{}: {w}x{h}", doc.id);
            assert!(w as u64 * h as u64 >= 56 * 56, "Qwen2-VL min_pixels");
        }
    }

    #[test]
    fn text_puts_ink_on_the_page_and_more_text_more_ink() {
        let mut doc = synthetic::document(1, 3);
        let a = ink(&render(&doc, &plain(), 0).unwrap().image);
        doc.blocks.push(Block::Paragraph(
            "Additional words to draw on the page".into(),
        ));
        let b = ink(&render(&doc, &plain(), 0).unwrap().image);
        assert!(a > 1000, "only {a} dark pixels");
        assert!(b > a);
    }

    #[test]
    fn long_documents_shrink_the_font_then_are_refused() {
        let mut doc = synthetic::document(1, 0);
        let base = render(&doc, &plain(), 0).unwrap().font_px;
        doc.blocks.push(Block::Paragraph("word ".repeat(250)));
        let shrunk = render(&doc, &plain(), 0).unwrap();
        assert!(shrunk.font_px < base, "{} !< {base}", shrunk.font_px);
        doc.blocks.push(Block::Paragraph("word ".repeat(3000)));
        assert!(matches!(
            render(&doc, &plain(), 0),
            Err(RenderError::TooLarge { .. })
        ));
    }

    #[test]
    fn wrap_keeps_every_word_and_respects_the_width() {
        let text = "Sodium was elevated at 149 mmol/L and potassium was low at 3.1 mmol/L today.";
        let lines = wrap(text, 12.0, false, 120.0);
        assert!(lines.len() > 2);
        assert_eq!(lines.join(" "), text);
        for l in &lines {
            assert!(
                text_width(l, 12.0, false) <= 120.0 || !l.contains(' '),
                "{l}"
            );
        }
    }

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
