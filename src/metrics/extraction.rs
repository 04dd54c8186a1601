//! Scoring extracted items against the ground truth (DESIGN.md "Evaluation semantics").
//!
//! Per document, ground-truth items are matched one-to-one to predicted items with the same
//! normalized term ([`super::normalize`]); duplicates are a multiset (two `glucose` items in
//! the ground truth need two predicted `glucose` items). Matching is greedy in ground-truth
//! order, in three passes, so that the best match is taken first:
//! 1. same term, same value, same unit (both absent counts as same);
//! 2. same term, same value, and the unit absent on one side (a model that writes the unit
//!    inside the value, `"13.5 g/dL"`, has it split out first; a missing unit is tolerated,
//!    a *different* unit is not);
//! 3. same term only (the term was found, its value was wrong).
//!
//! Figures (all pooled over items, "micro", so a document with many items weighs more):
//! - **term accuracy** = ground-truth items matched in any pass / ground-truth items;
//! - **value accuracy** = ground-truth items matched in pass 1 or 2 / ground-truth items;
//! - **combined** = (term accuracy + value accuracy) / 2;
//! - **unit accuracy** = ground-truth items with a unit whose matched prediction carries the
//!   same normalized unit / ground-truth items with a unit;
//! - **strict precision / recall / F1** over (normalized term, normalized value) pairs as
//!   multisets: true positives = size of the multiset intersection; precision = TP /
//!   predicted items, recall = TP / ground-truth items, F1 their harmonic mean.
//!
//! A ratio whose denominator is zero is 0. An unparseable answer scores as no predictions.
//!
//! 95% confidence intervals come from a percentile bootstrap over *documents* (items in a
//! document are not independent): [`DEFAULT_RESAMPLES`] resamples with replacement, drawn by
//! ChaCha8 seeded with the given seed, so the same documents and seed give the same interval
//! on every machine. Interval bounds are the 2.5th and 97.5th percentiles (linear
//! interpolation, [`super::stats::percentile_sorted`]).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::answer::{Item, ParseStatus, ParsedAnswer};
use super::normalize;
use super::stats::percentile_sorted;

/// Bootstrap resamples used when the caller has no reason to choose otherwise: enough that
/// the 2.5th/97.5th percentiles move by well under a percentage point between seeds.
pub const DEFAULT_RESAMPLES: usize = 1000;

/// Errors of paired comparisons.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("paired comparison needs the same documents: {left} vs {right} scores")]
    Unpaired { left: usize, right: usize },
}

/// Counts for one document (or a sum over documents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Ground-truth items.
    pub gt_items: usize,
    /// Items the model predicted.
    pub predicted_items: usize,
    /// Ground-truth items whose term was found.
    pub terms_found: usize,
    /// Ground-truth items whose value matched.
    pub values_matched: usize,
    /// Ground-truth items that have a unit.
    pub gt_units: usize,
    /// Of those, items whose matched prediction has the same unit.
    pub units_matched: usize,
    /// (term, value) pairs in the multiset intersection.
    pub pairs_matched: usize,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.gt_items += o.gt_items;
        self.predicted_items += o.predicted_items;
        self.terms_found += o.terms_found;
        self.values_matched += o.values_matched;
        self.gt_units += o.gt_units;
        self.units_matched += o.units_matched;
        self.pairs_matched += o.pairs_matched;
    }
}

/// The figures that get a confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    TermAccuracy,
    ValueAccuracy,
    Combined,
    Precision,
    Recall,
    F1,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 6] = [
        Metric::TermAccuracy,
        Metric::ValueAccuracy,
        Metric::Combined,
        Metric::Precision,
        Metric::Recall,
        Metric::F1,
    ];
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl Counts {
    /// The value of `m` for these counts (module doc for definitions).
    pub fn metric(&self, m: Metric) -> f64 {
        match m {
            Metric::TermAccuracy => ratio(self.terms_found, self.gt_items),
            Metric::ValueAccuracy => ratio(self.values_matched, self.gt_items),
            Metric::Combined => {
                (self.metric(Metric::TermAccuracy) + self.metric(Metric::ValueAccuracy)) / 2.0
            }
            Metric::Precision => ratio(self.pairs_matched, self.predicted_items),
            Metric::Recall => ratio(self.pairs_matched, self.gt_items),
            Metric::F1 => {
                let (p, r) = (self.metric(Metric::Precision), self.metric(Metric::Recall));
                if p + r == 0.0 {
                    0.0
                } else {
                    2.0 * p * r / (p + r)
                }
            }
        }
    }
}

