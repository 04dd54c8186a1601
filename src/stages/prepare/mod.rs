//! prepare: turns the configured sources into train/val/test samples of (document image,
//! prompt, target), plus the five rendered evaluation documents.
//!
//! Writes `data/splits/{train,val,test}.jsonl`, page images under `data/images/<source>/`,
//! `data/eval/eval.jsonl` with `data/eval/images/`, `reports/prepare_contact_sheet.png`, and
//! the dataset report as this stage's artifact (`reports/dataset.json`).
//!
//! Resumable: each source is processed in shards of `shard_size` items, and a finished
//! shard's manifest (`data/.prepare/<config key>/<source>/shard-N.json`) lets a later run
//! reuse it; `crate::data::shards` says when a shard counts as done.
//!
//! - `config`: the `[prepare]` section and its checks
//! - `contact_sheet`: the captioned thumbnails of `reports/prepare_contact_sheet.png`

mod config;
mod contact_sheet;
pub mod metrics;
#[cfg(test)]
mod tests;

pub use config::PrepareConfig;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::data::downloaded::{self, Downloaded};
use crate::data::filter::{Dedup, Tally};
use crate::data::render::{self, encode_png, RenderConfig};
use crate::data::sample::Sample;
use crate::data::shards::{self, page_seed, to_sample, ShardManifest, ShardSettings};
use crate::data::source::{Raw, SourceConfig};
use crate::data::split::{split, Splits};
use crate::data::{eval_docs, DataError};
use crate::fs::{hash_file, sha256_hex, write_atomic, write_atomic_with};
use crate::pipeline::{Stage, StageCtx, StageOutput, Workspace};
use crate::stages::download::Download;
use contact_sheet::write_contact_sheet;

/// Bumped when this stage's output for the same config changes.
const CODE_VERSION: u32 = 2;

/// The prepare stage.
#[derive(Debug, Default)]
pub struct Prepare {
    /// `["download"]` when the download stage is registered before this one: then a source's
    /// `dataset` resolves through download.json, and a changed download re-runs prepare.
    optional: Vec<&'static str>,
}

impl Prepare {
    /// The stage, reading download.json when `download` is among the `earlier` stages.
    pub fn new(earlier: &[&'static str]) -> Self {
        Self {
            optional: earlier
                .iter()
                .copied()
                .filter(|s| *s == "download")
                .collect(),
        }
    }
}

impl Stage for Prepare {
    const NAME: &'static str = "prepare";
    type Config = PrepareConfig;
    type Metrics = metrics::PrepareMetrics;

    fn description(&self) -> &'static str {
        "render sources to page images, filter, de-duplicate, split 80/10/10; eval documents"
    }
    fn artifact_file(&self) -> &'static str {
        "dataset.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe"]
    }
    fn optional_upstream(&self) -> &[&'static str] {
        &self.optional
    }
    fn code_version(&self) -> u32 {
        CODE_VERSION
    }

    fn run(&self, cfg: &PrepareConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let started = Instant::now();
        let cfg = cfg.clone();
        let root = ctx.workspace().root().to_path_buf();
        // `dataset = ..` sources resolve through download.json when download completed.
        let datasets = ctx.completed_metrics::<Download>()?.map(|d| d.datasets);
        let key = config_key(&cfg, datasets.as_deref())?;
        let datasets = in_workspace(&root, datasets);
        let shard_root = ctx.workspace().data().join(".prepare");
        let store = ShardStore {
            cfg: &cfg,
            root: &root,
            dir: shard_root.join(&key),
        };
        let mut read = read_sources(ctx, &store, datasets.as_deref())?;

        let eval_dir = ctx.workspace().data().join("eval");
        let eval = write_eval_documents(&cfg, &root, &eval_dir)?;

        let total = read.samples.len();
        let splits = split(std::mem::take(&mut read.samples), &cfg.split, cfg.seed)?;
        let (split_metrics, mut outputs) = write_splits(ctx.workspace(), &splits)?;

        let images_dir = ctx.workspace().data().join("images");
        remove_unused(&root, &splits, &images_dir, &shard_root, &key);

        let sheet_path = ctx.workspace().reports().join("prepare_contact_sheet.png");
        if cfg.contact_sheet_pages > 0 && total > 0 {
            write_contact_sheet(
                cfg.seed,
                cfg.contact_sheet_pages,
                &root,
                &splits,
                &sheet_path,
            )?;
            outputs.push(sheet_path);
        }
        std::fs::create_dir_all(&images_dir)
            .with_context(|| format!("creating {}", images_dir.display()))?;
        outputs.push(images_dir);
        outputs.push(eval_dir);

        let elapsed = started.elapsed().as_secs_f64();
        let metrics = json!({
            "seed": cfg.seed,
            "config_key": key,
            "sources": read.sources_metrics(),
            "samples_total": total,
            "splits": split_metrics,
            "eval": eval.metrics(ctx.workspace()),
            "render": read.render_metrics(&cfg.render),
            "elapsed_s": elapsed,
        });
        Ok(StageOutput {
            metrics,
            outputs,
            summary: summary(&splits, &read.tallies, eval.rows.len()),
            warnings: read.warnings,
        })
    }
}

