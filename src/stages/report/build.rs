//! Assembling FINAL_REPORT.json from the stage artifacts: stage summaries, the variant
//! table, the deployment recommendation, the regression flag and the warnings.
//!
//! Everything here is a pure function of the artifacts (plus the `generated_at` text the
//! caller passes), so regenerating from the same `reports/` gives the same report.
//!
//! **Recommendation rule.** Among the variants the evaluate stage scored, the one with the
//! highest combined accuracy is the *best*. Every variant whose 95% interval of combined
//! accuracy reaches the best's point estimate is *within the noise* of it. Among those, the
//! one with the least memory wins (memory decides whether the model fits a deployment GPU at
//! all), then the lower p50 latency, then evaluation order. Memory is the variant's own, as
//! the evaluate stage measures it per variant (`peak_memory_bytes` beside
//! `weights_resident_bytes`: the allocator's peak on a GPU, on the CPU the larger of its
//! resident weights and its RSS growth), not the process peak, which the variants share.
//! Artifacts without a per-variant measure fall back to the weight bytes on disk. A variant
//! with no measured memory ranks after those with one. When the best combined accuracy is zero no
//! variant extracted anything, and nothing is recommended.
//!
//! **Regression rule.** The fine-tuned variant (`nf4+adapter`) is flagged as a regression
//! when it is worse than `base` beyond the interval: with a paired-bootstrap comparison of
//! combined accuracy in evaluation.json, when the upper bound of (adapter − base) is below
//! zero; without one, when the adapter's upper bound is below base's point estimate.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::inputs::{
    BaselineMetrics, DatasetMetrics, DownloadMetrics, EnvironmentMetrics, EvaluationMetrics,
    Performance, QuantizeMetrics, TrainingMetrics,
};
use crate::metrics::extraction::{Estimate, ScoreReport};
use crate::pipeline::{Artifact, Stage, Status, UpstreamState};
use crate::stages::{
    baseline::Baseline, download::Download, evaluate::Evaluate, prepare::Prepare, probe::Probe,
    quantize::Quantize, train::Train,
};

/// Version of the FINAL_REPORT.json layout.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// Below this many test documents the report warns that intervals are wide.
pub const SMALL_TEST_SET_DOCUMENTS: usize = 100;

/// Above this share of unparseable answers a variant gets a warning.
pub const UNPARSEABLE_WARN_SHARE: f64 = 0.10;

/// The variant names the evaluate stage uses, in the order the report lists them.
pub const VARIANTS: [&str; 3] = ["base", "nf4", "nf4+adapter"];

/// One stage as the report saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEntry {
    /// Stage name.
    pub stage: String,
    /// `reports/<file>`.
    pub artifact: String,
    /// `completed`, `failed`, `not run` or `unreadable`.
    pub status: String,
    /// When the artifact was written (RFC 3339 UTC).
    pub finished_at: Option<String>,
    /// How long the stage ran, s.
    pub duration_s: Option<f64>,
    /// Key figures from the artifact.
    pub summary: Vec<(String, String)>,
    /// Warnings the stage recorded.
    pub warnings: Vec<String>,
    /// The failure (or why the artifact could not be read).
    pub error: Option<String>,
}

