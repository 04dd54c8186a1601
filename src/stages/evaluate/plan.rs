//! Which variants evaluate runs and on what: the `[evaluate]` settings, the three variants,
//! where each loads from or why it is skipped (decided from upstream artifacts alone, without
//! reading a file), and the documents every variant is scored on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::data::eval_docs;
use crate::data::sample::Sample;
use crate::model::loader::{EncodedPrompt, InputEncoder};
use crate::pipeline::{Stage, StageCtx};
use crate::stages::download::{Download, DownloadMetrics};
use crate::stages::prepare::metrics::PrepareMetrics;
use crate::stages::quantize::{Quantize, QuantizeMetrics};
use crate::stages::train::{Train, TrainingMetrics};

/// Where the quantize stage writes the NF4 checkpoint when its artifact names none.
const DEFAULT_NF4_DIR: &str = "checkpoints/nf4";
/// Where the train stage writes the PEFT adapter when its artifact names none.
const DEFAULT_ADAPTER_DIR: &str = "checkpoints/adapter";
/// Stages that provide variants besides `base`; optional upstream when registered.
pub(super) const VARIANT_STAGES: [&str; 2] = [Quantize::NAME, Train::NAME];

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

impl crate::pipeline::SectionConfig for EvaluateConfig {
    /// Checks `[evaluate]` (`max_new_tokens = 0` used to surface only after training).
    ///
    /// # Errors
    /// `batch_size` or `max_new_tokens` of 0.
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::at_least_one;
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
    pub(super) fn file_stem(self) -> &'static str {
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
            Variant::Base => &[Download::NAME],
            Variant::Nf4 => &[Download::NAME, Quantize::NAME],
            Variant::Nf4Adapter => &[Download::NAME, Quantize::NAME, Train::NAME],
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
    /// The download stage's metrics (`None`: not completed).
    pub download: Option<DownloadMetrics>,
    /// The quantize stage's metrics (`None`: not completed or not built in).
    pub quantize: Option<QuantizeMetrics>,
    /// The train stage's metrics (`None`: not completed or not built in).
    pub train: Option<TrainingMetrics>,
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
        if *stage != Download::NAME && !up.registered.contains(stage) {
            return Err(format!(
                "stage `{stage}` is not built into this medpipe, so there is no {} to evaluate",
                match *stage {
                    Quantize::NAME => "NF4 checkpoint",
                    _ => "trained adapter",
                }
            ));
        }
        let completed = match *stage {
            Download::NAME => up.download.is_some(),
            Quantize::NAME => up.quantize.is_some(),
            _ => up.train.is_some(),
        };
        if !completed {
            return Err(format!(
                "stage `{stage}` has not completed (run `medpipe run --to {stage}` first)"
            ));
        }
    }
    let dir_or = |dir: Option<&str>, default: &str| (up.resolve)(dir.unwrap_or(default));
    let nf4_dir = || {
        let recorded = up.quantize.as_ref().and_then(|q| q.output_dir.as_deref());
        dir_or(recorded, DEFAULT_NF4_DIR)
    };
    let base_dir = || -> Result<PathBuf, String> {
        up.download
            .as_ref()
            .map(|d| d.model_dir.as_str())
            .filter(|d| !d.is_empty())
            .map(|s| (up.resolve)(s))
            .ok_or_else(|| "download.json has no `metrics.model_dir`".to_string())
    };
    match variant {
        Variant::Base => Ok(VariantSource {
            model_dir: base_dir()?,
            adapter_dir: None,
        }),
        Variant::Nf4 => Ok(VariantSource {
            model_dir: nf4_dir(),
            adapter_dir: None,
        }),
        Variant::Nf4Adapter => Ok(VariantSource {
            model_dir: nf4_dir(),
            adapter_dir: Some(dir_or(
                up.train.as_ref().and_then(|t| t.adapter_dir.as_deref()),
                DEFAULT_ADAPTER_DIR,
            )),
        }),
    }
}

/// One document to score.
#[derive(Debug, Clone)]
pub(super) struct EvalDoc {
    pub(super) sample: Sample,
    /// `test` or `eval`.
    pub(super) set: &'static str,
    /// Prompt tokens and preprocessed page.
    pub(super) encoded: EncodedPrompt,
}

/// The documents every variant sees: the test split (first `max_documents`), then the
/// evaluation documents, each with its prompt tokens and preprocessed image.
pub(super) fn load_documents(
    ctx: &StageCtx<'_>,
    cfg: &EvaluateConfig,
    encoder: &InputEncoder,
    prepare: &PrepareMetrics,
) -> anyhow::Result<Vec<EvalDoc>> {
    let recorded = |p: Option<&Path>, default: &'static str| {
        p.filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from(default), Path::to_path_buf)
    };
    let test_rel = recorded(
        prepare.splits.get("test").map(|s| s.path.as_path()),
        "data/splits/test.jsonl",
    );
    let mut test = read_samples(&ctx.path(test_rel))?;
    if cfg.max_documents > 0 {
        test.truncate(cfg.max_documents);
    }
    let mut rows: Vec<(Sample, &'static str)> = test.into_iter().map(|s| (s, "test")).collect();
    if cfg.eval_documents {
        let eval_rel = recorded(Some(prepare.eval.path.as_path()), "data/eval/eval.jsonl");
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