/// A short key for everything that decides shard contents: the config and, for sources
/// that read a downloaded dataset, where it is and the revision it resolved to.
///
/// # Errors
/// A source naming a dataset that download.json does not have.
fn config_key(cfg: &PrepareConfig, datasets: Option<&[Downloaded]>) -> anyhow::Result<String> {
    let mut used = serde_json::Map::new();
    for s in &cfg.sources {
        if let Some(id) = s.dataset() {
            let d =
                downloaded::find(datasets, id).with_context(|| format!("source `{}`", s.name()))?;
            used.insert(
                s.name().to_string(),
                json!({"dir": d.dir, "revision": d.revision, "files": d.files}),
            );
        }
    }
    let v = json!({
        "code": CODE_VERSION,
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "render": cfg.render,
        "filters": cfg.filters,
        "sources": cfg.sources,
        "datasets": used,
    });
    let text = serde_json::to_string(&crate::json::canonical(v)).expect("plain JSON serializes");
    Ok(sha256_hex(text.as_bytes())[..16].to_string())
}

/// The downloaded datasets with their directories under `root`: download.json records those
/// inside the workspace relative to it (the config key keeps that form, so a moved workspace
/// reuses its shards), and they are read from here.
fn in_workspace(root: &Path, datasets: Option<Vec<Downloaded>>) -> Option<Vec<Downloaded>> {
    datasets.map(|ds| {
        ds.into_iter()
            .map(|d| Downloaded {
                dir: root.join(&d.dir),
                ..d
            })
            .collect::<Vec<_>>()
    })
}

/// Where this run's shards are kept and what they are made with.
struct ShardStore<'a> {
    cfg: &'a PrepareConfig,
    root: &'a Path,
    /// `data/.prepare/<config key>`: a changed config starts a fresh set of shards.
    dir: PathBuf,
}

impl ShardStore<'_> {
    /// Shard `idx` of source `name`: reused when its manifest and images are intact (so an
    /// interrupted run resumes), else built from `chunk` and recorded.
    fn get(
        &self,
        name: &str,
        idx: usize,
        chunk: Vec<Result<Raw, DataError>>,
        read: &mut SourcesRead,
    ) -> anyhow::Result<ShardManifest> {
        let manifest_path = self.dir.join(name).join(format!("shard-{idx:05}.json"));
        if let Some(m) = shards::reuse(&manifest_path, self.root) {
            return Ok(m);
        }
        // A page image is a mostly white PNG: measured at about 0.05 bytes per
        // pixel on the synthetic documents; 0.25 leaves room for dense scans.
        let needed = chunk.len() as u64 * self.cfg.render.max_pixels / 4;
        crate::fs::space::ensure_free(
            &self.root.join("data"),
            needed,
            &format!("the {} page images of shard {idx}", chunk.len()),
        )?;
        let mut raws = Vec::with_capacity(chunk.len());
        for r in chunk {
            raws.push(r.with_context(|| format!("reading source `{name}`"))?);
        }
        let settings = ShardSettings {
            seed: self.cfg.seed,
            render: &self.cfg.render,
            filters: &self.cfg.filters,
        };
        let t = Instant::now();
        let m = shards::build(settings, name, raws, self.root, &mut read.dedup)?;
        read.render_s += t.elapsed().as_secs_f64();
        read.rendered += m.samples.len() as u64;
        shards::write_manifest(&manifest_path, &m)?;
        Ok(m)
    }
}

