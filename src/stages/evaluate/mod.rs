//! evaluate: scores each model variant (`base`, `nf4`, `nf4+adapter`) on the test split and
//! the five fixed evaluation documents, with the same prompts and greedy batched generation.
//!
//! Writes `reports/predictions/<variant>.jsonl` (one line per document: the raw answer, how
//! it parsed, its counts and timing, so every figure traces back to outputs) and the
//! artifact `reports/evaluation.json`, whose `metrics` is exactly
//! [`metrics::EvaluationMetrics`] (the layout the report reads).
//!
//! Variants come from upstream artifacts: `base` from the download stage's `model_dir`,
//! `nf4` from the quantize stage's checkpoint, `nf4+adapter` from that checkpoint plus the
//! train stage's adapter. A variant that is disabled in `[evaluate]`, or whose upstream stage
//! is not built into this medpipe or has not completed, is listed in `not_run` with the reason.
//! One that was asked for and fails to load or generate fails the stage, unless
//! `evaluate.allow_partial` is set: then it is listed there as `failed` with the error and
//! warned about. Nothing is ever filled in for a variant that did not run.
//!
//! Scoring is `crate::metrics::extraction` (answers parsed leniently: code fences and
//! trailing prose are tolerated, unparseable answers counted and scored as no items), with
//! 95% bootstrap intervals, and paired-bootstrap differences of each variant against `base`.
//! A candidate worse than its baseline beyond the interval is listed in `regressions` and
//! raised as a warning.
//!
//! Variants run on `probe.device` (the probe's rule, `crate::device::resolve`): NdArray f32
//! on the CPU, burn's Cuda backend on a GPU in a `--features cuda` build; models load
//! through `crate::model::loader`, as the benchmark loads them.
//!
//! - `plan`: the `[evaluate]` section, which variants run (or why not), the documents
//! - `run`: loading, generating for and scoring one variant, and its predictions file

pub mod metrics;
mod plan;
mod run;

pub use plan::{plan_variants, EvaluateConfig, UpstreamView, Variant, VariantPlan, VariantSource};
pub use run::{load_variant, PredictionRecord};

use anyhow::{bail, Context};

use crate::metrics::extraction::{paired_diff, Comparison, DocScore, Metric};
use crate::model::loader::InputEncoder;
use crate::pipeline::{Stage, StageCtx, StageOutput};
use crate::stages::download::Download;
use crate::stages::prepare::Prepare;
use crate::stages::quantize::Quantize;
use crate::stages::train::Train;
use metrics::{EvaluationMetrics, GenerationSettings, VariantNotRun};
use plan::{load_documents, VARIANT_STAGES};
use run::evaluate_on;

/// Bumped when this stage's output for the same inputs changes.
const CODE_VERSION: u32 = 1;

/// The evaluate stage. `registered` lists the stages before it, to know which variant
/// stages exist in this build.
pub struct Evaluate {
    optional: Vec<&'static str>,
    registered: Vec<&'static str>,
}

impl Evaluate {
    /// An evaluate stage registered after `earlier` (registry order): those of the variant
    /// stages (`quantize`, `train`) among them become optional upstream.
    pub fn new(earlier: &[&'static str]) -> Self {
        Self {
            optional: VARIANT_STAGES
                .iter()
                .copied()
                .filter(|s| earlier.contains(s))
                .collect(),
            registered: earlier.to_vec(),
        }
    }
}

impl Stage for Evaluate {
    const NAME: &'static str = "evaluate";
    type Config = EvaluateConfig;
    type Metrics = metrics::EvaluationMetrics;

