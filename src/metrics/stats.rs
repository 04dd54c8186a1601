//! Latency statistics for the benchmark harness: mean, sample standard deviation, min, max,
//! a 95% confidence interval of the mean (Student t), and p50/p95/p99.
//!
//! Percentiles follow numpy's default (`numpy.percentile(x, q, method="linear")`, Hyndman &
//! Fan definition 7): sort the n samples, take the fractional rank `h = (n - 1) * q` and
//! interpolate linearly between the samples at `floor(h)` and `floor(h) + 1`. With one sample
//! every percentile is that sample.
//!
//! The confidence interval is `mean ± t(0.975, n - 1) * s / sqrt(n)` with `s` the sample
//! standard deviation (ddof = 1), which is exact for normal samples and the usual choice for
//! the small n of a benchmark (tens of runs), where the normal quantile 1.96 would be too
//! narrow.

use serde::{Deserialize, Serialize};

/// Errors summarizing samples.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("no samples to summarize")]
    Empty,
    #[error("sample {index} is not a finite number ({value})")]
    NotFinite { index: usize, value: f64 },
}

/// Summary of latency samples, in milliseconds.
///
/// `std_ms` and the confidence interval need two samples; with one they are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Arithmetic mean, ms.
    pub mean_ms: f64,
    /// Sample standard deviation (ddof = 1), ms.
    #[serde(default)]
    pub std_ms: Option<f64>,
    /// Smallest sample, ms.
    pub min_ms: f64,
    /// Largest sample, ms.
    pub max_ms: f64,
    /// Lower bound of the 95% confidence interval of the mean (Student t), ms.
    #[serde(default)]
    pub ci95_low_ms: Option<f64>,
    /// Upper bound of the 95% confidence interval of the mean (Student t), ms.
    #[serde(default)]
    pub ci95_high_ms: Option<f64>,
    /// Median (linear interpolation, as numpy), ms.
    pub p50_ms: f64,
    /// 95th percentile (linear interpolation), ms.
    pub p95_ms: f64,
    /// 99th percentile (linear interpolation), ms.
    pub p99_ms: f64,
}

/// Summarizes latency samples given in milliseconds.
///
/// # Errors
/// No samples, or a sample that is NaN or infinite (named by index).
pub fn summarize_ms(samples_ms: &[f64]) -> Result<Summary, StatsError> {
    if samples_ms.is_empty() {
        return Err(StatsError::Empty);
    }
    if let Some((index, &value)) = samples_ms.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(StatsError::NotFinite { index, value });
    }
    let mut sorted = samples_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mean = sorted.iter().sum::<f64>() / n as f64;
    let (std, ci) = if n >= 2 {
        let var = sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let std = var.sqrt();
        let half = student_t_975(n - 1) * std / (n as f64).sqrt();
        (Some(std), Some((mean - half, mean + half)))
    } else {
        (None, None)
    };
    Ok(Summary {
        n,
        mean_ms: mean,
        std_ms: std,
        min_ms: sorted[0],
        max_ms: sorted[n - 1],
        ci95_low_ms: ci.map(|c| c.0),
        ci95_high_ms: ci.map(|c| c.1),
        p50_ms: percentile_sorted(&sorted, 0.50),
        p95_ms: percentile_sorted(&sorted, 0.95),
        p99_ms: percentile_sorted(&sorted, 0.99),
    })
}