/// One model variant's figures, from evaluation.json when it ran, else from the baseline
/// (base) and quantize (nf4) artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantRow {
    /// `base`, `nf4` or `nf4+adapter`.
    pub name: String,
    /// Combined accuracy with its 95% interval (evaluate), fraction in [0, 1].
    pub combined: Option<Estimate>,
    /// Share of ground-truth terms found.
    pub term_accuracy: Option<Estimate>,
    /// Share of ground-truth terms whose value matched.
    pub value_accuracy: Option<Estimate>,
    /// Share of ground-truth units matched (no interval).
    pub unit_accuracy: Option<f64>,
    /// Strict (term, value) precision.
    pub precision: Option<Estimate>,
    /// Strict (term, value) recall.
    pub recall: Option<Estimate>,
    /// Strict (term, value) F1.
    pub f1: Option<Estimate>,
    /// Answers with no usable JSON, of `documents`.
    pub unparseable_answers: Option<usize>,
    /// Test documents scored.
    pub documents: Option<usize>,
    /// Speed and memory.
    pub performance: Performance,
    /// Which artifact the performance figures come from.
    pub performance_from: Option<String>,
    /// Combined accuracy per document type (evaluate), keyed by type.
    #[serde(default)]
    pub combined_by_doc_type: BTreeMap<String, Estimate>,
    /// Combined accuracy per source (evaluate), keyed by source.
    #[serde(default)]
    pub combined_by_source: BTreeMap<String, Estimate>,
    /// Per document type and per source scores (evaluate), for the Markdown tables.
    #[serde(skip)]
    pub breakdown: Option<ScoreReport>,
}

/// The deployment recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// The variant to deploy, `None` when nothing was evaluated.
    pub variant: Option<String>,
    /// Why, with the deciding numbers, most important first.
    pub reasons: Vec<String>,
}

/// The fine-tuned-vs-base check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionCheck {
    /// The fine-tuned variant checked.
    pub candidate: String,
    /// The variant it is checked against.
    pub baseline: String,
    /// `paired bootstrap of the difference` or `interval of the candidate`.
    pub method: String,
    /// Combined accuracy candidate − baseline.
    pub diff: f64,
    /// The interval the rule used (of the difference, or of the candidate).
    pub ci95_low: f64,
    /// Upper bound of that interval.
    pub ci95_high: f64,
    /// True when the candidate is worse beyond the interval.
    pub regression: bool,
}

/// FINAL_REPORT.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// Layout version of this file ([`REPORT_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// When the report was generated (the only field that changes between regenerations).
    pub generated_at: String,
    /// Version of the medpipe that wrote the report.
    pub medpipe_version: String,
    /// Commit the artifacts were produced from, when all agree.
    pub git_commit: Option<String>,
    /// Every stage, in pipeline order, as its artifact says.
    pub stages: Vec<StageEntry>,
    /// Device the model stages ran on.
    pub device: Option<String>,
    /// The model variants measured.
    pub variants: Vec<VariantRow>,
    /// Which variant to deploy and why.
    pub recommendation: Recommendation,
    /// Fine-tuned vs base (absent when either was not evaluated).
    pub regression: Option<RegressionCheck>,
    /// Problems a reader must know about, most serious first.
    pub warnings: Vec<String>,
    /// Shell commands that reproduce this run.
    pub reproduce: Vec<String>,
    /// Chart files, relative to `reports/`.
    pub charts: Vec<String>,
}

/// The artifacts found in `reports/`, with their typed metrics.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Every stage, in pipeline order.
    pub stages: Vec<StageEntry>,
    /// Completed artifacts by stage name.
    pub artifacts: BTreeMap<String, Artifact>,
    /// Typed metrics of each completed artifact (absent when not run, failed or not understood).
    pub environment: Option<EnvironmentMetrics>,
    /// download.json metrics.
    pub download: Option<DownloadMetrics>,
    /// baseline.json metrics.
    pub baseline: Option<BaselineMetrics>,
    /// quantize.json metrics.
    pub quantize: Option<QuantizeMetrics>,
    /// dataset.json metrics.
    pub dataset: Option<DatasetMetrics>,
    /// training_metrics.json metrics.
    pub training: Option<TrainingMetrics>,
    /// evaluation.json metrics.
    pub evaluation: Option<EvaluationMetrics>,
}

