//! `medpipe bench --compare A.json B.json`: two results side by side, the delta of each
//! figure, and whether the difference exceeds run-to-run noise.
//!
//! Noise rule: a difference in a mean is called real only when the two 95% confidence
//! intervals do not overlap (a conservative test: non-overlap implies p < 0.05 for a
//! difference of means, the converse does not hold). Figures measured once (load time,
//! throughput, peak memory) have no interval, so their verdict is "no CI".

use std::fmt::Write as _;

use crate::bench::schema::{BenchResult, RateSummary};
use crate::metrics::stats::Summary;

/// Whether a difference exceeds run-to-run noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The 95% CIs do not overlap.
    BeyondNoise,
    /// The 95% CIs overlap.
    WithinNoise,
    /// One side has no interval (a single measurement).
    NoInterval,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::BeyondNoise => "yes (CIs disjoint)",
            Verdict::WithinNoise => "no (CIs overlap)",
            Verdict::NoInterval => "n/a (no CI)",
        }
    }
}

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRow {
    /// Figure name with its unit (`batch 1 latency mean, ms`).
    pub metric: String,
    pub a: f64,
    pub b: f64,
    /// `b - a`.
    pub delta: f64,
    /// `(b - a) / a` in percent (`None` when `a` is 0).
    pub delta_pct: Option<f64>,
    pub verdict: Verdict,
}

/// A mean with its optional 95% CI.
#[derive(Clone, Copy)]
struct Est {
    value: f64,
    ci: Option<(f64, f64)>,
}

impl From<&Summary> for Est {
    fn from(s: &Summary) -> Self {
        Est {
            value: s.mean_ms,
            ci: s.ci95_low_ms.zip(s.ci95_high_ms),
        }
    }
}

impl From<&RateSummary> for Est {
    fn from(s: &RateSummary) -> Self {
        Est {
            value: s.mean,
            ci: s.ci95_low.zip(s.ci95_high),
        }
    }
}

fn single(value: f64) -> Est {
    Est { value, ci: None }
}

fn row(metric: String, a: Est, b: Est) -> CompareRow {
    let verdict = match (a.ci, b.ci) {
        (Some((al, ah)), Some((bl, bh))) => {
            if ah < bl || bh < al {
                Verdict::BeyondNoise
            } else {
                Verdict::WithinNoise
            }
        }
        _ => Verdict::NoInterval,
    };
    CompareRow {
        metric,
        a: a.value,
        b: b.value,
        delta: b.value - a.value,
        delta_pct: (a.value != 0.0).then(|| (b.value - a.value) / a.value * 100.0),
        verdict,
    }
}

/// Rows for every figure both results have: load time and peak memory, then per batch size
/// present in both: latency, TTFT, prefill, decode, tokens/s per request, throughput.
pub fn compare(a: &BenchResult, b: &BenchResult) -> Vec<CompareRow> {
    let mut rows = vec![row(
        "load time, ms".into(),
        single(a.load.load_time_ms),
        single(b.load.load_time_ms),
    )];
    if let (Some(pa), Some(pb)) = (a.memory.peak_rss_bytes, b.memory.peak_rss_bytes) {
        rows.push(row(
            "peak RSS, MiB".into(),
            single(pa as f64 / 1048576.0),
            single(pb as f64 / 1048576.0),
        ));
    }
    if let (Some(pa), Some(pb)) = (a.memory.device_peak_bytes, b.memory.device_peak_bytes) {
        rows.push(row(
            "peak device memory, MiB".into(),
            single(pa as f64 / 1048576.0),
            single(pb as f64 / 1048576.0),
        ));
    }
    for ba in &a.batches {
        let Some(bb) = b.batches.iter().find(|x| x.batch_size == ba.batch_size) else {
            continue;
        };
        let n = ba.batch_size;
        rows.push(row(
            format!("batch {n} latency mean, ms"),
            (&ba.latency_ms).into(),
            (&bb.latency_ms).into(),
        ));
        rows.push(row(
            format!("batch {n} TTFT mean, ms"),
            (&ba.ttft_ms).into(),
            (&bb.ttft_ms).into(),
        ));
        rows.push(row(
            format!("batch {n} prefill mean, ms"),
            (&ba.prefill_ms).into(),
            (&bb.prefill_ms).into(),
        ));
        rows.push(row(
            format!("batch {n} decode mean, ms"),
            (&ba.decode_ms).into(),
            (&bb.decode_ms).into(),
        ));
        rows.push(row(
            format!("batch {n} tokens/s per request"),
            (&ba.tokens_per_s).into(),
            (&bb.tokens_per_s).into(),
        ));
        rows.push(row(
            format!("batch {n} throughput, tokens/s"),
            single(ba.throughput_tokens_per_s),
            single(bb.throughput_tokens_per_s),
        ));
    }
    rows
}

