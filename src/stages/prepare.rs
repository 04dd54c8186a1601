//! prepare: turns the configured sources into train/val/test samples of (document image,
//! prompt, target), plus the five rendered evaluation documents.
//!
//! Writes `data/splits/{train,val,test}.jsonl`, page images under `data/images/<source>/`,
//! `data/eval/eval.jsonl` with `data/eval/images/`, `reports/prepare_contact_sheet.png`, and
//! the dataset report as this stage's artifact (`reports/dataset.json`).
//!
//! Resumable: each source is processed in shards of `shard_size` items. A shard's images are
//! written through a temp file and a rename (no fsync per page: that cost more than drawing
//! it), then its manifest (`data/.prepare/<config key>/<source>/shard-N.json`) atomically
//! with fsync, recording every image's sha256. A shard is reused only when its manifest
//! exists and every image still has the recorded hash, so neither a kill -9 nor a power loss
//! makes a half-written page count as done; any other shard is rebuilt, identically, since
//! every document, render and degradation is seeded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::downloaded::{self, Downloaded};
use crate::data::filter::{
    check_image, check_text, content_hash, Dedup, DropReason, FilterConfig, Tally,
};
use crate::data::render::{self, contact_sheet, encode_png, RenderConfig, RenderError};
use crate::data::sample::{target_json, Sample, PROMPT};
use crate::data::source::{Raw, SourceConfig};
use crate::data::split::{split, SplitConfig};
use crate::data::{eval_docs, Document};
use crate::fs::{hash_file, sha256_hex, write_atomic, write_atomic_with, write_replace};
use crate::pipeline::{Stage, StageCtx, StageOutput};

/// Bumped when this stage's output for the same config changes.
const CODE_VERSION: u32 = 2;

/// `[prepare]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// Seed for generation, degradations, the split and the contact sheet.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Items per resumable shard.
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
    /// Pages shown on `reports/prepare_contact_sheet.png` (0: none).
    #[serde(default = "default_contact")]
    pub contact_sheet_pages: usize,
    /// Split fractions.
    #[serde(default)]
    pub split: SplitConfig,
    /// Page rendering.
    #[serde(default)]
    pub render: RenderConfig,
    /// Sample filters.
    #[serde(default)]
    pub filters: FilterConfig,
    /// The sources, read in order (de-duplication keeps the first occurrence).
    #[serde(default = "default_sources")]
    pub sources: Vec<SourceConfig>,
}

fn default_seed() -> u64 {
    42
}
fn default_shard_size() -> usize {
    256
}
fn default_contact() -> usize {
    12
}
fn default_sources() -> Vec<SourceConfig> {
    vec![SourceConfig::Synthetic {
        name: "synthetic".into(),
        count: 320,
        allow_empty: false,
    }]
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            seed: default_seed(),
            shard_size: default_shard_size(),
            contact_sheet_pages: default_contact(),
            split: SplitConfig::default(),
            render: RenderConfig::default(),
            filters: FilterConfig::default(),
            sources: default_sources(),
        }
    }
}

impl crate::pipeline::SectionConfig for PrepareConfig {
    /// Checks `[prepare]`: at least one source, each named well and once; split fractions
    /// that sum to 1; a usable page geometry; probabilities in [0, 1]. Filters that drop
    /// everything are allowed: the stage then fails naming them (or keeps going with
    /// `allow_empty`).
    ///
    /// # Errors
    /// The first value outside its range. An empty source list is refused here, not after
    /// training found nothing to train on (issue 15).
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::{at_least_one, check, fraction};
        check(
            !self.sources.is_empty(),
            "prepare.sources",
            "[]",
            "must list at least one [[prepare.sources]]",
        )?;
        let mut seen = BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let n = s.name();
            let key = format!("prepare.sources[{i}].name");
            check(
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                &key,
                format!("{n:?}"),
                "must be letters, digits, `_` or `-`",
            )?;
            check(
                n != eval_docs::SOURCE,
                &key,
                format!("{n:?}"),
                "is reserved for the evaluation documents",
            )?;
            check(
                seen.insert(n),
                &key,
                format!("{n:?}"),
                "must differ from every other source's name",
            )?;
        }
        at_least_one("prepare.shard_size", self.shard_size as u64)?;
        let sp = &self.split;
        for (k, v) in [("train", sp.train), ("val", sp.val), ("test", sp.test)] {
            fraction(&format!("prepare.split.{k}"), v)?;
        }
        check(
            sp.validate().is_ok(),
            "prepare.split",
            format!("train {} + val {} + test {}", sp.train, sp.val, sp.test),
            "the three fractions must sum to 1",
        )?;
        let r = &self.render;
        check(
            r.width_px >= crate::data::render::SIDE_MULTIPLE,
            "prepare.render.width_px",
            r.width_px,
            &format!("must be at least {}", crate::data::render::SIDE_MULTIPLE),
        )?;
        at_least_one("prepare.render.max_pixels", r.max_pixels)?;
        at_least_one("prepare.render.min_font_px", r.min_font_px)?;
        check(
            r.font_px >= r.min_font_px,
            "prepare.render.font_px",
            r.font_px,
            &format!("must be at least min_font_px ({})", r.min_font_px),
        )?;
        let d = &r.degrade;
        for (k, v) in [
            ("rotate_prob", d.rotate_prob),
            ("blur_prob", d.blur_prob),
            ("speckle_prob", d.speckle_prob),
            ("jpeg_prob", d.jpeg_prob),
        ] {
            fraction(&format!("prepare.render.degrade.{k}"), v)?;
        }
        check(
            (1..=100).contains(&d.jpeg_quality),
            "prepare.render.degrade.jpeg_quality",
            d.jpeg_quality,
            "must be in [1, 100]",
        )?;
        Ok(())
    }
}