/// Reads every earlier stage's artifact, as the runner hands them to the report stage
/// (registry order). Never fails: a missing, failed or unreadable artifact becomes a stage
/// entry that says so, and its figures are absent.
pub fn read_inputs(states: &[UpstreamState]) -> Inputs {
    let mut inputs = Inputs::default();
    for UpstreamState {
        stage,
        artifact_file: file,
        artifact,
    } in states
    {
        let mut entry = StageEntry {
            stage: stage.to_string(),
            artifact: format!("reports/{file}"),
            status: "not run".into(),
            finished_at: None,
            duration_s: None,
            summary: Vec::new(),
            warnings: Vec::new(),
            error: None,
        };
        match artifact {
            Ok(None) => {}
            Err(e) => {
                entry.status = "unreadable".into();
                entry.error = Some(e.clone());
            }
            Ok(Some(a)) => {
                entry.finished_at = Some(a.finished_at.clone());
                entry.duration_s = Some(a.duration_s);
                entry.summary = a.summary.clone();
                entry.warnings = a.warnings.clone();
                if a.status == Status::Failed {
                    entry.status = "failed".into();
                    entry.error = Some(
                        a.error
                            .as_ref()
                            .map(|e| e.full())
                            .unwrap_or_else(|| "no error recorded".into()),
                    );
                } else {
                    entry.status = "completed".into();
                    if let Err(e) = inputs.take_metrics(stage, &a.metrics) {
                        entry.error = Some(format!("metrics not understood: {e}"));
                    }
                    inputs.artifacts.insert(stage.to_string(), a.clone());
                }
            }
        }
        inputs.stages.push(entry);
    }
    inputs
}

impl Inputs {
    fn take_metrics(&mut self, stage: &str, m: &Value) -> Result<(), serde_json::Error> {
        fn parse<T: serde::de::DeserializeOwned>(
            m: &Value,
        ) -> Result<Option<T>, serde_json::Error> {
            T::deserialize(m).map(Some)
        }
        // The figures the report uses, typed as each producing stage declares them; a stage
        // the report has no figures for (one added later) still gets its entry above.
        match stage {
            Probe::NAME => self.environment = parse::<<Probe as Stage>::Metrics>(m)?,
            Download::NAME => self.download = parse::<<Download as Stage>::Metrics>(m)?,
            Baseline::NAME => self.baseline = parse::<<Baseline as Stage>::Metrics>(m)?,
            Quantize::NAME => self.quantize = parse::<<Quantize as Stage>::Metrics>(m)?,
            Prepare::NAME => self.dataset = Some(dataset_from_prepare(m)?),
            Train::NAME => self.training = parse::<<Train as Stage>::Metrics>(m)?,
            Evaluate::NAME => self.evaluation = parse::<<Evaluate as Stage>::Metrics>(m)?,
            _ => {}
        }
        Ok(())
    }
}

/// Reads the prepare stage's metrics: `sources` is a map `{name: {read, kept, dropped}}` and
/// each split an object with `count` and `by_doc_type` (see `stages/prepare.rs`); the
/// crafted-artifact layout (`sources` as a list, plain split counts) is accepted too.
fn dataset_from_prepare(m: &Value) -> Result<DatasetMetrics, serde_json::Error> {
    use super::inputs::{SourceStats, SplitSizes};
    if !m.get("sources").is_some_and(Value::is_object) {
        return DatasetMetrics::deserialize(m);
    }
    let p = <Prepare as Stage>::Metrics::deserialize(m)?;
    let sources = p
        .sources
        .into_iter()
        .map(|(name, t)| SourceStats {
            name,
            offered: t.read,
            kept: t.kept,
            dropped: t.dropped,
        })
        .collect();
    let count = |split: &str| p.splits.get(split).map_or(0, |s| s.count);
    let mut doc_types = std::collections::BTreeMap::new();
    for split in ["train", "val", "test"] {
        for (t, n) in p
            .splits
            .get(split)
            .map(|s| &s.by_doc_type)
            .into_iter()
            .flatten()
        {
            *doc_types.entry(t.clone()).or_insert(0) += n;
        }
    }
    Ok(DatasetMetrics {
        seed: p.seed,
        sources,
        splits: SplitSizes {
            train: count("train"),
            val: count("val"),
            test: count("test"),
        },
        doc_types,
    })
}