/// The `q`-quantile (`0 ≤ q ≤ 1`) of samples sorted ascending, by linear interpolation
/// between closest ranks (numpy's default; see the module doc). `q` is clamped to [0, 1];
/// an empty slice gives NaN.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Two-sided 95% critical value of Student's t with `df` degrees of freedom
/// (`t` such that P(|T| ≤ t) = 0.95). `df = 0` gives infinity (no interval).
///
/// Exact tabulated values (to 9 digits) for df ≤ 30; above, the Cornish–Fisher expansion of
/// t around the normal quantile 1.959964 to the 1/df³ term, whose error is below 2e-6 there.
pub fn student_t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706204736,
        4.302652730,
        3.182446305,
        2.776445105,
        2.570581836,
        2.446911851,
        2.364624252,
        2.306004135,
        2.262157163,
        2.228138852,
        2.200985160,
        2.178812830,
        2.160368656,
        2.144786688,
        2.131449546,
        2.119905299,
        2.109815578,
        2.100922040,
        2.093024054,
        2.085963447,
        2.079613845,
        2.073873068,
        2.068657610,
        2.063898562,
        2.059538553,
        2.055529439,
        2.051830516,
        2.048407142,
        2.045229642,
        2.042272456,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z = 1.959_963_984_540_054_f64;
            let n = df as f64;
            let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
            z + (z3 + z) / (4.0 * n)
                + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * n * n)
                + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * n * n * n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed values are exact to the digits written; f64 arithmetic adds ~1e-15.
    const HAND_ATOL: f64 = 1e-6;

    fn close(label: &str, got: f64, want: f64, atol: f64) {
        assert!(
            (got - want).abs() <= atol,
            "{label}: got {got}, want {want}"
        );
    }

    #[test]
    fn summary_of_five_samples_matches_hand_computation() {
        // mean 4; squared deviations 9+4+1+0+36 = 50; var = 50/4 = 12.5.
        // numpy.percentile([1,2,3,4,10], [50,95,99]) = [3, 8.8, 9.76].
        let s = summarize_ms(&[10.0, 2.0, 4.0, 1.0, 3.0]).unwrap();
        assert_eq!(s.n, 5);
        close("mean", s.mean_ms, 4.0, HAND_ATOL);
        close("std", s.std_ms.unwrap(), 12.5f64.sqrt(), HAND_ATOL);
        close("min", s.min_ms, 1.0, 0.0);
        close("max", s.max_ms, 10.0, 0.0);
        close("p50", s.p50_ms, 3.0, HAND_ATOL);
        close("p95", s.p95_ms, 8.8, HAND_ATOL);
        close("p99", s.p99_ms, 9.76, HAND_ATOL);
        // half width = t(0.975, 4) * sqrt(12.5) / sqrt(5) = 2.776445105 * 1.58113883 = 4.389945
        close("ci low", s.ci95_low_ms.unwrap(), 4.0 - 4.389945, HAND_ATOL);
        close(
            "ci high",
            s.ci95_high_ms.unwrap(),
            4.0 + 4.389945,
            HAND_ATOL,
        );
    }

    #[test]
    fn percentiles_interpolate_between_ranks_like_numpy() {
        // numpy.percentile([10, 20, 30, 40], [0, 25, 50, 90, 100]) = [10, 17.5, 25, 37, 40]
        let s = [10.0, 20.0, 30.0, 40.0];
        for (q, want) in [
            (0.0, 10.0),
            (0.25, 17.5),
            (0.5, 25.0),
            (0.9, 37.0),
            (1.0, 40.0),
        ] {
            close(&format!("q={q}"), percentile_sorted(&s, q), want, HAND_ATOL);
        }
    }

    #[test]
    fn one_sample_has_no_spread_or_interval() {
        let s = summarize_ms(&[7.5]).unwrap();
        assert_eq!((s.mean_ms, s.p50_ms, s.p99_ms), (7.5, 7.5, 7.5));
        assert_eq!(s.std_ms, None);
        assert_eq!(s.ci95_low_ms, None);
    }

    #[test]
    fn empty_and_non_finite_samples_are_errors_naming_the_sample() {
        assert_eq!(summarize_ms(&[]), Err(StatsError::Empty));
        let err = summarize_ms(&[1.0, f64::NAN]).unwrap_err();
        assert!(matches!(err, StatsError::NotFinite { index: 1, .. }));
        assert!(err.to_string().contains("sample 1"));
    }

    /// The 1/df³ Cornish–Fisher expansion is 1.75e-6 off at df = 31 and closer above.
    const T_EXPANSION_ATOL: f64 = 2e-6;

    #[test]
    fn t_quantile_expansion_joins_the_table_and_tends_to_the_normal() {
        // scipy.stats.t.ppf(0.975, [31, 60, 120]) = 2.039513446, 2.000297822, 1.979930405
        close("df=31", student_t_975(31), 2.039513446, T_EXPANSION_ATOL);
        close("df=60", student_t_975(60), 2.000297822, T_EXPANSION_ATOL);
        close("df=120", student_t_975(120), 1.979930405, T_EXPANSION_ATOL);
        close("df=1e6", student_t_975(1_000_000), 1.959966, 1e-5);
        assert!(student_t_975(0).is_infinite());
    }

    #[test]
    fn summary_serializes_with_units_in_field_names() {
        let v = serde_json::to_value(summarize_ms(&[1.0, 2.0]).unwrap()).unwrap();
        for key in [
            "mean_ms",
            "std_ms",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "ci95_low_ms",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
    }
}
