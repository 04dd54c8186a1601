//! Charts for BENCHMARK_REPORT.md, drawn with plotters into a PNG and an SVG each.
//!
//! Text is rendered with the embedded DejaVu Sans (`assets/fonts/`, Bitstream Vera license)
//! through plotters' `ab_glyph` feature, so no system font library is needed and the PNG
//! bytes are the same on every machine. PNGs are encoded with the `image` crate (already a
//! dependency) from plotters' RGB buffer rather than through plotters' own encoder, which
//! would pull in a second `image` version.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::fs::{write_atomic, FsError};

/// Family name the charts ask for.
pub(crate) const FAMILY: &str = "sans-serif";

/// Chart size in pixels (PNG) and user units (SVG).
const SIZE: (u32, u32) = (800, 480);

/// Errors drawing or writing a chart.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing chart {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("encoding chart {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error(transparent)]
    Write(#[from] FsError),
}

/// One bar: a label, its height and an optional whisker (low, high).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Category label under the bar.
    pub label: String,
    /// Bar height, in the chart's y unit.
    pub value: f64,
    /// Interval drawn as a vertical line, (low, high).
    pub whisker: Option<(f64, f64)>,
}

/// A bar chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BarChart {
    /// Caption.
    pub title: String,
    /// y-axis label with unit.
    pub y_label: String,
    /// Bars, left to right.
    pub bars: Vec<Bar>,
    /// Fixed top of the y axis (100 for a percentage, so an all-zero chart still reads
    /// 0–100 %); `None` fits the data.
    pub y_max: Option<f64>,
    /// The values are counts: whole-number y ticks and bar labels.
    pub counts: bool,
    /// One colour for every bar, explained by this legend entry (a histogram); `None`: a
    /// colour per bar, named by its x label.
    pub legend: Option<String>,
}

/// A line chart of one or more named series of (x, y) points.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineChart {
    /// Caption.
    pub title: String,
    /// x-axis label with unit.
    pub x_label: String,
    /// y-axis label with unit.
    pub y_label: String,
    /// (legend name, points) per series.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Start the y axis at zero (quantities such as throughput, where a cut axis would
    /// exaggerate differences); else it spans the data (a loss curve's shape).
    pub y_from_zero: bool,
    /// x is a whole-number quantity (batch size): ticks only at integers.
    pub integer_x: bool,
}

/// What to draw.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    Bars(BarChart),
    Lines(LineChart),
}

static FONT_ONCE: Once = Once::new();

pub(crate) fn register_font() {
    FONT_ONCE.call_once(|| {
        // The font is a committed asset; a parse failure would be a broken checkout, and
        // plotters then falls back to drawing no text rather than failing.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            tracing::warn!("embedded chart font did not parse; charts will have no text");
        }
    });
}

/// Draws `chart` to `<stem>.png` and `<stem>.svg`, atomically. Returns both paths.
///
/// # Errors
/// A drawing failure (names the file), PNG encoding, or writing.
pub fn render(chart: &Chart, stem: &Path) -> Result<[PathBuf; 2], ChartError> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let draw_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: String| ChartError::Draw {
            path: path.clone(),
            message: e,
        }
    };

    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(chart, &root).map_err(draw_err(&png))?;
        root.present().map_err(|e| draw_err(&png)(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(SIZE.0, SIZE.1, rgb).ok_or_else(|| ChartError::Draw {
        path: png.clone(),
        message: "pixel buffer size mismatch".into(),
    })?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|source| ChartError::Encode {
        path: png.clone(),
        source,
    })?;
    write_atomic(&png, &bytes)?;

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, SIZE).into_drawing_area();
        draw(chart, &root).map_err(draw_err(&svg))?;
        root.present().map_err(|e| draw_err(&svg)(e.to_string()))?;
    }
    write_atomic(&svg, text.as_bytes())?;
    Ok([png, svg])
}

/// Draws on `root`, turning a panic inside plotters (it has arithmetic-overflow panics on
/// degenerate ranges) into an error, so a bad chart never takes the report down.
fn draw<DB: DrawingBackend>(chart: &Chart, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        match chart {
            Chart::Bars(b) => draw_bars(b, root),
            Chart::Lines(l) => draw_lines(l, root),
        }
    }));
    attempt.unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!("plotters panicked: {what}"))
    })
}

/// Colors of bars and series, in order (colorblind-safe Okabe–Ito palette).
const PALETTE: [RGBColor; 5] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

