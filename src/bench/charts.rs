//! Benchmark charts (SVG + PNG each), drawn with the report's plotters setup and embedded
//! font: the latency distribution (histogram of measured request latencies at the smallest
//! batch size) and the batch sweep (throughput per batch size).

use std::path::{Path, PathBuf};

use crate::bench::schema::BenchResult;
use crate::charts::{render, Bar, BarChart, Chart, ChartError, LineChart};

/// Histogram bins of the latency distribution.
const BINS: usize = 10;

/// The latency histogram of the smallest batch size: `BINS` equal-width bins over
/// [min, max] of its requests' latencies (one bin when all are equal). `None` without
/// measured requests.
pub fn latency_distribution(r: &BenchResult) -> Option<Chart> {
    let b = r.batches.iter().map(|b| b.batch_size).min()?;
    let lat: Vec<f64> = r
        .requests
        .iter()
        .filter(|q| q.batch_size == b)
        .map(|q| q.total_ms)
        .collect();
    let (lo, hi) = lat
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    if lat.is_empty() {
        return None;
    }
    let bins = if hi > lo { BINS } else { 1 };
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0usize; bins];
    for x in &lat {
        let i = (((x - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    Some(Chart::Bars(BarChart {
        title: format!(
            "Latency distribution, batch size {b}, {} requests (x: bin centre, ms)",
            lat.len()
        ),
        y_label: "requests".into(),
        counts: true,
        legend: Some(if hi > lo {
            format!("requests per {} ms bin", format_ms(width))
        } else {
            format!("requests, all at {} ms", format_ms(lo))
        }),
        bars: counts
            .iter()
            .enumerate()
            .map(|(i, &c)| Bar {
                label: format!("{:.0}", lo + width * (i as f64 + 0.5)),
                value: c as f64,
                whisker: None,
            })
            .collect(),
        ..Default::default()
    }))
}

/// Milliseconds for a legend: whole above 10 ms, else two decimals.
fn format_ms(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.2}")
    }
}

/// Throughput (tokens/s) against batch size.
pub fn batch_sweep(r: &BenchResult) -> Option<Chart> {
    if r.batches.is_empty() {
        return None;
    }
    Some(Chart::Lines(LineChart {
        title: format!("Batch sweep: {} on {}", r.model.id, r.device),
        x_label: "batch size".into(),
        y_label: "throughput, tokens/s".into(),
        series: vec![(
            "throughput".into(),
            r.batches
                .iter()
                .map(|b| (b.batch_size as f64, b.throughput_tokens_per_s))
                .collect(),
        )],
        y_from_zero: true,
        integer_x: true,
    }))
}

/// Writes `<stem>_latency.{png,svg}` and `<stem>_batch_sweep.{png,svg}`; returns the paths.
///
/// # Errors
/// Drawing or writing a chart.
pub fn write_charts(r: &BenchResult, stem: &Path) -> Result<Vec<PathBuf>, ChartError> {
    let name = stem
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into());
    let mut out = Vec::new();
    for (suffix, chart) in [
        ("latency", latency_distribution(r)),
        ("batch_sweep", batch_sweep(r)),
    ] {
        if let Some(c) = chart {
            out.extend(render(
                &c,
                &stem.with_file_name(format!("{name}_{suffix}")),
            )?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::schema::tests::crafted;
    use crate::bench::schema::RequestRecord;

    fn req(total_ms: f64) -> RequestRecord {
        RequestRecord {
            batch_size: 1,
            run: 0,
            input: "x".into(),
            prompt_tokens: 1,
            new_tokens: 1,
            stopped_on_eos: false,
            prefill_ms: total_ms,
            decode_ms: 0.0,
            ttft_ms: total_ms,
            total_ms,
            tokens_per_s: 1.0,
        }
    }

    #[test]
    fn histogram_counts_every_request_once() {
        let mut r = crafted(10.0);
        r.requests = [1.0, 2.0, 2.0, 10.0].map(req).to_vec();
        let Some(Chart::Bars(b)) = latency_distribution(&r) else {
            panic!("no histogram")
        };
        assert_eq!(b.bars.len(), BINS);
        assert_eq!(b.bars.iter().map(|x| x.value).sum::<f64>(), 4.0);
        assert_eq!(b.bars[0].value, 1.0);
        assert_eq!(b.bars[BINS - 1].value, 1.0);
    }

    #[test]
    fn charts_are_written_as_png_and_svg() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = crafted(10.0);
        r.requests = [5.0, 6.0].map(req).to_vec();
        let files = write_charts(&r, &tmp.path().join("bench")).unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            assert!(std::fs::metadata(&f).unwrap().len() > 0, "{}", f.display());
        }
    }

    #[test]
    fn issue_15_the_histogram_counts_in_whole_requests_with_a_legend_and_the_sweep_ticks_whole_batches(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = crafted(10.0);
        r.requests = [5.0, 6.0, 6.0, 25.0].map(req).to_vec();
        let Some(Chart::Bars(h)) = latency_distribution(&r) else {
            panic!("no histogram")
        };
        assert!(h.counts);
        assert_eq!(h.legend.as_deref(), Some("requests per 2.00 ms bin"));
        let Some(Chart::Lines(s)) = batch_sweep(&r) else {
            panic!("no sweep")
        };
        assert!(s.integer_x);
        let files = write_charts(&r, &tmp.path().join("b")).unwrap();
        let svg = |suffix: &str| {
            let f = files
                .iter()
                .find(|f| f.to_string_lossy().ends_with(suffix))
                .unwrap();
            std::fs::read_to_string(f).unwrap()
        };
        let hist = svg("_latency.svg");
        assert!(hist.contains("requests per 2.00 ms bin"), "legend missing");
        // counts 2 and 1, never 1.5 or 0.50
        assert!(hist.contains("\n2\n") && !hist.contains("\n1.5\n"));
        assert!(!hist.contains("\n2.00\n") && !hist.contains("\n0.5\n"));
        let sweep = svg("_batch_sweep.svg");
        assert!(sweep.contains("\n1\n") && sweep.contains("\n2\n"));
        assert!(!sweep.contains("\n1.1\n") && !sweep.contains("\n1.5\n"));
    }
}