    fn description(&self) -> &'static str {
        "score base / NF4 / NF4+adapter on the test split and eval documents (accuracy, P/R/F1, latency, memory)"
    }
    fn artifact_file(&self) -> &'static str {
        "evaluation.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe", "download", "prepare"]
    }
    fn optional_upstream(&self) -> &[&'static str] {
        &self.optional
    }
    /// The image bounds change what a model stage measures; `[model] source` reaches it
    /// through the download stage, and `memory_limit_mib` only decides whether it runs.
    fn shared_sections(&self) -> &[&'static str] {
        &["model.max_pixels", "model.min_pixels", "model.dtype"]
    }
    fn code_version(&self) -> u32 {
        CODE_VERSION
    }

    fn run(&self, cfg: &EvaluateConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let cfg = cfg.clone();
        if cfg.batch_size == 0 {
            bail!("evaluate.batch_size must be at least 1");
        }
        if cfg.max_new_tokens == 0 {
            bail!("evaluate.max_new_tokens must be at least 1");
        }
        // Typed as each stage declares its metrics; `None` when not completed.
        let download = ctx.upstream_metrics::<Download>()?;
        let quantize = ctx.completed_metrics::<Quantize>()?;
        let train = ctx.completed_metrics::<Train>()?;
        let root = ctx.workspace().root().to_path_buf();
        let resolve = |p: &str| root.join(p);
        let plans = plan_variants(
            &cfg,
            &UpstreamView {
                registered: &self.registered,
                download: Some(download.clone()),
                quantize,
                train,
                resolve: &resolve,
            },
        );
        let base_dir = crate::stages::download::model_dir(ctx, &download)?;
        let prepare = ctx.upstream_metrics::<Prepare>()?;
        // Every variant shares the base checkpoint's tokenizer, chat template and processor.
        let device = super::probe::device(ctx)?;
        let admitted =
            crate::stages::memory::ensure_fits(Self::NAME, ctx.settings(), &base_dir, device)?;
        let model = &admitted.model;
        let encoder = InputEncoder::from_dir(&base_dir)?
            .with_pixel_bounds(model.min_pixels, model.max_pixels)?;
        let docs = load_documents(ctx, &cfg, &encoder, &prepare)?;
        let on = (device, admitted.precision);
        let outcome = evaluate_on(on, ctx, &cfg, &plans, &docs, encoder.prompts())?;
        let failed: Vec<&VariantNotRun> = outcome
            .not_run
            .iter()
            .filter(|n| n.status == "failed")
            .collect();
        if !failed.is_empty() && !cfg.allow_partial {
            let list: Vec<String> = failed
                .iter()
                .map(|n| format!("variant `{}` failed: {}", n.name, n.reason))
                .collect();
            bail!(
                "{}; set evaluate.allow_partial = true to keep the other variants' scores",
                list.join("; ")
            );
        }
        let n_test = docs.iter().filter(|d| d.set == "test").count();
        let metrics = EvaluationMetrics {
            test_documents: docs.len(),
            test_split_documents: n_test,
            eval_documents: docs.len() - n_test,
            generation: Some(GenerationSettings {
                sampling: "greedy".into(),
                max_new_tokens: cfg.max_new_tokens,
                batch_size: cfg.batch_size,
                device: device.to_string(),
            }),
            variants: outcome.scored.iter().map(|s| s.eval.clone()).collect(),
            comparisons: outcome.comparisons.clone(),
            regressions: regressions(&outcome.comparisons),
            not_run: outcome.not_run.clone(),
        };
        let mut warnings = outcome.warnings.clone();
        for r in &metrics.regressions {
            warnings.push(format!(
                "REGRESSION: `{}` is worse than `{}` on {} beyond the 95% interval: {:+.3} [{:.3}, {:.3}]",
                r.candidate, r.baseline, r.metric, r.diff.value, r.diff.ci95_low, r.diff.ci95_high
            ));
        }
        // First, every variant in one entry: the run table and `status` show the first few.
        let mut summary = vec![
            ("combined".to_string(), variants_line(&metrics)),
            ("documents".to_string(), docs.len().to_string()),
        ];
        for v in &metrics.variants {
            let o = &v.scores.overall;
            summary.push((
                format!("{} combined", v.name),
                format!(
                    "{:.3} [{:.3}, {:.3}], {} unparseable",
                    o.combined.value,
                    o.combined.ci95_low,
                    o.combined.ci95_high,
                    o.unparseable_answers
                ),
            ));
        }
        for n in &metrics.not_run {
            summary.push((n.name.clone(), n.status.clone()));
        }
        Ok(StageOutput {
            metrics: serde_json::to_value(&metrics).context("serializing evaluation metrics")?,
            outputs: outcome.outputs,
            summary,
            warnings,
        })
    }
}