fn draw_bars<DB: DrawingBackend>(
    c: &BarChart,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), String> {
    let n = c.bars.len().max(1) as i32;
    let top = c
        .bars
        .iter()
        .map(|b| b.whisker.map_or(b.value, |w| w.1.max(b.value)))
        .fold(0.0, f64::max);
    let fitted = if top > 0.0 { top * 1.15 } else { 1.0 };
    let y_max = match (c.y_max, c.counts) {
        (Some(m), _) => m.max(top),
        // whole numbers up to at least 1, so every tick is a count
        (None, true) => fitted.ceil().max(1.0),
        (None, false) => fitted,
    };
    // Counts: at most 11 ticks, which the nice-step rule then puts on integers.
    let y_ticks = if c.counts {
        (y_max as usize + 1).min(11)
    } else {
        10
    };
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..y_max)
        .map_err(|e| e.to_string())?;
    let labels: Vec<String> = c.bars.iter().map(|b| b.label.clone()).collect();
    let whole = |v: &f64| whole_or_blank(*v);
    let mut mesh = chart.configure_mesh();
    if c.counts {
        mesh.y_label_formatter(&whole);
    }
    mesh.disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .y_desc(c.y_label.as_str())
        .y_labels(y_ticks)
        .x_labels(c.bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, b) in c.bars.iter().enumerate() {
        let i = i as i32;
        let color = if c.legend.is_some() {
            PALETTE[0]
        } else {
            PALETTE[i as usize % PALETTE.len()]
        };
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.value),
            ],
            color.filled(),
        );
        rect.set_margin(0, 0, 48, 48);
        let series = chart
            .draw_series(std::iter::once(rect))
            .map_err(|e| e.to_string())?;
        if let (0, Some(legend)) = (i, &c.legend) {
            series.label(legend.as_str()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 16, y + 6)], PALETTE[0].filled())
            });
        }
        if let Some((lo, hi)) = b.whisker {
            let x = SegmentValue::CenterOf(i);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x.clone(), lo), (x, hi)],
                    BLACK.stroke_width(2),
                )))
                .map_err(|e| e.to_string())?;
        }
        let label_y = b.whisker.map_or(b.value, |w| w.1.max(b.value));
        let style = (FAMILY, 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        let text = if c.counts {
            format!("{:.0}", b.value)
        } else {
            format_value(b.value)
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (SegmentValue::CenterOf(i), label_y),
                style,
            )))
            .map_err(|e| e.to_string())?;
    }
    if c.legend.is_some() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A tick label for a whole-number axis: the integer, or nothing between integers.
fn whole_or_blank(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{:.0}", v.round())
    } else {
        String::new()
    }
}

/// Bar labels: three significant digits, no exponent.
fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn draw_lines<DB: DrawingBackend>(
    c: &LineChart,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), String> {
    let points = c.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let lower = if c.y_from_zero {
        0.0
    } else {
        (y0 - pad).max(0.0)
    };
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, lower..y1 + pad)
        .map_err(|e| e.to_string())?;
    // Whole-number x: at most 11 ticks (nice steps then land on integers), and nothing
    // printed between integers.
    let x_ticks = if c.integer_x {
        ((x1 - x0).round() as usize + 1).clamp(2, 11)
    } else {
        10
    };
    let whole = |v: &f64| whole_or_blank(*v);
    let mut mesh = chart.configure_mesh();
    if c.integer_x {
        mesh.x_labels(x_ticks).x_label_formatter(&whole);
    }
    mesh.x_desc(c.x_label.as_str())
        .y_desc(c.y_label.as_str())
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, pts)) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bars() -> Chart {
        Chart::Bars(BarChart {
            title: "Accuracy".into(),
            y_label: "combined accuracy (%)".into(),
            bars: vec![
                Bar {
                    label: "base".into(),
                    value: 61.0,
                    whisker: Some((55.0, 66.0)),
                },
                Bar {
                    label: "nf4+adapter".into(),
                    value: 80.5,
                    whisker: Some((76.0, 85.0)),
                },
            ],
            ..Default::default()
        })
    }

    #[test]
    fn charts_render_to_a_decodable_png_and_an_svg_with_the_labels() {
        let dir = tempfile::tempdir().unwrap();
        let [png, svg] = render(&bars(), &dir.path().join("acc")).unwrap();
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), SIZE);
        // Text was rasterized: some pixels are neither white nor a bar color.
        let rgb = img.to_rgb8();
        assert!(rgb.pixels().any(|p| p.0 == [0, 0, 0]));
        let text = std::fs::read_to_string(svg).unwrap();
        assert!(text.contains("nf4+adapter"), "labels missing from svg");
        assert!(text.contains("Accuracy"));
    }

    #[test]
    fn rendering_twice_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let lines = Chart::Lines(LineChart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![("train".into(), vec![(1.0, 2.0), (2.0, 1.5), (3.0, 1.2)])],
            y_from_zero: false,
            ..Default::default()
        });
        for (i, c) in [bars(), lines].iter().enumerate() {
            let a = render(c, &dir.path().join(format!("a{i}"))).unwrap();
            let b = render(c, &dir.path().join(format!("b{i}"))).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
            }
        }
    }
}