/// What the sources yielded, over all their shards.
#[derive(Default)]
struct SourcesRead {
    /// Kept samples, source by source, in shard order.
    samples: Vec<Sample>,
    /// Per source: name, kind and what was read, kept and dropped.
    tallies: Vec<(String, &'static str, Tally)>,
    /// Degradation names applied, counted.
    degradations: BTreeMap<String, u64>,
    /// Pages drawn by this run (reused shards are not redrawn).
    rendered: u64,
    /// Time spent building shards this run, s.
    render_s: f64,
    /// Sources that ended empty but were allowed to.
    warnings: Vec<String>,
    /// One de-duplication over all sources: a later source loses its repeats of an earlier one.
    dedup: Dedup,
}

impl SourcesRead {
    /// Takes in one shard (reused or built), so every shard counts the same either way.
    fn add(&mut self, shard: ShardManifest) {
        shard.feed(&mut self.dedup);
        for (k, v) in &shard.degradations {
            *self.degradations.entry(k.clone()).or_default() += v;
        }
        self.samples.extend(shard.samples);
    }

    /// `metrics.sources`: per source its kind and counts.
    fn sources_metrics(&self) -> serde_json::Map<String, Value> {
        self.tallies
            .iter()
            .map(|(n, kind, t)| {
                (
                    n.clone(),
                    json!({"kind": kind, "read": t.read, "kept": t.kept, "dropped": t.dropped}),
                )
            })
            .collect()
    }