/// One scored document with what the breakdowns group by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocScore {
    /// Document id (from the split file).
    pub id: String,
    /// Document type (e.g. `lab_report`, `discharge_summary`).
    pub doc_type: String,
    /// Source the document came from (e.g. `synthetic`, `mtsamples`).
    pub source: String,
    /// How the answer was parsed.
    pub parse: ParseStatus,
    /// The document's counts.
    pub counts: Counts,
}

/// A point estimate with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Point estimate on all documents.
    pub value: f64,
    /// 2.5th percentile of the bootstrap distribution.
    pub ci95_low: f64,
    /// 97.5th percentile of the bootstrap distribution.
    pub ci95_high: f64,
}

/// Aggregated scores of a set of documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Documents scored.
    pub documents: usize,
    /// Summed counts.
    pub counts: Counts,
    /// Answers with no usable JSON (scored as no predictions).
    pub unparseable_answers: usize,
    /// Answers whose JSON had to be dug out of fences or prose.
    pub recovered_answers: usize,
    /// Share of ground-truth items whose term was found.
    pub term_accuracy: Estimate,
    /// Share of ground-truth items whose value matched.
    pub value_accuracy: Estimate,
    /// Mean of term and value accuracy.
    pub combined: Estimate,
    /// Unit accuracy (no interval), `None` when no ground-truth item has a unit.
    #[serde(default)]
    pub unit_accuracy: Option<f64>,
    /// Strict (term, value) precision.
    pub precision: Estimate,
    /// Strict (term, value) recall.
    pub recall: Estimate,
    /// Strict (term, value) F1.
    pub f1: Estimate,
}

/// Scores overall and per document type and per source, with the bootstrap settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    /// All documents.
    pub overall: Scores,
    /// Keyed by document type, sorted.
    pub by_doc_type: BTreeMap<String, Scores>,
    /// Keyed by source, sorted.
    pub by_source: BTreeMap<String, Scores>,
    /// Bootstrap resamples behind every interval.
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap.
    pub bootstrap_seed: u64,
}

/// Normalized form of an item for matching.
struct Norm {
    term: String,
    value: String,
    unit: Option<String>,
}

fn norm(item: &Item) -> Norm {
    let (value, unit) = match (&item.unit, normalize::split_value_unit(&item.value)) {
        (None, Some((v, u))) => (v, Some(u)),
        _ => (item.value.clone(), item.unit.clone()),
    };
    Norm {
        term: normalize::term(&item.term),
        value: normalize::value(&value),
        unit: unit.as_deref().and_then(normalize::unit),
    }
}

/// Scores one document's parsed answer against its ground truth (module doc).
pub fn score_items(gt: &[Item], answer: &ParsedAnswer) -> Counts {
    let g: Vec<Norm> = gt.iter().map(norm).collect();
    let p: Vec<Norm> = answer.items.iter().map(norm).collect();
    let mut used = vec![false; p.len()];
    let mut matched: Vec<Option<(usize, bool)>> = vec![None; g.len()]; // (pred, value ok)

    type Pass = fn(&Norm, &Norm) -> bool;
    let passes: [(Pass, bool); 3] = [
        (
            |g, p| g.term == p.term && g.value == p.value && g.unit == p.unit,
            true,
        ),
        (
            |g, p| g.term == p.term && g.value == p.value && (g.unit.is_none() || p.unit.is_none()),
            true,
        ),
        (|g, p| g.term == p.term, false),
    ];
    for (accept, value_ok) in passes {
        for (gi, gn) in g.iter().enumerate() {
            if matched[gi].is_some() {
                continue;
            }
            if let Some(pi) = (0..p.len()).find(|&pi| !used[pi] && accept(gn, &p[pi])) {
                used[pi] = true;
                matched[gi] = Some((pi, value_ok));
            }
        }
    }

    let mut c = Counts {
        gt_items: g.len(),
        predicted_items: p.len(),
        ..Counts::default()
    };
    for (gn, m) in g.iter().zip(&matched) {
        if let Some((pi, value_ok)) = m {
            c.terms_found += 1;
            c.values_matched += usize::from(*value_ok);
            if gn.unit.is_some() && gn.unit == p[*pi].unit {
                c.units_matched += 1;
            }
        }
        c.gt_units += usize::from(gn.unit.is_some());
    }
    let mut bag: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for n in &g {
        *bag.entry((&n.term, &n.value)).or_default() += 1;
    }
    for n in &p {
        if let Some(k) = bag.get_mut(&(n.term.as_str(), n.value.as_str())) {
            if *k > 0 {
                *k -= 1;
                c.pairs_matched += 1;
            }
        }
    }
    c
}