/// Settings that differ between the two results (comparing them is then apples to pears).
pub fn differences(a: &BenchResult, b: &BenchResult) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{what}: A `{x}`, B `{y}`"));
        }
    };
    check("device", a.device.clone(), b.device.clone());
    check("model", a.model.id.clone(), b.model.id.clone());
    check("dtype", a.model.dtype.clone(), b.model.dtype.clone());
    let or_none = |x: &Option<String>| x.clone().unwrap_or_else(|| "none".into());
    check(
        "quantization",
        or_none(&a.model.quantization),
        or_none(&b.model.quantization),
    );
    check(
        "adapter",
        or_none(&a.model.adapter),
        or_none(&b.model.adapter),
    );
    check(
        "backend",
        a.versions.backend.clone(),
        b.versions.backend.clone(),
    );
    let list = |v: &[usize]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    check(
        "batch_sizes",
        list(&a.generation.batch_sizes),
        list(&b.generation.batch_sizes),
    );
    check(
        "runs",
        a.settings.runs.to_string(),
        b.settings.runs.to_string(),
    );
    check(
        "warmup_runs",
        a.settings.warmup_runs.to_string(),
        b.settings.warmup_runs.to_string(),
    );
    check(
        "max_new_tokens",
        a.generation.max_new_tokens.to_string(),
        b.generation.max_new_tokens.to_string(),
    );
    check(
        "do_sample",
        a.generation.do_sample.to_string(),
        b.generation.do_sample.to_string(),
    );
    check(
        "temperature",
        format!("{:?}", a.generation.temperature),
        format!("{:?}", b.generation.temperature),
    );
    check(
        "top_p",
        format!("{:?}", a.generation.top_p),
        format!("{:?}", b.generation.top_p),
    );
    check(
        "seed",
        a.generation.seed.to_string(),
        b.generation.seed.to_string(),
    );
    check(
        "inputs",
        a.settings.inputs.join(","),
        b.settings.inputs.join(","),
    );
    check(
        "cpu",
        format!("{:?}", a.platform.cpu_model),
        format!("{:?}", b.platform.cpu_model),
    );
    out
}

/// The comparison as a Markdown table, with the setting differences listed first.
pub fn markdown(a_name: &str, b_name: &str, a: &BenchResult, b: &BenchResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### medpipe bench --compare\n\nA: `{a_name}` ({}, {})  \nB: `{b_name}` ({}, {})\n",
        a.model.id, a.timestamp, b.model.id, b.timestamp
    );
    let diffs = differences(a, b);
    if !diffs.is_empty() {
        let _ = writeln!(s, "Settings differ:");
        for d in diffs {
            let _ = writeln!(s, "- {d}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "| figure | A | B | Δ (B − A) | Δ % | beyond noise |\n|---|---:|---:|---:|---:|---|"
    );
    for r in compare(a, b) {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:+.2} | {} | {} |",
            r.metric,
            r.a,
            r.b,
            r.delta,
            r.delta_pct
                .map_or_else(|| "n/a".into(), |p| format!("{p:+.1}%")),
            r.verdict.as_str()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::schema::tests::crafted;

    fn find<'a>(rows: &'a [CompareRow], metric: &str) -> &'a CompareRow {
        rows.iter().find(|r| r.metric == metric).unwrap()
    }

    #[test]
    fn a_large_latency_change_is_beyond_noise_and_a_small_one_is_not() {
        // crafted(m): samples m-1, m, m+1 → CI half width t(0.975,2)·1/√3 = 2.484 ms.
        let (a, far, near) = (crafted(100.0), crafted(120.0), crafted(101.0));
        let rows = compare(&a, &far);
        let lat = find(&rows, "batch 1 latency mean, ms");
        assert_eq!((lat.a, lat.b, lat.delta), (100.0, 120.0, 20.0));
        assert!((lat.delta_pct.unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(lat.verdict, Verdict::BeyondNoise);
        let rows = compare(&a, &near);
        assert_eq!(
            find(&rows, "batch 2 latency mean, ms").verdict,
            Verdict::WithinNoise
        );
        assert_eq!(find(&rows, "load time, ms").verdict, Verdict::NoInterval);
    }

    #[test]
    fn batch_sizes_missing_on_one_side_are_left_out_and_setting_changes_are_listed() {
        let a = crafted(100.0);
        let mut b = crafted(100.0);
        b.batches.truncate(1);
        b.device = "cuda:0".into();
        let rows = compare(&a, &b);
        assert!(rows.iter().all(|r| !r.metric.starts_with("batch 2")));
        let md = markdown("a.json", "b.json", &a, &b);
        assert!(md.contains("device: A `cpu`, B `cuda:0`"), "{md}");
        assert!(
            md.contains(
                "| batch 1 latency mean, ms | 100.00 | 100.00 | +0.00 | +0.0% | no (CIs overlap) |"
            ),
            "{md}"
        );
    }

    #[test]
    fn issue_15_runs_batch_sizes_and_quantization_are_listed_as_differing_settings() {
        let a = crafted(100.0);
        let mut b = crafted(100.0);
        b.settings.runs += 4;
        b.settings.warmup_runs += 1;
        b.generation.batch_sizes = vec![1];
        b.model.quantization = Some("nf4".into());
        let d = differences(&a, &b);
        let runs = format!("runs: A `{}`, B `{}`", a.settings.runs, b.settings.runs);
        for want in [
            runs.as_str(),
            "batch_sizes: A `1,2`, B `1`",
            "quantization: A `none`, B `nf4`",
            "warmup_runs",
        ] {
            assert!(d.iter().any(|x| x.contains(want)), "`{want}` not in {d:?}");
        }
        assert!(differences(&a, &a).is_empty());
    }
}
