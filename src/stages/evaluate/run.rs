//! Running the variants: each is loaded (timed, memory sampled), generates for every
//! document in batches through the benchmark's measured call (`crate::bench::run::
//! generate_batch`), and is scored; its predictions go to `reports/predictions/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::compare_variants;
use super::metrics::{VariantEvaluation, VariantNotRun};
use super::plan::{EvalDoc, EvaluateConfig, Variant, VariantPlan, VariantSource};
use crate::bench::memory::{rss_bytes, MemorySampler};
use crate::bench::performance::Performance;
use crate::bench::run::{generate_batch, watch_device};
use crate::device::{run_on_as, BackendJob, Device, Precision, Target};
use crate::fs::write_atomic_with;
use crate::kernels::Kernels;
use crate::metrics::answer::Item;
use crate::metrics::extraction::{score_document, score_report, Comparison, DocScore};
use crate::metrics::stats::summarize_ms;
use crate::model::generate::{GenerateConfig, Generation, Request, Sampling};
use crate::model::loader::{load_model, LoadedModel};
use crate::model::prompt::PromptBuilder;
use crate::pipeline::StageCtx;

/// RSS sampling period while generating.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

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

/// Runs every planned variant on the backend of `device` (NdArray for the CPU, wgpu or Cuda
/// for a GPU) computing in `precision`, each on the same documents.
///
/// # Errors
/// No backend for `device` in this build; scores that cannot be compared. A variant that
/// fails is listed in the outcome, not returned.
pub(super) fn evaluate_on(
    (device, precision): (Device, Precision),
    ctx: &StageCtx<'_>,
    cfg: &EvaluateConfig,
    plans: &[VariantPlan],
    docs: &[EvalDoc],
    prompts: &PromptBuilder,
) -> anyhow::Result<Outcome> {
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
    run_on_as(
        device,
        precision,
        Job {
            ctx,
            cfg,
            plans,
            docs,
            prompts,
        },
    )??
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

/// A variant that ran: its entry in the artifact and its per-document scores (paired with
/// the other variants' for the comparisons).
pub(super) struct Scored {
    pub(super) eval: VariantEvaluation,
    pub(super) docs: Vec<DocScore>,
}

/// What evaluating every variant gave.
pub(super) struct Outcome {
    pub(super) scored: Vec<Scored>,
    /// Variants skipped (with the reason) or failed (with the error).
    pub(super) not_run: Vec<VariantNotRun>,
    pub(super) comparisons: Vec<Comparison>,
    pub(super) warnings: Vec<String>,
    /// The predictions files written.
    pub(super) outputs: Vec<PathBuf>,
}

/// Runs the variants in plan order, records the skipped and failed ones, then compares the
/// scored ones.
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

/// Loads one variant, generates for every document in batches of `evaluate.batch_size`, and
/// scores and writes its predictions, measuring load time, latency and memory on the way.
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
    let mut watch = watch_device::<B>(device, target);
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
        // Requests are built per batch, so only one batch's pages are on the device at a time.
        let requests: Vec<Request<B>> = chunk.iter().map(|d| d.encoded.request(device)).collect();
        let gens = generate_batch(&model, &requests, &gen_cfg, device, &mut watch)
            .with_context(|| format!("generating batch {b} of `{name}`"))?
            .generations;
        if let Some(g) = gens.first() {
            decode_ms += g.decode_ms;
        }
        for (d, g) in chunk.iter().zip(gens) {
            decode_tokens += g.tokens.len().saturating_sub(1);
            records.push(prediction_record(name, b, d, g, prompts)?);
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
        compute_dtype: Some(crate::device::compute_dtype::<B>(device)),
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

/// One document's line of the predictions file: the decoded answer, its score, and the
/// timing of the batch it ran in.
fn prediction_record(
    variant: &str,
    batch: usize,
    d: &EvalDoc,
    g: Generation,
    prompts: &PromptBuilder,
) -> anyhow::Result<PredictionRecord> {
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
    Ok(PredictionRecord {
        variant: variant.into(),
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
        batch,
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
pub(super) fn to_metric_item(i: &crate::data::document::Item) -> Item {
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

/// Writes the predictions file atomically, one JSON line per document.
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