/// Parses `answer` and scores it against `gt`: the one call the evaluate stage makes per
/// document and variant.
pub fn score_document(
    id: &str,
    doc_type: &str,
    source: &str,
    gt: &[Item],
    answer: &str,
) -> DocScore {
    let parsed = super::answer::parse_answer(answer);
    DocScore {
        id: id.into(),
        doc_type: doc_type.into(),
        source: source.into(),
        parse: parsed.status,
        counts: score_items(gt, &parsed),
    }
}

/// Aggregates documents with bootstrap intervals (module doc).
pub fn aggregate(docs: &[DocScore], resamples: usize, seed: u64) -> Scores {
    let mut total = Counts::default();
    for d in docs {
        total += d.counts;
    }
    let cis = bootstrap(docs, resamples, seed);
    let est = |m: Metric, i: usize| Estimate {
        value: total.metric(m),
        ci95_low: cis[i].0,
        ci95_high: cis[i].1,
    };
    Scores {
        documents: docs.len(),
        counts: total,
        unparseable_answers: docs
            .iter()
            .filter(|d| d.parse == ParseStatus::Unparseable)
            .count(),
        recovered_answers: docs
            .iter()
            .filter(|d| d.parse == ParseStatus::Recovered)
            .count(),
        term_accuracy: est(Metric::TermAccuracy, 0),
        value_accuracy: est(Metric::ValueAccuracy, 1),
        combined: est(Metric::Combined, 2),
        unit_accuracy: (total.gt_units > 0).then(|| ratio(total.units_matched, total.gt_units)),
        precision: est(Metric::Precision, 3),
        recall: est(Metric::Recall, 4),
        f1: est(Metric::F1, 5),
    }
}

/// Overall scores plus per-document-type and per-source breakdowns.
pub fn score_report(docs: &[DocScore], resamples: usize, seed: u64) -> ScoreReport {
    let group = |key: fn(&DocScore) -> &str| {
        let mut groups: BTreeMap<String, Vec<DocScore>> = BTreeMap::new();
        for d in docs {
            groups
                .entry(key(d).to_string())
                .or_default()
                .push(d.clone());
        }
        groups
            .into_iter()
            .map(|(k, v)| (k, aggregate(&v, resamples, seed)))
            .collect()
    };
    ScoreReport {
        overall: aggregate(docs, resamples, seed),
        by_doc_type: group(|d| &d.doc_type),
        by_source: group(|d| &d.source),
        bootstrap_resamples: resamples,
        bootstrap_seed: seed,
    }
}

/// 95% percentile intervals of every [`Metric`] (in [`Metric::ALL`] order), resampling
/// documents. With no documents or no resamples the interval collapses to the point value.
fn bootstrap(docs: &[DocScore], resamples: usize, seed: u64) -> [(f64, f64); 6] {
    let mut total = Counts::default();
    for d in docs {
        total += d.counts;
    }
    if docs.is_empty() || resamples == 0 {
        return Metric::ALL.map(|m| (total.metric(m), total.metric(m)));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; 6] = Default::default();
    for _ in 0..resamples {
        let mut c = Counts::default();
        for _ in 0..docs.len() {
            c += docs[rng.random_range(0..docs.len())].counts;
        }
        for (i, m) in Metric::ALL.iter().enumerate() {
            draws[i].push(c.metric(*m));
        }
    }
    let mut out = [(0.0, 0.0); 6];
    for (i, d) in draws.iter_mut().enumerate() {
        d.sort_by(f64::total_cmp);
        out[i] = (percentile_sorted(d, 0.025), percentile_sorted(d, 0.975));
    }
    out
}

/// A paired comparison of two variants on the same documents: candidate − baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Baseline variant name (e.g. `base`).
    pub baseline: String,
    /// Candidate variant name (e.g. `nf4+adapter`).
    pub candidate: String,
    /// Metric compared (`combined`).
    pub metric: String,
    /// Difference candidate − baseline with its paired-bootstrap 95% interval.
    pub diff: Estimate,
}