    /// `metrics.render`: the settings and what drawing the pages cost this run.
    fn render_metrics(&self, settings: &RenderConfig) -> Value {
        let (rendered, render_s) = (self.rendered, self.render_s);
        json!({
            "settings": settings,
            "font": "DejaVu Sans 2.37 (embedded)",
            "degradations_applied": self.degradations,
            "pages_rendered_this_run": rendered,
            "render_seconds_this_run": render_s,
            "pages_per_s": if render_s > 0.0 { rendered as f64 / render_s } else { 0.0 },
            "threads": rayon::current_num_threads(),
        })
    }
}

/// Reads every source in config order through its shards, so de-duplication keeps the first
/// occurrence and a source left with nothing is caught before the split.
fn read_sources(
    ctx: &StageCtx<'_>,
    store: &ShardStore<'_>,
    datasets: Option<&[Downloaded]>,
) -> anyhow::Result<SourcesRead> {
    let mut read = SourcesRead::default();
    for source in &store.cfg.sources {
        let name = source.name().to_string();
        let items = source
            .open(store.root, store.cfg.seed, datasets)
            .with_context(|| format!("opening source `{name}`"))?;
        let bar = ctx.counter(format!("prepare {name}"));
        let mut tally = Tally::default();
        let mut items = items.peekable();
        let mut shard_idx = 0usize;
        while items.peek().is_some() {
            let chunk: Vec<Result<Raw, _>> =
                items.by_ref().take(store.cfg.shard_size.max(1)).collect();
            let manifest = store.get(&name, shard_idx, chunk, &mut read)?;
            tally.merge(&manifest.tally);
            bar.inc(manifest.tally.read);
            read.add(manifest);
            shard_idx += 1;
        }
        bar.finish_and_clear();
        if tally.kept == 0 {
            read.warnings.push(empty_source(source, &tally)?);
        }
        read.tallies.push((name, source.kind(), tally));
    }
    Ok(read)
}

/// The warning for a source that kept no sample, naming the filter that removed the most.
///
/// # Errors
/// The same message, when the source does not set `allow_empty`: training on nothing from a
/// source the user listed is a mistake to stop at.
fn empty_source(source: &SourceConfig, tally: &Tally) -> anyhow::Result<String> {
    let name = source.name();
    let why = match tally.main_reason() {
        Some((reason, n)) => {
            format!("filter `{reason}` removed {n} of {} items", tally.read)
        }
        None => "it yielded no items".to_string(),
    };
    if source.allow_empty() {
        Ok(format!("source `{name}` ended with 0 samples: {why}"))
    } else {
        bail!(
            "source `{name}` ended with 0 samples: {why} (set allow_empty = true to accept this)"
        );
    }
}

/// The rendered evaluation documents and the file listing them.
struct EvalSet {
    /// `data/eval/eval.jsonl`.
    path: PathBuf,
    rows: Vec<Sample>,
}

impl EvalSet {
    /// `metrics.eval`: where the rows are, how many, and their document types.
    fn metrics(&self, ws: &Workspace) -> Value {
        json!({
            "path": ws.relative(&self.path),
            "count": self.rows.len(),
            "doc_types": self.rows.iter().map(|s| s.doc_type.clone()).collect::<Vec<_>>(),
        })
    }
}

/// Renders the fixed evaluation documents like any page, into `eval_dir`: they are scored by
/// the evaluate stage and never split.
fn write_eval_documents(
    cfg: &PrepareConfig,
    root: &Path,
    eval_dir: &Path,
) -> anyhow::Result<EvalSet> {
    let mut rows = Vec::new();
    for doc in eval_docs::documents()? {
        let rel = format!("data/eval/images/{}.png", doc.id);
        let r = render::render(
            &doc,
            &cfg.render,
            page_seed(cfg.seed, eval_docs::SOURCE, &doc.id),
        )?;
        write_atomic(&root.join(&rel), &encode_png(&r.image)?)?;
        rows.push(to_sample(eval_docs::SOURCE, &doc, rel));
    }
    let path = eval_dir.join("eval.jsonl");
    write_jsonl(&path, &rows)?;
    Ok(EvalSet { path, rows })
}

/// Writes the three split files and hashes them, for `metrics.splits` and the outputs the
/// runner checks before skipping this stage.
fn write_splits(
    ws: &Workspace,
    splits: &Splits,
) -> anyhow::Result<(serde_json::Map<String, Value>, Vec<PathBuf>)> {
    let splits_dir = ws.data().join("splits");
    let mut split_metrics = serde_json::Map::new();
    let mut outputs = Vec::new();
    for (label, rows) in [
        ("train", &splits.train),
        ("val", &splits.val),
        ("test", &splits.test),
    ] {
        let path = splits_dir.join(format!("{label}.jsonl"));
        write_jsonl(&path, rows)?;
        let (sha, bytes) = hash_file(&path)?;
        split_metrics.insert(
            label.into(),
            json!({
                "path": ws.relative(&path),
                "count": rows.len(),
                "sha256": sha,
                "bytes": bytes,
                "by_source": count_by(rows, |s| s.source.clone()),
                "by_doc_type": count_by(rows, |s| s.doc_type.clone()),
            }),
        );
        outputs.push(path);
    }
    Ok((split_metrics, outputs))
}

/// Removes images of samples no longer in any split (older configs, dropped) and the shards
/// of other config keys, so the workspace holds only what this config produced.
fn remove_unused(root: &Path, splits: &Splits, images_dir: &Path, shard_root: &Path, key: &str) {
    let keep: BTreeSet<PathBuf> = [&splits.train, &splits.val, &splits.test]
        .into_iter()
        .flatten()
        .map(|s| root.join(&s.image))
        .collect();
    remove_unreferenced(images_dir, &keep);
    remove_other_dirs(shard_root, key);
}

/// The run table's lines: split sizes, per-source counts, evaluation documents.
fn summary(
    splits: &Splits,
    tallies: &[(String, &'static str, Tally)],
    eval_documents: usize,
) -> Vec<(String, String)> {
    vec![
        (
            "samples".into(),
            format!(
                "{} train / {} val / {} test",
                splits.train.len(),
                splits.val.len(),
                splits.test.len()
            ),
        ),
        (
            "sources".into(),
            tallies
                .iter()
                .map(|(n, _, t)| format!("{n}: {} of {} kept", t.kept, t.read))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("eval documents".into(), eval_documents.to_string()),
    ]
}

fn write_jsonl(path: &Path, rows: &[Sample]) -> anyhow::Result<()> {
    use std::io::Write;
    write_atomic_with(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(())
}

fn count_by(rows: &[Sample], key: impl Fn(&Sample) -> String) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(key(r)).or_default() += 1;
    }
    m
}

fn remove_unreferenced(dir: &Path, keep: &BTreeSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_unreferenced(&p, keep);
            let _ = std::fs::remove_dir(&p); // only succeeds when now empty
        } else if !keep.contains(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

fn remove_other_dirs(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() != keep {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
