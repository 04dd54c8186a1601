//! evaluate: scores each model variant (`base`, `nf4`, `nf4+adapter`) on the test split and
//! the five fixed evaluation documents, with the same prompts and greedy batched generation.
//!
//! Writes `reports/predictions/<variant>.jsonl` (one line per document: the raw answer, how
//! it parsed, its counts and timing, so every figure traces back to outputs) and the
//! artifact `reports/evaluation.json`, whose `metrics` is exactly
//! [`crate::report::inputs::EvaluationMetrics`] (the layout the report reads).
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bench::memory::{rss_bytes, DeviceWatch, MemorySampler};
use crate::data::eval_docs;
use crate::data::sample::Sample;
use crate::device::{run_on, BackendJob, DeviceMemory, Target};
use crate::fs::write_atomic_with;
use crate::kernels::Kernels;
use crate::metrics::answer::Item;
use crate::metrics::extraction::{
    paired_diff, score_document, score_report, Comparison, DocScore, Metric,
};
use crate::metrics::stats::summarize_ms;
use crate::model::generate::{GenerateConfig, Request, Sampling};
use crate::model::loader::{load_model, EncodedPrompt, InputEncoder, LoadedModel};
use crate::model::prompt::PromptBuilder;
use crate::pipeline::{Stage, StageCtx, StageOutput};
use crate::report::inputs::{
    EvaluationMetrics, GenerationSettings, Performance, VariantEvaluation, VariantNotRun,
};

/// Bumped when this stage's output for the same inputs changes.
const CODE_VERSION: u32 = 1;
/// Where the quantize stage writes the NF4 checkpoint when its artifact names none.
const DEFAULT_NF4_DIR: &str = "checkpoints/nf4";
/// Where the train stage writes the PEFT adapter when its artifact names none.
const DEFAULT_ADAPTER_DIR: &str = "checkpoints/adapter";
/// RSS sampling period while generating.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
/// Stages that provide variants besides `base`; optional upstream when registered.
const VARIANT_STAGES: [&str; 2] = ["quantize", "train"];

/// `[evaluate]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Score the base model as downloaded.
    #[serde(default = "yes")]
    pub base: bool,
    /// Score the NF4 checkpoint (needs a completed `quantize`).
    #[serde(default = "yes")]
    pub nf4: bool,
    /// Score NF4 + the trained adapter (needs completed `quantize` and `train`).
    #[serde(default = "yes")]
    pub adapter: bool,
    /// Requests per `generate` call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// New tokens at most per answer.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Test-split documents scored, in split order; 0 = all.
    #[serde(default)]
    pub max_documents: usize,
    /// Also score the five fixed evaluation documents.
    #[serde(default = "yes")]
    pub eval_documents: bool,
    /// Bootstrap resamples behind every 95% interval.
    #[serde(default = "default_resamples")]
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap.
    #[serde(default)]
    pub bootstrap_seed: u64,
    /// Complete the stage when an enabled variant fails to load or generate, keeping the
    /// others' scores (the failure is listed in `not_run` and warned about). Off: a failed
    /// variant fails the stage.
    #[serde(default)]
    pub allow_partial: bool,
}

fn yes() -> bool {
    true
}
fn default_batch_size() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_resamples() -> usize {
    1000
}

impl EvaluateConfig {
    /// Checks `[evaluate]` (`max_new_tokens = 0` used to surface only after training).
    ///
    /// # Errors
    /// `batch_size` or `max_new_tokens` of 0.
    pub fn validate(&self) -> Result<(), crate::config::InvalidValue> {
        use crate::config::at_least_one;
        at_least_one("evaluate.batch_size", self.batch_size as u64)?;
        at_least_one("evaluate.max_new_tokens", self.max_new_tokens as u64)
    }
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self {
            base: true,
            nf4: true,
            adapter: true,
            batch_size: default_batch_size(),
            max_new_tokens: default_max_new_tokens(),
            max_documents: 0,
            eval_documents: true,
            bootstrap_resamples: default_resamples(),
            bootstrap_seed: 0,
            allow_partial: false,
        }
    }
}