/// A variant's own memory, bytes: its measured peak where the evaluate stage measured it per
/// variant (it recorded `weights_resident_bytes`), else its weight bytes on disk, else the
/// process peak.
pub fn own_memory(p: &Performance) -> Option<u64> {
    match p.weights_resident_bytes {
        Some(r) => Some(p.peak_memory_bytes.unwrap_or(r).max(r)),
        None => p.weights_bytes.or(p.peak_memory_bytes),
    }
}

/// Builds the report from the inputs. `charts` are the chart files already drawn.
pub fn assemble(inputs: &Inputs, generated_at: &str, charts: Vec<String>) -> FinalReport {
    let variants = variant_rows(inputs);
    let recommendation = recommend(&variants, inputs);
    let regression = regression_check(&variants, inputs.evaluation.as_ref());
    let commits: Vec<&str> = inputs
        .artifacts
        .values()
        .filter_map(|a| a.git_commit.as_deref())
        .collect();
    let git_commit = match commits.first() {
        Some(c) if commits.iter().all(|x| x == c) => Some(c.to_string()),
        _ => None,
    };
    let device = inputs
        .environment
        .as_ref()
        .map(|e| e.device.clone())
        .filter(|d| !d.is_empty());
    FinalReport {
        schema_version: REPORT_SCHEMA_VERSION,
        generated_at: generated_at.into(),
        medpipe_version: crate::build_info::MEDPIPE_VERSION.into(),
        warnings: warnings(inputs, &variants, regression.as_ref()),
        reproduce: reproduce(git_commit.as_deref(), device.as_deref()),
        git_commit,
        stages: inputs.stages.clone(),
        device,
        variants,
        recommendation,
        regression,
        charts,
    }
}

pub(crate) fn variant_rows(inputs: &Inputs) -> Vec<VariantRow> {
    let mut rows = Vec::new();
    let eval = inputs.evaluation.as_ref();
    let mut names: Vec<String> = VARIANTS.iter().map(|s| s.to_string()).collect();
    for v in eval.map(|e| e.variants.as_slice()).unwrap_or_default() {
        if !names.contains(&v.name) {
            names.push(v.name.clone());
        }
    }
    for name in names {
        let ev = eval.and_then(|e| e.variants.iter().find(|v| v.name == name));
        let fallback = match name.as_str() {
            "base" => inputs
                .baseline
                .as_ref()
                .map(|b| (b.performance.clone(), "baseline.json")),
            "nf4" => inputs
                .quantize
                .as_ref()
                .map(|q| (q.performance.clone(), "quantize.json")),
            _ => None,
        };
        let (performance, performance_from) = match ev {
            Some(v) if v.performance != Performance::default() => {
                (v.performance.clone(), Some("evaluation.json".to_string()))
            }
            _ => match fallback {
                Some((p, from)) => (p, Some(from.to_string())),
                None => (Performance::default(), None),
            },
        };
        if ev.is_none() && performance_from.is_none() {
            continue;
        }
        let o = ev.map(|v| &v.scores.overall);
        rows.push(VariantRow {
            name,
            combined: o.map(|s| s.combined),
            term_accuracy: o.map(|s| s.term_accuracy),
            value_accuracy: o.map(|s| s.value_accuracy),
            unit_accuracy: o.and_then(|s| s.unit_accuracy),
            precision: o.map(|s| s.precision),
            recall: o.map(|s| s.recall),
            f1: o.map(|s| s.f1),
            unparseable_answers: o.map(|s| s.unparseable_answers),
            documents: o.map(|s| s.documents),
            performance,
            performance_from,
            combined_by_doc_type: ev
                .map(|v| {
                    v.scores
                        .by_doc_type
                        .iter()
                        .map(|(k, s)| (k.clone(), s.combined))
                        .collect()
                })
                .unwrap_or_default(),
            combined_by_source: ev
                .map(|v| {
                    v.scores
                        .by_source
                        .iter()
                        .map(|(k, s)| (k.clone(), s.combined))
                        .collect()
                })
                .unwrap_or_default(),
            breakdown: ev.map(|v| v.scores.clone()),
        });
    }
    rows
}