/// A completed shard, as stored in its manifest.
#[derive(Debug, Serialize, Deserialize)]
struct ShardManifest {
    tally: Tally,
    /// Content hashes (hex) of every item that passed the text filters, in order, so a
    /// reused shard feeds de-duplication exactly as a rebuilt one would.
    hashes: Vec<String>,
    samples: Vec<Sample>,
    /// sha256 (hex) of each sample's image file, in the order of `samples`.
    image_sha256: Vec<String>,
    /// Degradation names applied, counted.
    degradations: BTreeMap<String, u64>,
}

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
    type Metrics = super::prepare_metrics::PrepareMetrics;

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
        let datasets = match ctx.upstream("download") {
            Ok(a) => Some(downloaded::from_metrics(&a.metrics)?),
            Err(_) => None,
        };
        let key = config_key(&cfg, datasets.as_deref())?;
        // download.json records datasets inside the workspace relative to it (the key above
        // keeps that form, so a moved workspace reuses its shards); read them from here.
        let datasets = datasets.map(|ds| {
            ds.into_iter()
                .map(|d| Downloaded {
                    dir: root.join(&d.dir),
                    ..d
                })
                .collect::<Vec<_>>()
        });
        let shard_root = ctx.workspace().data().join(".prepare");
        let shard_dir = shard_root.join(&key);

        let mut dedup = Dedup::default();
        let mut all: Vec<Sample> = Vec::new();
        let mut tallies: Vec<(String, &'static str, Tally)> = Vec::new();
        let mut degradations: BTreeMap<String, u64> = BTreeMap::new();
        let mut rendered = 0u64;
        let mut render_s = 0f64;
        let mut warnings = Vec::new();

        for source in &cfg.sources {
            let name = source.name().to_string();
            let items = source
                .open(&root, cfg.seed, datasets.as_deref())
                .with_context(|| format!("opening source `{name}`"))?;
            let bar = ctx.counter(format!("prepare {name}"));
            let mut tally = Tally::default();
            let mut items = items.peekable();
            let mut shard_idx = 0usize;
            while items.peek().is_some() {
                let chunk: Vec<Result<Raw, _>> =
                    items.by_ref().take(cfg.shard_size.max(1)).collect();
                let manifest_path = shard_dir
                    .join(&name)
                    .join(format!("shard-{shard_idx:05}.json"));
                let manifest = match reuse(&manifest_path, &root) {
                    Some(m) => m,
                    None => {
                        // A page image is a mostly white PNG: measured at about 0.05 bytes per
                        // pixel on the synthetic documents; 0.25 leaves room for dense scans.
                        let needed = chunk.len() as u64 * cfg.render.max_pixels / 4;
                        crate::pipeline::space::ensure_free(
                            &root.join("data"),
                            needed,
                            &format!("the {} page images of shard {shard_idx}", chunk.len()),
                        )?;
                        let mut raws = Vec::with_capacity(chunk.len());
                        for r in chunk {
                            raws.push(r.with_context(|| format!("reading source `{name}`"))?);
                        }
                        let t = Instant::now();
                        let m = build_shard(&cfg, &name, raws, &root, &mut dedup)?;
                        render_s += t.elapsed().as_secs_f64();
                        rendered += m.samples.len() as u64;
                        let text = serde_json::to_vec(&m)?;
                        write_atomic(&manifest_path, &text)?;
                        m
                    }
                };
                for h in &manifest.hashes {
                    if let Ok(bytes) = hex::decode(h) {
                        if let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) {
                            dedup.first(arr);
                        }
                    }
                }
                for (k, v) in &manifest.degradations {
                    *degradations.entry(k.clone()).or_default() += v;
                }
                tally.merge(&manifest.tally);
                bar.inc(manifest.tally.read);
                all.extend(manifest.samples);
                shard_idx += 1;
            }
            bar.finish_and_clear();
            if tally.kept == 0 {
                let why = match tally.main_reason() {
                    Some((reason, n)) => {
                        format!("filter `{reason}` removed {n} of {} items", tally.read)
                    }
                    None => "it yielded no items".to_string(),
                };
                if source.allow_empty() {
                    warnings.push(format!("source `{name}` ended with 0 samples: {why}"));
                } else {
                    bail!("source `{name}` ended with 0 samples: {why} (set allow_empty = true to accept this)");
                }
            }
            tallies.push((name, source.kind(), tally));
        }

        // Evaluation documents: rendered like the rest, never split.
        let eval_dir = ctx.workspace().data().join("eval");
        let mut eval_rows = Vec::new();
        for doc in eval_docs::documents()? {
            let rel = format!("data/eval/images/{}.png", doc.id);
            let r = render::render(
                &doc,
                &cfg.render,
                page_seed(cfg.seed, eval_docs::SOURCE, &doc.id),
            )?;
            write_atomic(&root.join(&rel), &encode_png(&r.image)?)?;
            eval_rows.push(to_sample(eval_docs::SOURCE, &doc, rel));
        }
        let eval_path = eval_dir.join("eval.jsonl");
        write_jsonl(&eval_path, &eval_rows)?;

        let total = all.len();
        let splits = split(all, &cfg.split, cfg.seed)?;
        let splits_dir = ctx.workspace().data().join("splits");
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
                    "path": ctx.workspace().relative(&path),
                    "count": rows.len(),
                    "sha256": sha,
                    "bytes": bytes,
                    "by_source": count_by(rows, |s| s.source.clone()),
                    "by_doc_type": count_by(rows, |s| s.doc_type.clone()),
                }),
            );
            outputs.push(path);
        }

        // Images of samples no longer in any split (older configs, dropped) are removed.
        let keep: BTreeSet<PathBuf> = [&splits.train, &splits.val, &splits.test]
            .into_iter()
            .flatten()
            .map(|s| root.join(&s.image))
            .collect();
        let images_dir = ctx.workspace().data().join("images");
        remove_unreferenced(&images_dir, &keep);
        remove_other_dirs(&shard_root, &key);

        let sheet_path = ctx.workspace().reports().join("prepare_contact_sheet.png");
        if cfg.contact_sheet_pages > 0 && total > 0 {
            write_contact_sheet(&cfg, &root, &splits, &sheet_path)?;
            outputs.push(sheet_path);
        }
        std::fs::create_dir_all(&images_dir)
            .with_context(|| format!("creating {}", images_dir.display()))?;
        outputs.push(images_dir);
        outputs.push(eval_dir);

        let elapsed = started.elapsed().as_secs_f64();
        let sources_json: serde_json::Map<String, Value> = tallies
            .iter()
            .map(|(n, kind, t)| {
                (
                    n.clone(),
                    json!({"kind": kind, "read": t.read, "kept": t.kept, "dropped": t.dropped}),
                )
            })
            .collect();
        let metrics = json!({
            "seed": cfg.seed,
            "config_key": key,
            "sources": sources_json,
            "samples_total": total,
            "splits": split_metrics,
            "eval": {
                "path": ctx.workspace().relative(&eval_path),
                "count": eval_rows.len(),
                "doc_types": eval_rows.iter().map(|s| s.doc_type.clone()).collect::<Vec<_>>(),
            },
            "render": {
                "settings": cfg.render,
                "font": "DejaVu Sans 2.37 (embedded)",
                "degradations_applied": degradations,
                "pages_rendered_this_run": rendered,
                "render_seconds_this_run": render_s,
                "pages_per_s": if render_s > 0.0 { rendered as f64 / render_s } else { 0.0 },
                "threads": rayon::current_num_threads(),
            },
            "elapsed_s": elapsed,
        });
        let summary = vec![
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
            ("eval documents".into(), eval_rows.len().to_string()),
        ];
        Ok(StageOutput {
            metrics,
            outputs,
            summary,
            warnings,
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

/// The degradation seed of one page.
fn page_seed(seed: u64, source: &str, id: &str) -> u64 {
    let h = content_hash(&[&seed.to_le_bytes(), source.as_bytes(), id.as_bytes()]);
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes of a 32-byte hash"))
}

/// A complete shard manifest whose images all exist with their recorded hashes, or `None`
/// (then the shard is rebuilt).
fn reuse(path: &Path, root: &Path) -> Option<ShardManifest> {
    let bytes = std::fs::read(path).ok()?;
    let m: ShardManifest = serde_json::from_slice(&bytes).ok()?;
    (m.samples.len() == m.image_sha256.len()
        && m.samples
            .par_iter()
            .zip(&m.image_sha256)
            .all(|(s, want)| hash_file(&root.join(&s.image)).is_ok_and(|(got, _)| &got == want)))
    .then_some(m)
}

fn to_sample(source: &str, doc: &Document, image: String) -> Sample {
    Sample {
        id: format!("{source}/{}", doc.id),
        source: source.to_string(),
        doc_type: doc.doc_type.clone(),
        image,
        prompt: PROMPT.to_string(),
        target: target_json(&doc.ground_truth),
        ground_truth: doc.ground_truth.clone(),
    }
}

/// What happened to one item of a shard after the sequential filters.
enum Pending {
    Dropped(DropReason),
    Render(Document),
    Image(Raw),
}

/// A kept sample with the degradations applied to its page, or why it was dropped.
type ShardItem = Result<(Sample, String, Vec<&'static str>), DropReason>;

/// Filters, de-duplicates (in order), renders (in parallel) and writes one shard's images.
fn build_shard(
    cfg: &PrepareConfig,
    source: &str,
    raws: Vec<Raw>,
    root: &Path,
    dedup: &mut Dedup,
) -> anyhow::Result<ShardManifest> {
    let mut tally = Tally::default();
    let mut hashes = Vec::new();
    let mut pending = Vec::with_capacity(raws.len());
    for raw in raws {
        tally.read += 1;
        let (text_ok, hash) = match &raw {
            Raw::Rejected { reason } => (Err(*reason), None),
            Raw::Doc(d) => {
                let target = target_json(&d.ground_truth);
                let text = d.plain_text();
                (
                    if d.is_empty() {
                        Err(DropReason::EmptyText)
                    } else {
                        check_text(&text, &target, &cfg.filters)
                    },
                    Some(content_hash(&[text.as_bytes(), target.as_bytes()])),
                )
            }
            Raw::Image {
                image,
                prompt,
                target,
                ..
            } => (
                check_text(prompt, target, &cfg.filters),
                Some(content_hash(&[image, prompt.as_bytes(), target.as_bytes()])),
            ),
        };
        let p = match (text_ok, hash) {
            (Err(r), _) => Pending::Dropped(r),
            (Ok(()), Some(h)) => {
                hashes.push(hex::encode(h));
                if cfg.filters.dedup && !dedup.first(h) {
                    Pending::Dropped(DropReason::Duplicate)
                } else {
                    match raw {
                        Raw::Doc(d) => Pending::Render(d),
                        other => Pending::Image(other),
                    }
                }
            }
            (Ok(()), None) => Pending::Dropped(DropReason::EmptyText),
        };
        pending.push(p);
    }

    let results: Vec<anyhow::Result<ShardItem>> = pending
        .into_par_iter()
        .map(|p| match p {
            Pending::Dropped(r) => Ok(Err(r)),
            Pending::Render(doc) => {
                let rel = format!("data/images/{source}/{}.png", doc.id);
                match render::render(&doc, &cfg.render, page_seed(cfg.seed, source, &doc.id)) {
                    Err(RenderError::TooLarge { .. }) => Ok(Err(DropReason::ImageTooLarge)),
                    Ok(r) => {
                        if let Err(reason) =
                            check_image(r.image.width(), r.image.height(), &cfg.filters)
                        {
                            return Ok(Err(reason));
                        }
                        let png =
                            encode_png(&r.image).with_context(|| format!("encoding {rel}"))?;
                        write_replace(&root.join(&rel), &png)?;
                        let sha = sha256_hex(&png);
                        Ok(Ok((to_sample(source, &doc, rel), sha, r.degradations)))
                    }
                }
            }
            Pending::Image(Raw::Image {
                id,
                doc_type,
                image,
                prompt,
                target,
                ground_truth,
            }) => {
                let decoded = match image::load_from_memory(&image) {
                    Ok(img) => img,
                    Err(_) => return Ok(Err(DropReason::DecodeError)),
                };
                if let Err(reason) = check_image(decoded.width(), decoded.height(), &cfg.filters) {
                    return Ok(Err(reason));
                }
                let safe: String = id
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let rel = format!("data/images/{source}/{safe}.png");
                // Larger than a page may be: shrink to fit render.max_pixels (the model would
                // downscale it anyway; this keeps the dataset small and the cap honest).
                let decoded =
                    match fit_pixels(decoded.width(), decoded.height(), cfg.render.max_pixels) {
                        Some((w, h)) => {
                            decoded.resize_exact(w, h, image::imageops::FilterType::Triangle)
                        }
                        None => decoded,
                    };
                // Photographs and slides keep their colour (pages are grayscale).
                let mut png = Vec::new();
                decoded
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .with_context(|| format!("encoding {rel}"))?;
                write_replace(&root.join(&rel), &png)?;
                let sha = sha256_hex(&png);
                Ok(Ok((
                    Sample {
                        id: format!("{source}/{id}"),
                        source: source.into(),
                        doc_type,
                        image: rel,
                        prompt,
                        target,
                        ground_truth,
                    },
                    sha,
                    Vec::new(),
                )))
            }
            Pending::Image(_) => Ok(Err(DropReason::EmptyText)),
        })
        .collect();

    let mut samples = Vec::new();
    let mut image_sha256 = Vec::new();
    let mut degradations = BTreeMap::new();
    for r in results {
        match r? {
            Err(reason) => tally.drop(reason),
            Ok((s, sha, degr)) => {
                tally.kept += 1;
                for d in degr {
                    *degradations.entry(d.to_string()).or_default() += 1;
                }
                samples.push(s);
                image_sha256.push(sha);
            }
        }
    }
    Ok(ShardManifest {
        tally,
        hashes,
        samples,
        image_sha256,
        degradations,
    })
}

/// The size an image of `w`×`h` is shrunk to so it holds at most `max_pixels` (sides
/// multiples of 28, aspect kept), or `None` when it already fits.
fn fit_pixels(w: u32, h: u32, max_pixels: u64) -> Option<(u32, u32)> {
    if (w as u64) * (h as u64) <= max_pixels {
        return None;
    }
    let m = render::SIDE_MULTIPLE as f64;
    let scale = (max_pixels as f64 / (w as f64 * h as f64)).sqrt();
    let side = |v: u32| (((v as f64 * scale) / m).floor().max(1.0) * m) as u32;
    Some((side(w), side(h)))
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

fn write_contact_sheet(
    cfg: &PrepareConfig,
    root: &Path,
    splits: &crate::data::split::Splits,
    path: &Path,
) -> anyhow::Result<()> {
    let pool: Vec<&Sample> = splits
        .train
        .iter()
        .chain(&splits.val)
        .chain(&splits.test)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let picked: Vec<&&Sample> = pool
        .choose_multiple(&mut rng, cfg.contact_sheet_pages)
        .collect();
    let mut pages = Vec::new();
    for s in picked {
        let img =
            image::open(root.join(&s.image)).with_context(|| format!("reading {}", s.image))?;
        let mut caption = vec![format!("{} ({})", s.id, s.doc_type)];
        for it in s.ground_truth.iter().take(3) {
            caption.push(format!("{}: {} {}", it.term, it.value, it.unit));
        }
        // Captions are cut to the thumbnail's width (about 34 characters at 11 px).
        let caption = caption
            .into_iter()
            .map(|c| {
                if c.chars().count() > 34 {
                    format!("{}…", c.chars().take(33).collect::<String>())
                } else {
                    c
                }
            })
            .collect();
        pages.push((img.to_luma8(), caption));
    }
    let sheet = contact_sheet(&pages, 4, 220);
    write_atomic(path, &encode_png(&sheet)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Pipeline, RunOptions, RunReport, Workspace};
    use crate::stages::probe::Probe;
    use crate::Config;

    fn run_in(dir: &Path, toml: &str, sets: &[&str]) -> RunReport {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = Config::from_toml(toml, Path::new("test.toml"), &sets).unwrap();
        let ws = Workspace::open(dir).unwrap();
        let p = Pipeline::new(vec![Box::new(Probe), Box::new(Prepare::default())]);
        let opts = RunOptions {
            quiet: true,
            ..RunOptions::default()
        };
        p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap()
    }

    const SMALL: &str = "[probe]\ndevice = \"cpu\"\n[prepare]\nshard_size = 16\ncontact_sheet_pages = 4\n[[prepare.sources]]\nkind = \"synthetic\"\ncount = 48\n";

    fn read_rows(path: &Path) -> Vec<Sample> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn report(dir: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(dir.join("reports/dataset.json")).unwrap()).unwrap()
    }

    #[test]
    fn prepare_writes_disjoint_splits_eval_rows_images_and_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let rep = run_in(dir.path(), SMALL, &[]);
        assert!(!rep.failed(), "{rep:?}");
        let mut ids = BTreeSet::new();
        let mut n = 0;
        for split in ["train", "val", "test"] {
            for row in read_rows(&dir.path().join(format!("data/splits/{split}.jsonl"))) {
                assert!(ids.insert(row.id.clone()), "{} in two splits", row.id);
                assert!(dir.path().join(&row.image).is_file(), "{}", row.image);
                assert_eq!(row.target, target_json(&row.ground_truth));
                n += 1;
            }
        }
        assert_eq!(n, 48);
        let eval = read_rows(&dir.path().join("data/eval/eval.jsonl"));
        assert_eq!(eval.len(), 5);
        assert!(eval
            .iter()
            .all(|e| !ids.contains(&e.id) && dir.path().join(&e.image).is_file()));
        let a = report(dir.path());
        assert_eq!(a["status"], "completed");
        let m = &a["metrics"];
        assert_eq!(m["sources"]["synthetic"]["read"], 48);
        assert_eq!(m["sources"]["synthetic"]["kept"], 48);
        assert_eq!(
            m["splits"]["train"]["count"].as_u64().unwrap()
                + m["splits"]["val"]["count"].as_u64().unwrap()
                + m["splits"]["test"]["count"].as_u64().unwrap(),
            48
        );
        assert_eq!(m["splits"]["test"]["sha256"].as_str().unwrap().len(), 64);
        assert!(dir
            .path()
            .join("reports/prepare_contact_sheet.png")
            .is_file());
    }

    #[test]
    fn same_seed_gives_byte_identical_splits_and_another_seed_a_different_assignment() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        run_in(a.path(), SMALL, &[]);
        run_in(b.path(), SMALL, &[]);
        run_in(c.path(), SMALL, &["prepare.seed=7"]);
        for split in ["train", "val", "test"] {
            let f = format!("data/splits/{split}.jsonl");
            assert_eq!(
                std::fs::read(a.path().join(&f)).unwrap(),
                std::fs::read(b.path().join(&f)).unwrap(),
                "{split}"
            );
        }
        let test_ids = |d: &Path| {
            read_rows(&d.join("data/splits/test.jsonl"))
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        };
        assert_ne!(test_ids(a.path()), test_ids(c.path()));
    }

    #[test]
    fn a_source_that_loses_everything_fails_naming_the_filter_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let rep = run_in(
            dir.path(),
            SMALL,
            &["prepare.filters.min_answer_chars=100000"],
        );
        assert!(rep.failed());
        let err = report(dir.path())["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            err.contains("source `synthetic` ended with 0 samples"),
            "{err}"
        );
        assert!(err.contains("answer_too_short"), "{err}");

        let toml = SMALL.replace("count = 48", "count = 48\nallow_empty = true");
        let rep = run_in(
            dir.path(),
            &toml,
            &["prepare.filters.min_answer_chars=100000"],
        );
        assert!(!rep.failed(), "{rep:?}");
        let a = report(dir.path());
        assert_eq!(
            a["metrics"]["sources"]["synthetic"]["dropped"]["answer_too_short"],
            48
        );
        assert!(a["warnings"][0].as_str().unwrap().contains("0 samples"));
    }

    #[test]
    fn duplicates_across_sources_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"synthetic\"\nname = \"again\"\ncount = 20\nallow_empty = true\n");
        let rep = run_in(dir.path(), &toml, &[]);
        assert!(!rep.failed(), "{rep:?}");
        let m = &report(dir.path())["metrics"];
        assert_eq!(m["sources"]["again"]["dropped"]["duplicate"], 20);
        assert_eq!(m["samples_total"], 48);
    }

    #[test]
    fn an_interrupted_run_reuses_complete_shards_and_rebuilds_the_rest_identically() {
        let dir = tempfile::tempdir().unwrap();
        run_in(dir.path(), SMALL, &[]);
        let before: Vec<Vec<u8>> = ["train", "val", "test"]
            .iter()
            .map(|s| std::fs::read(dir.path().join(format!("data/splits/{s}.jsonl"))).unwrap())
            .collect();
        // What a kill -9 mid-render leaves: the artifact gone, a later shard without its
        // manifest, an image missing, a temp file from an unfinished atomic write.
        std::fs::remove_file(dir.path().join("reports/dataset.json")).unwrap();
        let shards = std::fs::read_dir(dir.path().join("data/.prepare"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("synthetic");
        std::fs::remove_file(shards.join("shard-00002.json")).unwrap();
        let row = &read_rows(&dir.path().join("data/splits/train.jsonl"))[0];
        std::fs::remove_file(dir.path().join(&row.image)).unwrap();
        // A page that a power loss left empty under its final name (no fsync per page).
        // (a sample of the first shard, which is reused).
        let torn = read_rows(&dir.path().join("data/splits/train.jsonl"))
            .into_iter()
            .find(|r| r.id != row.id && r.id.as_str() < "synthetic/syn-000016")
            .unwrap();
        let torn_bytes = std::fs::read(dir.path().join(&torn.image)).unwrap();
        std::fs::write(dir.path().join(&torn.image), b"").unwrap();
        std::fs::write(
            dir.path()
                .join("data/images/synthetic/.syn-000047.png.tmp999"),
            b"half",
        )
        .unwrap();

        let rep = run_in(dir.path(), SMALL, &[]);
        assert!(!rep.failed(), "{rep:?}");
        for (s, old) in ["train", "val", "test"].iter().zip(before) {
            assert_eq!(
                std::fs::read(dir.path().join(format!("data/splits/{s}.jsonl"))).unwrap(),
                old,
                "{s}"
            );
        }
        assert!(dir.path().join(&row.image).is_file());
        assert_eq!(
            std::fs::read(dir.path().join(&torn.image)).unwrap(),
            torn_bytes,
            "a page whose hash no longer matches its manifest is redrawn"
        );
        assert!(!dir
            .path()
            .join("data/images/synthetic/.syn-000047.png.tmp999")
            .exists());
        let m = &report(dir.path())["metrics"];
        assert!(
            m["render"]["pages_rendered_this_run"].as_u64().unwrap() < 48,
            "complete shards were reused"
        );
    }

    #[test]
    fn mtsamples_rows_are_rendered_and_bad_rows_counted_while_the_stage_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv =
            b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
        for i in 0..12 {
            csv.extend_from_slice(format!("\"Visit {i}.\",\" Cardiology\",\"Follow-up {i}\",\"VITALS:, Blood pressure 13{i}/80, pulse 7{i}. Metoprolol {i}5 mg twice daily.\",\"cardiology, metoprolol\"\n").as_bytes());
        }
        csv.extend_from_slice(b"d,s,n,\"bad \xff text 5 mg\",k\n");
        std::fs::write(dir.path().join("mt.csv"), csv).unwrap();
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\npath = \"mt.csv\"\n");
        let rep = run_in(dir.path(), &toml, &[]);
        assert!(!rep.failed(), "{rep:?}");
        let m = &report(dir.path())["metrics"]["sources"]["mtsamples"];
        assert_eq!(m["read"], 13);
        assert_eq!(m["kept"], 12);
        assert_eq!(m["dropped"]["encoding_error"], 1);
        let rows: Vec<Sample> = ["train", "val", "test"]
            .iter()
            .flat_map(|s| read_rows(&dir.path().join(format!("data/splits/{s}.jsonl"))))
            .filter(|r| r.source == "mtsamples")
            .collect();
        assert_eq!(rows.len(), 12);
        assert!(rows
            .iter()
            .all(|r| r.doc_type == "cardiology" && r.target.contains("Metoprolol")));
    }

    /// Stands in for the download stage: completes with a fixed `datasets` list.
    struct FakeDownload(Value);

    impl Stage for FakeDownload {
        const NAME: &'static str = "download";
        // Reads [download] as the real stage does, so an edit there re-runs it.
        type Config = crate::stages::download::DownloadConfig;
        type Metrics = Value;

        fn description(&self) -> &'static str {
            "test stand-in for download"
        }
        fn artifact_file(&self) -> &'static str {
            "download.json"
        }
        fn upstream(&self) -> &[&'static str] {
            &["probe"]
        }
        fn code_version(&self) -> u32 {
            1
        }
        fn run(
            &self,
            _: &crate::stages::download::DownloadConfig,
            _: &mut StageCtx<'_>,
        ) -> anyhow::Result<StageOutput> {
            Ok(StageOutput {
                metrics: json!({"model_dir": "checkpoints/base", "datasets": self.0}),
                ..StageOutput::default()
            })
        }
    }

    /// Writes an MTSamples CSV of 12 cardiology rows to `path`.
    fn write_mtsamples(path: &Path) {
        let mut csv =
            b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
        for i in 0..12 {
            csv.extend_from_slice(format!("\"Visit {i}.\",\" Cardiology\",\"Follow-up {i}\",\"VITALS:, Blood pressure 13{i}/80, pulse 7{i}. Metoprolol {i}5 mg twice daily.\",\"cardiology, metoprolol\"\n").as_bytes());
        }
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, csv).unwrap();
    }

    /// Runs probe → a download listing one dataset (`someone/mtsamples` at `revision`, its
    /// CSV in `<dir>/hub/mt/data/mt.csv`) → prepare with `toml`.
    fn run_with_download(dir: &Path, toml: &str, revision: &str) -> RunReport {
        let ds = dir.join("hub/mt");
        write_mtsamples(&ds.join("data/mt.csv"));
        let datasets = json!([{
            "name": "mt",
            "source": format!("hf-dataset:someone/mtsamples@{revision}"),
            "revision": revision,
            "dir": ds,
            "files": ["README.md", "data/mt.csv"],
        }]);
        let cfg = Config::from_toml(toml, Path::new("test.toml"), &[]).unwrap();
        let ws = Workspace::open(dir).unwrap();
        let p = Pipeline::new(vec![
            Box::new(Probe),
            Box::new(FakeDownload(datasets)),
            Box::new(Prepare::new(&["probe", "download"])),
        ]);
        let opts = RunOptions {
            quiet: true,
            ..RunOptions::default()
        };
        p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap()
    }

    #[test]
    fn a_source_reads_a_downloaded_dataset_named_by_its_hub_id() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"someone/mtsamples\"\n"
        );
        let rep = run_with_download(dir.path(), &toml, "r1");
        assert!(!rep.failed(), "{rep:?}");
        let m = &report(dir.path())["metrics"];
        assert_eq!(m["sources"]["mtsamples"]["read"], 12);
        assert_eq!(m["sources"]["mtsamples"]["kept"], 12);
        let a = report(dir.path());
        assert!(
            a["upstream"].get("download").is_some(),
            "download is hashed into prepare's input: {}",
            a["upstream"]
        );
    }

    #[test]
    fn a_changed_download_re_runs_prepare_and_a_new_revision_redraws_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        // A [download] edit makes download (and so prepare) run again.
        let toml = |download_seed: u32| {
            format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"mt\"\n[download]\nseed = {download_seed}\n")
        };
        assert!(!run_with_download(dir.path(), &toml(1), "r1").failed());
        let rendered =
            |d: &Path| report(d)["metrics"]["render"]["pages_rendered_this_run"].as_u64();

        let rep = run_with_download(dir.path(), &toml(2), "r1");
        let prep = rep.stages.iter().find(|s| s.stage == "prepare").unwrap();
        assert_eq!(prep.action, "ran", "{prep:?}");
        assert!(prep.reason.contains("download"), "{}", prep.reason);
        assert_eq!(
            rendered(dir.path()),
            Some(0),
            "same revision: shards reused"
        );

        assert!(!run_with_download(dir.path(), &toml(3), "r2").failed());
        assert_eq!(
            rendered(dir.path()),
            Some(60),
            "another revision: every page redrawn"
        );
    }

    #[test]
    fn a_dataset_download_json_lacks_fails_naming_it_and_listing_those_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "{SMALL}[[prepare.sources]]\nkind = \"parquet\"\npreset = \"pathvqa\"\ndataset = \"other/pathvqa\"\n"
        );
        let rep = run_with_download(dir.path(), &toml, "r1");
        assert!(rep.failed());
        let err = rep.stages.last().unwrap().error.clone().unwrap();
        assert!(
            err.contains("dataset `other/pathvqa` is not in reports/download.json"),
            "{err}"
        );
        assert!(
            err.contains("`mt` (hf-dataset:someone/mtsamples@r1)"),
            "{err}"
        );
    }

    #[test]
    fn a_dataset_source_without_the_download_stage_or_a_source_without_input_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"mt\"\n");
        let rep = run_in(dir.path(), &toml, &[]);
        let err = rep.stages.last().unwrap().error.clone().unwrap();
        assert!(
            err.contains("dataset `mt` needs the download stage")
                && err.contains("has not completed"),
            "{err}"
        );
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\n");
        let rep = run_in(dir.path(), &toml, &[]);
        let err = rep.stages.last().unwrap().error.clone().unwrap();
        assert!(
            err.contains("source `mtsamples` needs `path` (a local file) or `dataset`"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_source_file_fails_the_stage_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let toml =
            format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\npath = \"nope/mt.csv\"\n");
        let rep = run_in(dir.path(), &toml, &[]);
        assert!(rep.failed());
        let err = rep.stages.last().unwrap().error.clone().unwrap();
        assert!(
            err.contains("opening source `mtsamples`") && err.contains("nope/mt.csv"),
            "{err}"
        );
    }

    #[test]
    fn a_parquet_row_with_corrupt_image_bytes_is_counted_as_decode_error_and_the_stage_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        crate::data::parquet::tests::write_pathvqa(&dir.path().join("pvqa.parquet"));
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"parquet\"\nname = \"pathvqa\"\npreset = \"pathvqa\"\npath = \"pvqa.parquet\"\n");
        let rep = run_in(dir.path(), &toml, &[]);
        assert!(!rep.failed(), "{rep:?}");
        let m = &report(dir.path())["metrics"]["sources"]["pathvqa"];
        assert_eq!(m["read"], 3);
        assert_eq!(m["kept"], 2);
        assert_eq!(m["dropped"]["decode_error"], 1);
    }

    #[test]
    fn oversized_external_images_shrink_to_max_pixels_with_sides_multiple_of_28() {
        assert_eq!(fit_pixels(448, 448, 448 * 448), None);
        let (w, h) = fit_pixels(2000, 1000, 448 * 448).unwrap();
        assert!(w as u64 * h as u64 <= 448 * 448, "{w}x{h}");
        assert_eq!((w % 28, h % 28), (0, 0));
        assert!(
            (w as f64 / h as f64 - 2.0).abs() < 0.1,
            "aspect kept: {w}x{h}"
        );
    }

    #[test]
    fn bad_split_fractions_and_duplicate_source_names_are_refused_when_the_config_loads() {
        let load = |toml: &str, sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Config::from_toml(toml, Path::new("test.toml"), &sets)
                .and_then(|c| crate::stages::check(&c).map(|()| c))
                .unwrap_err()
                .to_string()
        };
        let err = load(SMALL, &["prepare.split.val=0.5"]);
        assert!(
            err.contains("prepare.split = train 0.8 + val 0.5 + test 0.1"),
            "{err}"
        );
        assert!(err.contains("must sum to 1"), "{err}");
        let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"synthetic\"\ncount = 2\n");
        let err = load(&toml, &[]);
        assert!(
            err.contains("prepare.sources[1].name = \"synthetic\""),
            "{err}"
        );
    }
}