/// The three variants, in evaluation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The model as downloaded.
    Base,
    /// The NF4-quantized checkpoint.
    Nf4,
    /// NF4 with the trained LoRA adapter.
    Nf4Adapter,
}

impl Variant {
    /// All variants, in evaluation order.
    pub const ALL: [Variant; 3] = [Variant::Base, Variant::Nf4, Variant::Nf4Adapter];

    /// Name in the artifact and the predictions file.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Nf4 => "nf4",
            Variant::Nf4Adapter => "nf4+adapter",
        }
    }

    /// File-name-safe name (`nf4+adapter` → `nf4_adapter`).
    fn file_stem(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::Nf4 => "nf4",
            Variant::Nf4Adapter => "nf4_adapter",
        }
    }

    fn enabled(self, cfg: &EvaluateConfig) -> (bool, &'static str) {
        match self {
            Variant::Base => (cfg.base, "evaluate.base"),
            Variant::Nf4 => (cfg.nf4, "evaluate.nf4"),
            Variant::Nf4Adapter => (cfg.adapter, "evaluate.adapter"),
        }
    }

    /// Upstream stages whose completed artifacts the variant needs.
    fn needs(self) -> &'static [&'static str] {
        match self {
            Variant::Base => &["download"],
            Variant::Nf4 => &["download", "quantize"],
            Variant::Nf4Adapter => &["download", "quantize", "train"],
        }
    }
}

/// Where a variant's weights are.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSource {
    /// Checkpoint directory (HF layout, or the quantize stage's NF4 layout).
    pub model_dir: PathBuf,
    /// PEFT adapter directory to attach, for `nf4+adapter`.
    pub adapter_dir: Option<PathBuf>,
}

/// One variant's plan: where it loads from, or why it does not run.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantPlan {
    pub variant: Variant,
    pub source: Result<VariantSource, String>,
}

/// What the planner knows about upstream stages.
pub struct UpstreamView<'a> {
    /// Stages built into this medpipe (the registry).
    pub registered: &'a [&'static str],
    /// `metrics` of a stage's completed artifact; `None` when it has not completed.
    pub completed: &'a dyn Fn(&str) -> Option<&'a Value>,
    /// Resolves a workspace-relative path.
    pub resolve: &'a dyn Fn(&str) -> PathBuf,
}

/// Decides, for every variant, where it loads from or why it is not run (pure bookkeeping;
/// no file is read).
pub fn plan_variants(cfg: &EvaluateConfig, up: &UpstreamView<'_>) -> Vec<VariantPlan> {
    Variant::ALL
        .iter()
        .map(|&variant| VariantPlan {
            variant,
            source: plan_one(variant, cfg, up),
        })
        .collect()
}

fn plan_one(
    variant: Variant,
    cfg: &EvaluateConfig,
    up: &UpstreamView<'_>,
) -> Result<VariantSource, String> {
    let (on, key) = variant.enabled(cfg);
    if !on {
        return Err(format!("disabled in config ({key} = false)"));
    }
    for stage in variant.needs() {
        if *stage != "download" && !up.registered.contains(stage) {
            return Err(format!(
                "stage `{stage}` is not built into this medpipe, so there is no {} to evaluate",
                match *stage {
                    "quantize" => "NF4 checkpoint",
                    _ => "trained adapter",
                }
            ));
        }
        if (up.completed)(stage).is_none() {
            return Err(format!(
                "stage `{stage}` has not completed (run `medpipe run --to {stage}` first)"
            ));
        }
    }
    let dir_from = |stage: &str, key: &str, default: &str| -> PathBuf {
        let rel = (up.completed)(stage)
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string();
        (up.resolve)(&rel)
    };
    let base_dir = || -> Result<PathBuf, String> {
        (up.completed)("download")
            .and_then(|m| m.get("model_dir"))
            .and_then(|v| v.as_str())
            .map(|s| (up.resolve)(s))
            .ok_or_else(|| "download.json has no `metrics.model_dir`".to_string())
    };
    match variant {
        Variant::Base => Ok(VariantSource {
            model_dir: base_dir()?,
            adapter_dir: None,
        }),
        Variant::Nf4 => Ok(VariantSource {
            model_dir: dir_from("quantize", "output_dir", DEFAULT_NF4_DIR),
            adapter_dir: None,
        }),
        Variant::Nf4Adapter => Ok(VariantSource {
            model_dir: dir_from("quantize", "output_dir", DEFAULT_NF4_DIR),
            adapter_dir: Some(dir_from("train", "adapter_dir", DEFAULT_ADAPTER_DIR)),
        }),
    }
}