/// Paired bootstrap of `metric(candidate) − metric(baseline)`: both score lists must be the
/// same documents in the same order; each resample draws document indices once and applies
/// them to both, so per-document difficulty cancels out.
///
/// # Errors
/// [`ScoreError::Unpaired`] when the lists differ in length.
pub fn paired_diff(
    baseline: &[DocScore],
    candidate: &[DocScore],
    metric: Metric,
    resamples: usize,
    seed: u64,
) -> Result<Estimate, ScoreError> {
    if baseline.len() != candidate.len() {
        return Err(ScoreError::Unpaired {
            left: baseline.len(),
            right: candidate.len(),
        });
    }
    let sum = |docs: &[DocScore], idx: &mut dyn Iterator<Item = usize>| {
        let mut c = Counts::default();
        for i in idx {
            c += docs[i].counts;
        }
        c
    };
    let n = baseline.len();
    let point =
        sum(candidate, &mut (0..n)).metric(metric) - sum(baseline, &mut (0..n)).metric(metric);
    if n == 0 || resamples == 0 {
        return Ok(Estimate {
            value: point,
            ci95_low: point,
            ci95_high: point,
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
        let b = sum(baseline, &mut idx.iter().copied()).metric(metric);
        let c = sum(candidate, &mut idx.iter().copied()).metric(metric);
        draws.push(c - b);
    }
    draws.sort_by(f64::total_cmp);
    Ok(Estimate {
        value: point,
        ci95_low: percentile_sorted(&draws, 0.025),
        ci95_high: percentile_sorted(&draws, 0.975),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::answer::parse_answer;

    fn gt(items: &[(&str, &str, Option<&str>)]) -> Vec<Item> {
        items
            .iter()
            .map(|(t, v, u)| Item {
                term: t.to_string(),
                value: v.to_string(),
                unit: u.map(str::to_string),
                category: None,
            })
            .collect()
    }

    fn score(truth: &[(&str, &str, Option<&str>)], answer: &str) -> Counts {
        score_items(&gt(truth), &parse_answer(answer))
    }

    #[test]
    fn trailing_zero_and_unit_case_still_match() {
        let c = score(
            &[("Glucose", "7.4", Some("mmol/L"))],
            r#"[{"term": "glucose", "value": "7.40", "unit": "mmol/l"}]"#,
        );
        assert_eq!(
            (c.terms_found, c.values_matched, c.units_matched),
            (1, 1, 1)
        );
        assert_eq!(c.pairs_matched, 1);
        let c = score(
            &[("Cholesterol", "190", Some("mg/dL"))],
            r#"[{"term": "cholesterol", "value": 190, "unit": "mg/dl"}]"#,
        );
        assert_eq!(c.metric(Metric::Combined), 1.0);
    }

    #[test]
    fn a_missing_unit_is_tolerated_but_a_wrong_unit_is_not() {
        let truth = [("Hb", "13.5", Some("g/dL"))];
        let c = score(&truth, r#"[{"term": "Hb", "value": "13.5"}]"#);
        assert_eq!((c.values_matched, c.units_matched, c.gt_units), (1, 0, 1));
        let c = score(
            &truth,
            r#"[{"term": "Hb", "value": "13.5", "unit": "mg/dL"}]"#,
        );
        assert_eq!((c.terms_found, c.values_matched), (1, 0));
        // The unit written inside the value is split out and checked.
        let c = score(&truth, r#"[{"term": "Hb", "value": "13.5 g/dl"}]"#);
        assert_eq!((c.values_matched, c.units_matched), (1, 1));
    }

    #[test]
    fn extra_predicted_terms_lower_precision_not_accuracy() {
        let c = score(
            &[("Na", "140", Some("mmol/L"))],
            r#"[{"term": "Na", "value": "140", "unit": "mmol/L"},
                {"term": "K", "value": "4.1", "unit": "mmol/L"},
                {"term": "Cl", "value": "101", "unit": "mmol/L"}]"#,
        );
        assert_eq!(c.metric(Metric::TermAccuracy), 1.0);
        assert_eq!(c.metric(Metric::Recall), 1.0);
        assert!((c.metric(Metric::Precision) - 1.0 / 3.0).abs() < 1e-12);
        assert!((c.metric(Metric::F1) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn duplicated_terms_count_as_a_multiset() {
        let truth = [("Glucose", "5.1", None), ("Glucose", "7.8", None)];
        // One prediction can satisfy only one of the two ground-truth glucose items.
        let c = score(&truth, r#"[{"term": "glucose", "value": "7.8"}]"#);
        assert_eq!(
            (c.terms_found, c.values_matched, c.pairs_matched),
            (1, 1, 1)
        );
        // Repeating a prediction does not earn the second item or a second true positive.
        let c = score(
            &truth,
            r#"[{"term": "glucose", "value": "7.8"}, {"term": "glucose", "value": "7.8"}]"#,
        );
        assert_eq!(
            (c.terms_found, c.values_matched, c.pairs_matched),
            (2, 1, 1)
        );
        assert_eq!(c.metric(Metric::Precision), 0.5);
        // Order does not matter: the value match is found even after a term-only candidate.
        let c = score(
            &truth,
            r#"[{"term": "glucose", "value": "9.9"}, {"term": "glucose", "value": "5.1"}]"#,
        );
        assert_eq!((c.terms_found, c.values_matched), (2, 1));
    }

    #[test]
    fn fenced_answer_scores_like_clean_json_and_junk_scores_zero() {
        let truth = [("BP", "120/80", Some("mmHg"))];
        let fenced = score(
            &truth,
            "Here you go:\n```json\n[{\"term\": \"BP\", \"value\": \"120 / 80\", \"unit\": \"mm Hg\"}]\n```",
        );
        assert_eq!(fenced.metric(Metric::Combined), 1.0);
        let junk = score(&truth, "The patient looks fine.");
        assert_eq!(junk.predicted_items, 0);
        assert_eq!(junk.metric(Metric::Combined), 0.0);
        assert_eq!(junk.metric(Metric::F1), 0.0);
    }

    fn doc(id: &str, doc_type: &str, source: &str, found: usize, values: usize) -> DocScore {
        DocScore {
            id: id.into(),
            doc_type: doc_type.into(),
            source: source.into(),
            parse: if found == 0 {
                ParseStatus::Unparseable
            } else {
                ParseStatus::Clean
            },
            counts: Counts {
                gt_items: 4,
                predicted_items: found,
                terms_found: found,
                values_matched: values,
                pairs_matched: values,
                ..Counts::default()
            },
        }
    }

    fn corpus() -> Vec<DocScore> {
        (0..20)
            .map(|i| {
                let t = if i % 2 == 0 { "lab_report" } else { "note" };
                let s = if i % 3 == 0 { "mtsamples" } else { "synthetic" };
                doc(&format!("d{i}"), t, s, i % 5, (i % 5).min(i % 3))
            })
            .collect()
    }

    #[test]
    fn aggregation_pools_items_and_breaks_down_by_type_and_source() {
        let r = score_report(&corpus(), 200, 7);
        let all = &r.overall;
        assert_eq!(all.documents, 20);
        assert_eq!(all.counts.gt_items, 80);
        let found: usize = (0..20).map(|i| i % 5).sum();
        assert_eq!(all.term_accuracy.value, found as f64 / 80.0);
        assert_eq!(
            all.combined.value,
            (all.term_accuracy.value + all.value_accuracy.value) / 2.0
        );
        assert_eq!(all.unparseable_answers, 4);
        assert_eq!(
            r.by_doc_type.keys().collect::<Vec<_>>(),
            vec!["lab_report", "note"]
        );
        assert_eq!(r.by_source["mtsamples"].documents, 7);
        assert_eq!(r.by_source["synthetic"].documents, 13);
        for e in [all.term_accuracy, all.value_accuracy, all.combined, all.f1] {
            assert!(e.ci95_low <= e.value && e.value <= e.ci95_high, "{e:?}");
            assert!(e.ci95_low < e.ci95_high, "{e:?}");
        }
    }

    #[test]
    fn bootstrap_is_deterministic_per_seed_and_varies_with_it() {
        let a = score_report(&corpus(), 300, 42);
        let b = score_report(&corpus(), 300, 42);
        let c = score_report(&corpus(), 300, 43);
        assert_eq!(a, b);
        assert_ne!(a.overall.combined, c.overall.combined);
    }

    #[test]
    fn paired_difference_sees_a_consistent_drop_and_rejects_unpaired_lists() {
        let base = corpus();
        let worse: Vec<DocScore> = base
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.counts.values_matched = d.counts.values_matched.saturating_sub(1);
                d
            })
            .collect();
        let diff = paired_diff(&base, &worse, Metric::Combined, 500, 1).unwrap();
        assert!(diff.value < 0.0);
        assert!(diff.ci95_high < 0.0, "{diff:?}");
        let same = paired_diff(&base, &base, Metric::Combined, 500, 1).unwrap();
        assert_eq!((same.value, same.ci95_low, same.ci95_high), (0.0, 0.0, 0.0));
        assert!(matches!(
            paired_diff(&base, &base[1..], Metric::Combined, 10, 1),
            Err(ScoreError::Unpaired { .. })
        ));
    }
}