/// Every variant in evaluation order with its combined score, or what became of it
/// (`base 0.412, nf4 0.398, nf4+adapter failed`).
pub fn variants_line(m: &EvaluationMetrics) -> String {
    Variant::ALL
        .iter()
        .map(|v| {
            let name = v.name();
            match m.variants.iter().find(|e| e.name == name) {
                Some(e) => format!("{name} {:.3}", e.scores.overall.combined.value),
                None => match m.not_run.iter().find(|n| n.name == name) {
                    Some(n) if n.status == "failed" => format!("{name} failed"),
                    _ => format!("{name} not run"),
                },
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Comparisons whose candidate is worse than the baseline beyond the 95% interval.
pub fn regressions(comparisons: &[Comparison]) -> Vec<Comparison> {
    comparisons
        .iter()
        .filter(|c| c.diff.ci95_high < 0.0)
        .cloned()
        .collect()
}

/// Paired comparisons of every scored candidate against `base` (combined and F1), and of
/// `nf4+adapter` against `nf4` (combined): the adapter's effect with quantization held fixed.
///
/// # Errors
/// When two score lists cover different documents (a bug: every variant sees the same list).
pub fn compare_variants(
    scored: &[(String, Vec<DocScore>)],
    resamples: usize,
    seed: u64,
) -> anyhow::Result<Vec<Comparison>> {
    let find = |n: &str| scored.iter().find(|(name, _)| name == n).map(|(_, d)| d);
    let mut pairs: Vec<(&str, &str, Metric, &str)> = Vec::new();
    for cand in ["nf4", "nf4+adapter"] {
        pairs.push(("base", cand, Metric::Combined, "combined"));
        pairs.push(("base", cand, Metric::F1, "f1"));
    }
    pairs.push(("nf4", "nf4+adapter", Metric::Combined, "combined"));
    let mut out = Vec::new();
    for (b, c, metric, label) in pairs {
        let (Some(bd), Some(cd)) = (find(b), find(c)) else {
            continue;
        };
        let diff = paired_diff(bd, cd, metric, resamples, seed)
            .with_context(|| format!("comparing `{c}` with `{b}`"))?;
        out.push(Comparison {
            baseline: b.into(),
            candidate: c.into(),
            metric: label.into(),
            diff,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    use std::path::{Path, PathBuf};

    use super::run::to_metric_item;
    use super::*;
    use crate::metrics::answer::{Item, ParseStatus};
    use crate::metrics::extraction::{score_document, score_report};
    use crate::test_util::{fixture, TB};

    /// Bootstrap resamples in tests: enough for stable percentiles on a handful of documents.
    const RESAMPLES: usize = 500;

    struct Up {
        registered: Vec<&'static str>,
        download: Option<crate::stages::download::DownloadMetrics>,
        quantize: Option<crate::stages::quantize::QuantizeMetrics>,
        train: Option<crate::stages::train::TrainingMetrics>,
    }

    impl Up {
        /// Upstream with `registered` stages, of which `completed` have completed (download
        /// recording its model in `/models/base`, the others their defaults).
        fn new(registered: &[&'static str], completed: &[&'static str]) -> Self {
            let done = |s: &str| completed.contains(&s);
            Self {
                registered: registered.to_vec(),
                download: done("download").then(|| crate::stages::download::DownloadMetrics {
                    model_dir: "/models/base".into(),
                    ..Default::default()
                }),
                quantize: done("quantize").then(Default::default),
                train: done("train").then(Default::default),
            }
        }

        fn plan(&self, cfg: &EvaluateConfig) -> Vec<VariantPlan> {
            let resolve = |p: &str| Path::new("/ws").join(p);
            plan_variants(
                cfg,
                &UpstreamView {
                    registered: &self.registered,
                    download: self.download.clone(),
                    quantize: self.quantize.clone(),
                    train: self.train.clone(),
                    resolve: &resolve,
                },
            )
        }
    }

    fn reason(plans: &[VariantPlan], v: Variant) -> String {
        let p = plans.iter().find(|p| p.variant == v).unwrap();
        p.source.clone().unwrap_err()
    }

    #[test]
    fn without_quantize_and_train_stages_only_base_runs_and_the_others_say_why() {
        let up = Up::new(&["probe", "download", "prepare"], &["download", "prepare"]);
        let plans = up.plan(&EvaluateConfig::default());
        assert_eq!(
            plans.iter().map(|p| p.variant).collect::<Vec<_>>(),
            Variant::ALL.to_vec()
        );
        assert_eq!(
            plans[0].source,
            Ok(VariantSource {
                model_dir: PathBuf::from("/models/base"),
                adapter_dir: None
            })
        );
        assert!(reason(&plans, Variant::Nf4).contains("`quantize` is not built"));
        assert!(reason(&plans, Variant::Nf4Adapter).contains("`quantize` is not built"));
    }

    #[test]
    fn a_registered_stage_that_has_not_completed_is_named_in_the_reason() {
        let reg = ["probe", "download", "quantize", "prepare", "train"];
        let up = Up::new(&reg, &["download", "prepare", "quantize"]);
        let plans = up.plan(&EvaluateConfig::default());
        assert_eq!(
            plans[1].source,
            Ok(VariantSource {
                model_dir: PathBuf::from("/ws/checkpoints/nf4"),
                adapter_dir: None
            })
        );
        assert!(reason(&plans, Variant::Nf4Adapter).contains("stage `train` has not completed"));
    }

    #[test]
    fn with_every_upstream_the_adapter_variant_loads_nf4_plus_the_adapter_directory() {
        let reg = ["probe", "download", "quantize", "prepare", "train"];
        let mut up = Up::new(&reg, &["download", "prepare", "quantize", "train"]);
        up.quantize.as_mut().unwrap().output_dir = Some("ckpt/q".into());
        let plans = up.plan(&EvaluateConfig::default());
        assert_eq!(
            plans[2].source,
            Ok(VariantSource {
                model_dir: PathBuf::from("/ws/ckpt/q"),
                adapter_dir: Some(PathBuf::from("/ws/checkpoints/adapter")),
            })
        );
    }

    #[test]
    fn a_disabled_variant_names_its_config_key() {
        let up = Up::new(&["download", "prepare"], &["download", "prepare"]);
        let cfg = EvaluateConfig {
            base: false,
            ..EvaluateConfig::default()
        };
        assert_eq!(
            reason(&up.plan(&cfg), Variant::Base),
            "disabled in config (evaluate.base = false)"
        );
    }

    #[test]
    fn optional_upstream_lists_only_the_variant_stages_that_are_registered() {
        let e = Evaluate::new(&["probe", "download", "prepare"]);
        assert!(e.optional_upstream().is_empty());
        let e = Evaluate::new(&["probe", "download", "quantize", "prepare", "train"]);
        assert_eq!(e.optional_upstream(), &["quantize", "train"]);
    }

    #[test]
    fn an_adapter_variant_loads_the_peft_adapter_and_changes_the_model() {
        let src = VariantSource {
            model_dir: fixture("qwen2_5_vl_tiny"),
            adapter_dir: Some(fixture("qwen2_5_vl_tiny/lora")),
        };
        let adapted = load_variant::<TB>(&src, &Default::default()).unwrap().model;
        let base = VariantSource {
            adapter_dir: None,
            ..src.clone()
        };
        let base = load_variant::<TB>(&base, &Default::default())
            .unwrap()
            .model;
        let ids = vec![vec![1u32, 2, 3]];
        let dev = Default::default();
        let a = adapted.forward(&ids, None, None, &dev).unwrap().logits;
        let b = base.forward(&ids, None, None, &dev).unwrap().logits;
        let diff = (a - b).abs().max().into_scalar();
        assert!(
            diff > 1e-3,
            "the adapter must change the logits (max diff {diff})"
        );
        let missing = VariantSource {
            adapter_dir: Some(fixture("qwen2_5_vl_tiny/nf4")),
            ..src
        };
        let err = load_variant::<TB>(&missing, &Default::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("adapter_config.json"),
            "{err:#}"
        );
    }

    fn gt() -> Vec<crate::data::document::Item> {
        vec![
            crate::data::document::Item::new("Sodium", "138", "mmol/L", "lab"),
            crate::data::document::Item::new("Heart rate", "72", "bpm", "vital"),
        ]
    }

    fn score(id: &str, answer: &str) -> DocScore {
        let gt: Vec<Item> = gt().iter().map(to_metric_item).collect();
        score_document(id, "lab_panel", "synthetic", &gt, answer)
    }

    const RIGHT: &str = r#"[{"term":"Sodium","value":"138","unit":"mmol/L"},{"term":"Heart rate","value":"72","unit":"bpm"}]"#;

    #[test]
    fn fenced_answers_with_trailing_text_are_recovered_and_scored() {
        let s = score("a", &format!("```json\n{RIGHT}\n```\nHope this helps."));
        assert_eq!(s.parse, ParseStatus::Recovered);
        assert_eq!(s.counts.terms_found, 2);
        assert_eq!(s.counts.values_matched, 2);
        assert_eq!(s.counts.pairs_matched, 2);
        let junk = score("b", "lergline III Opline");
        assert_eq!(junk.parse, ParseStatus::Unparseable);
        let r = score_report(&[s, junk], RESAMPLES, 0);
        assert_eq!(r.overall.unparseable_answers, 1);
        assert_eq!(r.overall.recovered_answers, 1);
        assert_eq!(r.overall.term_accuracy.value, 0.5);
        assert_eq!(r.overall.precision.value, 1.0);
    }

    #[test]
    fn ground_truth_without_a_unit_is_scored_as_having_none() {
        let i = to_metric_item(&crate::data::document::Item::new("Rhythm", "sinus", "", ""));
        assert_eq!(i.unit, None);
        assert_eq!(i.category, None);
    }

    fn docs(answers: &[&str]) -> Vec<DocScore> {
        answers
            .iter()
            .enumerate()
            .map(|(i, a)| score(&format!("d{i}"), a))
            .collect()
    }

    #[test]
    fn an_adapter_worse_than_base_beyond_the_interval_is_flagged_as_a_regression() {
        let base = docs(&[RIGHT; 12]);
        let adapter = docs(&["no json here"; 12]);
        let scored = vec![
            ("base".to_string(), base.clone()),
            ("nf4+adapter".to_string(), adapter),
        ];
        let cmp = compare_variants(&scored, RESAMPLES, 0).unwrap();
        assert_eq!(cmp.len(), 2, "combined and f1 vs base: {cmp:?}");
        let reg = regressions(&cmp);
        assert!(reg.iter().any(|c| c.candidate == "nf4+adapter"
            && c.baseline == "base"
            && c.metric == "combined"));
        assert_eq!(reg[0].diff.value, -1.0);

        let same = vec![
            ("base".to_string(), base.clone()),
            ("nf4".to_string(), base),
        ];
        let cmp = compare_variants(&same, RESAMPLES, 0).unwrap();
        assert!(regressions(&cmp).is_empty(), "{cmp:?}");
    }

    #[test]
    fn an_improvement_is_not_a_regression_and_nf4_plus_adapter_is_also_compared_with_nf4() {
        let bad = docs(&["{}"; 10]);
        let good = docs(&[RIGHT; 10]);
        let scored = vec![
            ("base".to_string(), bad.clone()),
            ("nf4".to_string(), bad),
            ("nf4+adapter".to_string(), good),
        ];
        let cmp = compare_variants(&scored, RESAMPLES, 0).unwrap();
        assert_eq!(cmp.len(), 5);
        assert!(cmp
            .iter()
            .any(|c| c.baseline == "nf4" && c.candidate == "nf4+adapter" && c.diff.value == 1.0));
        assert!(regressions(&cmp).is_empty());
    }

    #[test]
    fn unpaired_score_lists_are_an_error_naming_the_variants() {
        let scored = vec![
            ("base".to_string(), docs(&[RIGHT; 3])),
            ("nf4".to_string(), docs(&[RIGHT; 2])),
        ];
        let err = compare_variants(&scored, RESAMPLES, 0).unwrap_err();
        assert!(format!("{err:#}").contains("comparing `nf4` with `base`"));
    }

    #[test]
    fn evaluate_config_defaults_match_the_embedded_pipeline_file() {
        let cfg = crate::Config::load(None, &[]).unwrap();
        assert_eq!(
            cfg.section::<EvaluateConfig>("evaluate").unwrap(),
            EvaluateConfig::default()
        );
    }
}