/// Loads one variant's model (timed): the checkpoint, then (for `nf4+adapter`) its adapter.
///
/// # Errors
/// Checkpoint load errors naming the directory; an adapter that does not read or fit,
/// naming its directory.
pub fn load_variant<B: Kernels>(
    source: &VariantSource,
    device: &B::Device,
) -> anyhow::Result<LoadedModel<B>> {
    load_model::<B>(&source.model_dir, source.adapter_dir.as_deref(), device)
        .with_context(|| format!("loading the model from {}", source.model_dir.display()))
}

/// One document to score.
#[derive(Debug, Clone)]
struct EvalDoc {
    sample: Sample,
    /// `test` or `eval`.
    set: &'static str,
    /// Prompt tokens and preprocessed page.
    encoded: EncodedPrompt,
}

/// One line of `reports/predictions/<variant>.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictionRecord {
    pub variant: String,
    pub id: String,
    /// `test` (test split) or `eval` (fixed evaluation documents).
    pub set: String,
    pub source: String,
    pub doc_type: String,
    /// The model's answer, decoded without special tokens.
    pub prediction: String,
    /// The expected answer.
    pub target: String,
    /// Score of this document (parse status and counts).
    pub score: DocScore,
    /// Tokens generated (incl. the end token when one was produced).
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    pub stopped_on_eos: bool,
    /// Wall time of the batch this document ran in (prefill + decode), ms.
    pub latency_ms: f64,
    /// Prefill (incl. vision tower and first token) of its batch, ms.
    pub first_token_ms: f64,
    /// Index of its batch.
    pub batch: usize,
}

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
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn description(&self) -> &'static str {
        "score base / NF4 / NF4+adapter on the test split and eval documents (accuracy, P/R/F1, latency, memory)"
    }
    fn artifact_file(&self) -> &'static str {
        "evaluation.json"
    }
    fn upstream(&self) -> &'static [&'static str] {
        &["probe", "download", "prepare"]
    }
    fn optional_upstream(&self) -> &[&'static str] {
        &self.optional
    }
    fn config_sections(&self) -> Vec<&'static str> {
        // The device comes from the probe (an upstream): resolved once, hashed there.
        vec!["evaluate"]
    }
    fn code_version(&self) -> u32 {
        CODE_VERSION
    }

    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let cfg = ctx.config().evaluate.clone();
        if cfg.batch_size == 0 {
            bail!("evaluate.batch_size must be at least 1");
        }
        if cfg.max_new_tokens == 0 {
            bail!("evaluate.max_new_tokens must be at least 1");
        }
        let completed = |s: &str| ctx.upstream(s).ok().map(|a| &a.metrics);
        let root = ctx.workspace().root().to_path_buf();
        let resolve = |p: &str| root.join(p);
        let plans = plan_variants(
            &cfg,
            &UpstreamView {
                registered: &self.registered,
                completed: &completed,
                resolve: &resolve,
            },
        );
        let base_dir = ctx
            .upstream("download")?
            .metrics
            .get("model_dir")
            .and_then(|v| v.as_str())
            .map(|s| root.join(s))
            .context("download.json has no `metrics.model_dir`")?;
        let prepare = ctx.upstream("prepare")?.metrics.clone();
        // Every variant shares the base checkpoint's tokenizer, chat template and processor.
        let encoder = InputEncoder::from_dir(&base_dir)?;
        let docs = load_documents(ctx, &cfg, &encoder, &prepare)?;
        let device = ctx.device()?;
        struct Job<'a, 'c> {
            ctx: &'a StageCtx<'c>,
            cfg: &'a EvaluateConfig,
            plans: &'a [VariantPlan],
            docs: &'a [EvalDoc],
            prompts: &'a PromptBuilder,
        }
        impl BackendJob for Job<'_, '_> {
            type Output = anyhow::Result<Outcome>;
            fn run<B: Kernels>(self, device: B::Device, target: Target) -> Self::Output {
                evaluate_all::<B>(
                    self.ctx,
                    self.cfg,
                    self.plans,
                    self.docs,
                    self.prompts,
                    &device,
                    target,
                )
            }
        }
        let outcome = run_on(
            device,
            Job {
                ctx,
                cfg: &cfg,
                plans: &plans,
                docs: &docs,
                prompts: encoder.prompts(),
            },
        )??;
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

