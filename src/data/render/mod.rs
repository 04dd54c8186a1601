//! Draws a [`Document`] into a grayscale page image with an embedded font (DejaVu Sans,
//! from the `dejavu` crate), then applies optional seeded degradations.
//!
//! Layout (`layout`): a bold title over a rule, headings, word-wrapped paragraphs, form
//! fields in one or two columns with underlined values, and ruled tables whose cells wrap.
//! The page is `width_px` wide and as tall as its content, both multiples of 28 px (the
//! Qwen2-VL patch × merge size, so the processor's `smart_resize` never rescales it). When the
//! page would exceed `max_pixels`, the font shrinks a pixel at a time down to `min_font_px`; a
//! document that still does not fit is refused ([`RenderError::TooLarge`]) rather than
//! clipped, so every ground-truth item is on the image.
//!
//! Drawing (`raster`): glyphs are positioned on whole pixels and their coverage bitmaps cached
//! per thread, which makes rendering a blit loop. Degradations (`degrade`): seeded rotation,
//! blur, speckle and JPEG. Same document, config and seed give the same bytes.

mod degrade;
mod layout;
mod raster;

pub use degrade::DegradeConfig;
pub use raster::contact_sheet;

use image::GrayImage;
use serde::{Deserialize, Serialize};

use super::document::Document;

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
        let page = layout::layout(doc, width, font_px as f32, cfg.margin_px as f32);
        let height = round_up(
            (page.height.ceil() as u32).max(SIDE_MULTIPLE * 2),
            SIDE_MULTIPLE,
        );
        needed = width as u64 * height as u64;
        if needed <= cfg.max_pixels {
            let mut img = raster::paint(&page, width, height);
            let degradations = degrade::apply(&mut img, &cfg.degrade, seed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::data::Block;

    pub(super) fn plain() -> RenderConfig {
        RenderConfig {
            degrade: DegradeConfig::none(),
            ..RenderConfig::default()
        }
    }

    pub(super) fn ink(img: &GrayImage) -> usize {
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
}