/// Percent with one decimal.
pub(crate) fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// An estimate as `81.2% [77.0, 85.1]`.
pub(crate) fn pct_ci(e: &Estimate) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * e.value,
        100.0 * e.ci95_low,
        100.0 * e.ci95_high
    )
}

/// Bytes in GiB (≥ 1 GiB) or MiB.
pub(crate) fn bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b as f64 >= GIB {
        format!("{:.2} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

fn recommend(variants: &[VariantRow], inputs: &Inputs) -> Recommendation {
    let scored: Vec<(&VariantRow, Estimate)> = variants
        .iter()
        .filter_map(|v| v.combined.map(|c| (v, c)))
        .collect();
    let Some(&(best, best_c)) =
        scored
            .iter()
            .fold(None, |acc: Option<&(&VariantRow, Estimate)>, x| match acc {
                Some(a) if a.1.value >= x.1.value => Some(a),
                _ => Some(x),
            })
    else {
        let why = match inputs.stages.iter().find(|s| s.stage == "evaluate") {
            Some(s) if s.status == "failed" || s.status == "unreadable" => format!(
                "no recommendation: the evaluate stage {}: {}",
                s.status,
                s.error.clone().unwrap_or_default()
            ),
            _ => "no recommendation: the evaluate stage has not run, so no variant has an accuracy to compare".to_string(),
        };
        return Recommendation {
            variant: None,
            reasons: vec![why],
        };
    };
    if best_c.value <= 0.0 {
        return Recommendation {
            variant: None,
            reasons: vec![format!(
                "no recommendation: no variant extracted a single term correctly (best combined accuracy {}, `{}`); none is fit to deploy for this task, whatever its memory or latency",
                pct_ci(&best_c),
                best.name
            )],
        };
    }
    let mem = |v: &VariantRow| own_memory(&v.performance).unwrap_or(u64::MAX);
    let p50 = |v: &VariantRow| {
        v.performance
            .latency_ms
            .as_ref()
            .map(|l| l.p50_ms)
            .unwrap_or(f64::INFINITY)
    };
    let tied: Vec<&VariantRow> = scored
        .iter()
        .filter(|(_, c)| c.ci95_high >= best_c.value)
        .map(|(v, _)| *v)
        .collect();
    let chosen = tied
        .iter()
        .copied()
        .min_by(|a, b| mem(a).cmp(&mem(b)).then(p50(a).total_cmp(&p50(b))))
        .unwrap_or(best);

    let mem_text = |v: &VariantRow| {
        let p = &v.performance;
        match (p.weights_resident_bytes, own_memory(p), p.weights_bytes) {
            (Some(r), Some(m), _) => format!("{} (weights resident {})", bytes(m), bytes(r)),
            (None, _, Some(w)) => match p.peak_memory_bytes {
                Some(peak) => format!("{} of weights (process peak {})", bytes(w), bytes(peak)),
                None => format!("{} of weights", bytes(w)),
            },
            (None, Some(m), None) => format!("process peak {}", bytes(m)),
            (_, None, _) => "n/a".into(),
        }
    };
    let p50_text = |v: &VariantRow| {
        v.performance
            .latency_ms
            .as_ref()
            .map(|l| format!("{:.0} ms", l.p50_ms))
            .unwrap_or_else(|| "n/a".into())
    };
    let mut reasons = Vec::new();
    let chosen_c = chosen.combined.unwrap_or(best_c);
    if chosen.name == best.name {
        reasons.push(format!(
            "`{}` has the highest combined accuracy: {}",
            chosen.name,
            pct_ci(&chosen_c)
        ));
    } else {
        reasons.push(format!(
            "`{}` is within the noise of the most accurate variant `{}` (its interval {} reaches {}) and needs less memory: {} vs {}",
            chosen.name,
            best.name,
            pct_ci(&chosen_c),
            pct(best_c.value),
            mem_text(chosen),
            mem_text(best)
        ));
    }
    for v in variants.iter().filter(|v| v.name != chosen.name) {
        let acc = v
            .combined
            .map(|c| pct_ci(&c))
            .unwrap_or_else(|| "not evaluated".into());
        let verdict = match v.combined {
            Some(c) if c.ci95_high < best_c.value => "less accurate beyond its interval",
            Some(_) if tied.iter().any(|t| t.name == v.name) => "as accurate within the noise",
            Some(_) => "less accurate",
            None => "no accuracy",
        };
        reasons.push(format!(
            "`{}`: combined {acc} ({verdict}); memory {} vs {}; p50 latency {} vs {}",
            v.name,
            mem_text(v),
            mem_text(chosen),
            p50_text(v),
            p50_text(chosen)
        ));
    }
    Recommendation {
        variant: Some(chosen.name.clone()),
        reasons,
    }
}

fn regression_check(
    variants: &[VariantRow],
    eval: Option<&EvaluationMetrics>,
) -> Option<RegressionCheck> {
    let (candidate, baseline) = ("nf4+adapter", "base");
    if let Some(c) = eval.and_then(|e| {
        e.comparisons
            .iter()
            .find(|c| c.candidate == candidate && c.baseline == baseline && c.metric == "combined")
    }) {
        return Some(RegressionCheck {
            candidate: candidate.into(),
            baseline: baseline.into(),
            method: "paired bootstrap of the difference".into(),
            diff: c.diff.value,
            ci95_low: c.diff.ci95_low,
            ci95_high: c.diff.ci95_high,
            regression: c.diff.ci95_high < 0.0,
        });
    }
    let find = |n: &str| {
        variants
            .iter()
            .find(|v| v.name == n)
            .and_then(|v| v.combined)
    };
    let (cand, base) = (find(candidate)?, find(baseline)?);
    Some(RegressionCheck {
        candidate: candidate.into(),
        baseline: baseline.into(),
        method: "interval of the candidate".into(),
        diff: cand.value - base.value,
        ci95_low: cand.ci95_low,
        ci95_high: cand.ci95_high,
        regression: cand.ci95_high < base.value,
    })
}

fn warnings(
    inputs: &Inputs,
    variants: &[VariantRow],
    regression: Option<&RegressionCheck>,
) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(r) = regression.filter(|r| r.regression) {
        w.push(format!(
            "REGRESSION: `{}` is worse than `{}` beyond the 95% interval: combined accuracy {:+.1} points ({}: [{:.1}, {:.1}])",
            r.candidate,
            r.baseline,
            100.0 * r.diff,
            r.method,
            100.0 * r.ci95_low,
            100.0 * r.ci95_high
        ));
    }
    for c in inputs.evaluation.iter().flat_map(|e| &e.comparisons) {
        let is_main =
            c.candidate == "nf4+adapter" && c.baseline == "base" && c.metric == "combined";
        if !is_main && c.diff.ci95_high < 0.0 {
            w.push(format!(
                "`{}` is worse than `{}` on {} beyond the 95% interval: {:+.1} points [{:.1}, {:.1}]",
                c.candidate,
                c.baseline,
                c.metric,
                100.0 * c.diff.value,
                100.0 * c.diff.ci95_low,
                100.0 * c.diff.ci95_high
            ));
        }
    }
    for s in &inputs.stages {
        match s.status.as_str() {
            "completed" => {
                if let Some(e) = &s.error {
                    w.push(format!("stage `{}`: {e}", s.stage));
                }
            }
            "not run" => w.push(format!(
                "stage `{}` has not run ({} is missing)",
                s.stage, s.artifact
            )),
            other => w.push(format!(
                "stage `{}` {other}: {}",
                s.stage,
                s.error.clone().unwrap_or_default()
            )),
        }
    }
    if let Some(d) = &inputs.dataset {
        for src in &d.sources {
            let lost: usize = src.dropped.values().sum();
            if lost == 0 {
                continue;
            }
            let reasons = src
                .dropped
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let all = if src.kept == 0 { " (all of it)" } else { "" };
            w.push(format!(
                "source `{}` lost {lost} of {} records{all}: {reasons}",
                src.name, src.offered
            ));
        }
    }
    if let Some(e) = &inputs.evaluation {
        if e.test_documents < SMALL_TEST_SET_DOCUMENTS {
            let widest = variants
                .iter()
                .filter_map(|v| v.combined)
                .map(|c| c.ci95_high - c.ci95_low)
                .fold(0.0, f64::max);
            w.push(if widest > 0.0 {
                format!(
                    "small test set: {} documents (< {SMALL_TEST_SET_DOCUMENTS}); combined-accuracy intervals are up to {:.1} points wide",
                    e.test_documents,
                    100.0 * widest
                )
            } else {
                format!(
                    "small test set: {} documents (< {SMALL_TEST_SET_DOCUMENTS}); every combined-accuracy interval has zero width because each variant scored the same on every document, so the intervals say nothing about how it would score on other documents",
                    e.test_documents
                )
            });
        }
    }
    for v in variants {
        if let (Some(u), Some(n)) = (v.unparseable_answers, v.documents) {
            if n > 0 && u as f64 / n as f64 > UNPARSEABLE_WARN_SHARE {
                w.push(format!(
                    "`{}`: {u} of {n} answers ({}) had no usable JSON and scored zero",
                    v.name,
                    pct(u as f64 / n as f64)
                ));
            }
        }
    }
    for s in &inputs.stages {
        for sw in &s.warnings {
            w.push(format!("{}: {sw}", s.stage));
        }
    }
    w
}

fn reproduce(git_commit: Option<&str>, device: Option<&str>) -> Vec<String> {
    let mut cmds = Vec::new();
    if let Some(c) = git_commit {
        cmds.push(format!("git checkout {c}"));
    }
    let cuda = device.is_some_and(|d| d.starts_with("cuda"));
    cmds.push(if cuda {
        "cargo build --release --features cuda".into()
    } else {
        "cargo build --release".into()
    });
    let mut run = format!(
        "./target/release/medpipe run --config {} --workspace repro",
        super::USED_CONFIG_FILE_REL
    );
    if let Some(d) = device {
        let _ = write!(run, " --device {d}");
    }
    cmds.push(run);
    cmds.push("./target/release/medpipe status --workspace repro".into());
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_stage_metrics_are_read_as_dataset_figures() {
        let m = serde_json::json!({
            "seed": 42,
            "sources": {"synthetic": {"kind": "synthetic", "read": 10, "kept": 8,
                                      "dropped": {"duplicate": 2}}},
            "splits": {
                "train": {"count": 6, "by_doc_type": {"lab_panel": 4, "icu_flowsheet": 2}},
                "val": {"count": 1, "by_doc_type": {"lab_panel": 1}},
                "test": {"count": 1, "by_doc_type": {"icu_flowsheet": 1}}
            }
        });
        let d = dataset_from_prepare(&m).unwrap();
        assert_eq!(d.seed, Some(42));
        assert_eq!(d.sources.len(), 1);
        assert_eq!((d.sources[0].offered, d.sources[0].kept), (10, 8));
        assert_eq!(d.sources[0].dropped["duplicate"], 2);
        assert_eq!((d.splits.train, d.splits.val, d.splits.test), (6, 1, 1));
        assert_eq!(d.doc_types["lab_panel"], 5);
        assert_eq!(d.doc_types["icu_flowsheet"], 3);
    }
}