struct Scored {
    eval: VariantEvaluation,
    docs: Vec<DocScore>,
}

struct Outcome {
    scored: Vec<Scored>,
    not_run: Vec<VariantNotRun>,
    comparisons: Vec<Comparison>,
    warnings: Vec<String>,
    outputs: Vec<PathBuf>,
}

fn evaluate_all<B: Kernels>(
    ctx: &StageCtx<'_>,
    cfg: &EvaluateConfig,
    plans: &[VariantPlan],
    docs: &[EvalDoc],
    prompts: &PromptBuilder,
    device: &B::Device,
    target: Target,
) -> anyhow::Result<Outcome> {
    let pred_dir = ctx.workspace().reports().join("predictions");
    let mut out = Outcome {
        scored: Vec::new(),
        not_run: Vec::new(),
        comparisons: Vec::new(),
        warnings: Vec::new(),
        outputs: Vec::new(),
    };
    for plan in plans {
        let name = plan.variant.name();
        let source = match &plan.source {
            Ok(s) => s,
            Err(reason) => {
                remove_stale(&pred_dir.join(format!("{}.jsonl", plan.variant.file_stem())));
                tracing::info!(variant = name, %reason, "variant not run");
                out.not_run.push(VariantNotRun {
                    name: name.into(),
                    status: "not_run".into(),
                    reason: reason.clone(),
                });
                continue;
            }
        };
        let path = pred_dir.join(format!("{}.jsonl", plan.variant.file_stem()));
        // Predictions of an earlier run of this variant must not outlive its scores.
        remove_stale(&path);
        match run_variant::<B>(
            ctx,
            cfg,
            plan.variant,
            source,
            docs,
            prompts,
            &path,
            device,
            target,
        ) {
            Ok(s) => {
                out.outputs.push(path);
                out.scored.push(s);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                out.warnings
                    .push(format!("variant `{name}` failed: {reason}"));
                out.not_run.push(VariantNotRun {
                    name: name.into(),
                    status: "failed".into(),
                    reason,
                });
            }
        }
    }
    let lists: Vec<(String, Vec<DocScore>)> = out
        .scored
        .iter()
        .map(|s| (s.eval.name.clone(), s.docs.clone()))
        .collect();
    out.comparisons = compare_variants(&lists, cfg.bootstrap_resamples, cfg.bootstrap_seed)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run_variant<B: Kernels>(
    ctx: &StageCtx<'_>,
    cfg: &EvaluateConfig,
    variant: Variant,
    source: &VariantSource,
    docs: &[EvalDoc],
    prompts: &PromptBuilder,
    pred_path: &Path,
    device: &B::Device,
    target: Target,
) -> anyhow::Result<Scored> {
    let name = variant.name();
    // A GPU's pools start from what this variant needs, not the previous variant's.
    B::memory_cleanup(device);
    let mut watch = DeviceWatch::new(DeviceMemory::for_device(target.device));
    // RSS is sampled from before the load, so the variant's own growth can be told apart.
    let rss_before = rss_bytes().map(|(now, _)| now);
    let load_sampler = MemorySampler::start(MEMORY_SAMPLE_INTERVAL);
    let loaded = load_variant::<B>(source, device)?;
    let (model, load_time_s) = (loaded.model, loaded.load_ms / 1e3);
    let rss_after_load = rss_bytes().map(|(now, _)| now);
    let load_peak = load_sampler.finish().iter().map(|s| s.rss_bytes).max();
    let weights_resident = model.resident_weight_bytes();
    watch.after_call();
    let gen_cfg = GenerateConfig {
        max_new_tokens: cfg.max_new_tokens,
        sampling: Sampling::Greedy,
        seed: 0,
        eos_token_ids: None,
    };
    let bar = ctx.progress_bar(docs.len() as u64, format!("evaluate {name}"));
    let sampler = MemorySampler::start_with(MEMORY_SAMPLE_INTERVAL, watch.sampled());
    let mut records = Vec::with_capacity(docs.len());
    let mut decode_tokens = 0usize;
    let mut decode_ms = 0.0f64;
    for (b, chunk) in docs.chunks(cfg.batch_size).enumerate() {
        let requests: Vec<Request<B>> = chunk.iter().map(|d| d.encoded.request(device)).collect();
        let gens = model
            .generate(&requests, &gen_cfg, device)
            .with_context(|| format!("generating batch {b} of `{name}`"))?;
        watch.after_call();
        if let Some(g) = gens.first() {
            decode_ms += g.decode_ms;
        }
        for (d, g) in chunk.iter().zip(gens) {
            decode_tokens += g.tokens.len().saturating_sub(1);
            let prediction = prompts
                .decode(&g.tokens)
                .with_context(|| format!("decoding the answer to {}", d.sample.id))?;
            let gt: Vec<Item> = d.sample.ground_truth.iter().map(to_metric_item).collect();
            let score = score_document(
                &d.sample.id,
                &d.sample.doc_type,
                &d.sample.source,
                &gt,
                &prediction,
            );
            records.push(PredictionRecord {
                variant: name.into(),
                id: d.sample.id.clone(),
                set: d.set.into(),
                source: d.sample.source.clone(),
                doc_type: d.sample.doc_type.clone(),
                prediction,
                target: d.sample.target.clone(),
                score,
                generated_tokens: g.tokens.len(),
                prompt_tokens: g.prompt_tokens,
                stopped_on_eos: g.stopped_on_eos,
                latency_ms: g.prefill_ms + g.decode_ms,
                first_token_ms: g.prefill_ms,
                batch: b,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let samples = sampler.finish();
    let rss_peak = samples
        .iter()
        .map(|s| s.rss_bytes)
        .chain(load_peak)
        .chain(rss_after_load)
        .max();
    let device_peak = samples.iter().filter_map(|s| s.device_used_bytes).max();
    let rss_delta = rss_before
        .zip(rss_peak)
        .map(|(before, peak)| peak.saturating_sub(before));
    let own_rss = Some(rss_delta.unwrap_or(0).max(weights_resident));
    let peak = watch.peak_memory_bytes(device_peak, own_rss);
    write_predictions(pred_path, &records)?;

    let scores: Vec<DocScore> = records.iter().map(|r| r.score.clone()).collect();
    let latencies: Vec<f64> = records.iter().map(|r| r.latency_ms).collect();
    let firsts: Vec<f64> = records.iter().map(|r| r.first_token_ms).collect();
    let performance = Performance {
        load_time_s: Some(load_time_s),
        weights_bytes: weights_bytes(&source.model_dir),
        peak_memory_bytes: peak,
        weights_resident_bytes: Some(weights_resident),
        rss_delta_bytes: rss_delta,
        latency_ms: summarize_ms(&latencies).ok(),
        first_token_ms: summarize_ms(&firsts).ok(),
        tokens_per_s: (decode_ms > 0.0).then(|| decode_tokens as f64 / (decode_ms / 1e3)),
        documents: Some(records.len()),
        warmup_runs: Some(0),
    };
    tracing::info!(variant = name, docs = records.len(), "variant scored");
    Ok(Scored {
        eval: VariantEvaluation {
            name: name.into(),
            scores: score_report(&scores, cfg.bootstrap_resamples, cfg.bootstrap_seed),
            performance,
            rss_after_load_bytes: rss_after_load,
            model_dir: Some(
                ctx.workspace()
                    .relative(&source.model_dir)
                    .display()
                    .to_string(),
            ),
            predictions_path: Some(ctx.workspace().relative(pred_path).display().to_string()),
        },
        docs: scores,
    })
}

/// Removes an old predictions file, if any (a missing file is the normal case).
fn remove_stale(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed stale predictions"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove stale predictions")
        }
    }
}

/// Ground-truth item in the scorer's form (empty unit → none).
fn to_metric_item(i: &crate::data::document::Item) -> Item {
    Item {
        term: i.term.clone(),
        value: i.value.clone(),
        unit: (!i.unit.is_empty()).then(|| i.unit.clone()),
        category: (!i.category.is_empty()).then(|| i.category.clone()),
    }
}

/// Sum of `*.safetensors` sizes in `dir`, bytes.
fn weights_bytes(dir: &Path) -> Option<u64> {
    let total: u64 = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    (total > 0).then_some(total)
}

fn write_predictions(path: &Path, records: &[PredictionRecord]) -> anyhow::Result<()> {
    use std::io::Write;
    write_atomic_with(path, |w| {
        for r in records {
            serde_json::to_writer(&mut *w, r).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The documents every variant sees: the test split (first `max_documents`), then the
/// evaluation documents, each with its prompt tokens and preprocessed image.
fn load_documents(
    ctx: &StageCtx<'_>,
    cfg: &EvaluateConfig,
    encoder: &InputEncoder,
    prepare: &serde_json::Value,
) -> anyhow::Result<Vec<EvalDoc>> {
    let test_rel = prepare
        .pointer("/splits/test/path")
        .and_then(|v| v.as_str())
        .unwrap_or("data/splits/test.jsonl");
    let mut test = read_samples(&ctx.path(test_rel))?;
    if cfg.max_documents > 0 {
        test.truncate(cfg.max_documents);
    }
    let mut rows: Vec<(Sample, &'static str)> = test.into_iter().map(|s| (s, "test")).collect();
    if cfg.eval_documents {
        let eval_rel = prepare
            .pointer("/eval/path")
            .and_then(|v| v.as_str())
            .unwrap_or("data/eval/eval.jsonl");
        for s in read_samples(&ctx.path(eval_rel))? {
            debug_assert_eq!(s.source, eval_docs::SOURCE);
            rows.push((s, "eval"));
        }
    }
    rows.into_iter()
        .map(|(sample, set)| {
            let img = ctx.path(&sample.image);
            let encoded = encoder
                .encode(&[img.clone().into()], &sample.prompt)
                .with_context(|| format!("encoding {} ({})", img.display(), sample.id))?;
            Ok(EvalDoc {
                sample,
                set,
                encoded,
            })
        })
        .collect()
}

fn read_samples(path: &Path) -> anyhow::Result<Vec<Sample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a sample row", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::metrics::answer::ParseStatus;
    use crate::test_util::{fixture, TB};

    /// Bootstrap resamples in tests: enough for stable percentiles on a handful of documents.
    const RESAMPLES: usize = 500;

    struct Up {
        registered: Vec<&'static str>,
        completed: BTreeMap<&'static str, Value>,
    }

    impl Up {
        fn new(registered: &[&'static str], completed: &[&'static str]) -> Self {
            let completed = completed
                .iter()
                .map(|&s| {
                    let m = match s {
                        "download" => json!({"model_dir": "/models/base"}),
                        _ => json!({}),
                    };
                    (s, m)
                })
                .collect();
            Self {
                registered: registered.to_vec(),
                completed,
            }
        }

        fn plan(&self, cfg: &EvaluateConfig) -> Vec<VariantPlan> {
            let completed = |s: &str| self.completed.get(s);
            let resolve = |p: &str| Path::new("/ws").join(p);
            plan_variants(
                cfg,
                &UpstreamView {
                    registered: &self.registered,
                    completed: &completed,
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
        up.completed
            .insert("quantize", json!({"output_dir": "ckpt/q"}));
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
        assert_eq!(cfg.evaluate, EvaluateConfig::default());
    }
}
