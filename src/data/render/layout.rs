//! Page layout: text measuring with the embedded fonts, word wrap, and the placement of every
//! block as drawing operations ([`Op`]) top to bottom.

use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};

use crate::data::document::{Block, Document};

/// A drawing operation in page coordinates (pixels; text `y` is the baseline).
pub(super) enum Op {
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

/// The laid-out page: what to draw, and how tall the content is (pixels).
pub(super) struct Page {
    pub(super) ops: Vec<Op>,
    pub(super) height: f32,
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

pub(super) fn font(bold: bool) -> &'static FontRef<'static> {
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
pub(super) fn advance_unscaled(c: char, bold: bool) -> f32 {
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

/// Width of `text` in pixels at `px`, as [`super::raster::draw_text`] lays it out.
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
pub(super) fn layout(doc: &Document, width: u32, px: f32, margin: f32) -> Page {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
