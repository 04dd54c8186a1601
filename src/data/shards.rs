//! Resumable shards of prepared samples: each source is filtered, de-duplicated and rendered
//! in shards, and a finished shard is recorded in a manifest so an interrupted run reuses it.
//!
//! A shard's images are written through a temp file and a rename (no fsync per page: that
//! cost more than drawing it), then its manifest atomically with fsync, recording every
//! image's sha256. [`reuse`] accepts a manifest only when every image still has the recorded
//! hash, so neither a kill -9 nor a power loss makes a half-written page count as done; any
//! other shard is rebuilt by [`build`], identically, since every document, render and
//! degradation is seeded.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::filter::{
    check_image, check_text, content_hash, Dedup, DropReason, FilterConfig, Tally,
};
use crate::data::render::{self, encode_png, RenderConfig, RenderError};
use crate::data::sample::{target_json, Sample, PROMPT};
use crate::data::source::Raw;
use crate::data::Document;
use crate::fs::{hash_file, sha256_hex, write_atomic, write_replace, FsError};

/// Errors building or recording a shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A page or an external image that does not encode as PNG (`image` is its
    /// workspace-relative path).
    #[error("encoding {image}")]
    Encode {
        image: String,
        #[source]
        source: image::ImageError,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Manifest(#[from] serde_json::Error),
}

/// A completed shard, as stored in its manifest.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardManifest {
    /// What the shard read, kept and dropped.
    pub tally: Tally,
    /// Content hashes (hex) of every item that passed the text filters, in order, so a
    /// reused shard feeds de-duplication exactly as a rebuilt one would.
    pub hashes: Vec<String>,
    /// The kept samples, in order.
    pub samples: Vec<Sample>,
    /// sha256 (hex) of each sample's image file, in the order of `samples`.
    pub image_sha256: Vec<String>,
    /// Degradation names applied, counted.
    pub degradations: BTreeMap<String, u64>,
}

impl ShardManifest {
    /// Offers the shard's content hashes to `dedup`, so later shards and sources see them as
    /// taken whether this shard was reused or rebuilt.
    pub fn feed(&self, dedup: &mut Dedup) {
        for h in &self.hashes {
            if let Ok(bytes) = hex::decode(h) {
                if let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) {
                    dedup.first(arr);
                }
            }
        }
    }
}

/// What decides a shard's contents besides its items (the `[prepare]` settings it uses).
#[derive(Debug, Clone, Copy)]
pub struct ShardSettings<'a> {
    /// Seed of every page's degradations.
    pub seed: u64,
    /// Page rendering.
    pub render: &'a RenderConfig,
    /// Sample filters.
    pub filters: &'a FilterConfig,
}

/// A complete shard manifest whose images all exist with their recorded hashes, or `None`
/// (then the shard is rebuilt).
pub fn reuse(path: &Path, root: &Path) -> Option<ShardManifest> {
    let bytes = std::fs::read(path).ok()?;
    let m: ShardManifest = serde_json::from_slice(&bytes).ok()?;
    (m.samples.len() == m.image_sha256.len()
        && m.samples
            .par_iter()
            .zip(&m.image_sha256)
            .all(|(s, want)| hash_file(&root.join(&s.image)).is_ok_and(|(got, _)| &got == want)))
    .then_some(m)
}

/// Records a built shard: its manifest, atomically and with fsync, after its images.
///
/// # Errors
/// Writing the manifest (full disk, permissions).
pub fn write_manifest(path: &Path, manifest: &ShardManifest) -> Result<(), ShardError> {
    let text = serde_json::to_vec(manifest)?;
    write_atomic(path, &text)?;
    Ok(())
}

/// The degradation seed of one page.
pub fn page_seed(seed: u64, source: &str, id: &str) -> u64 {
    let h = content_hash(&[&seed.to_le_bytes(), source.as_bytes(), id.as_bytes()]);
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes of a 32-byte hash"))
}

/// The sample of a rendered document whose page image is at `image` (workspace-relative).
pub fn to_sample(source: &str, doc: &Document, image: String) -> Sample {
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
///
/// # Errors
/// An image that does not encode, or a page that cannot be written.
pub fn build(
    cfg: ShardSettings<'_>,
    source: &str,
    raws: Vec<Raw>,
    root: &Path,
    dedup: &mut Dedup,
) -> Result<ShardManifest, ShardError> {
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
                        check_text(&text, &target, cfg.filters)
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
                check_text(prompt, target, cfg.filters),
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

    let results: Vec<Result<ShardItem, ShardError>> = pending
        .into_par_iter()
        .map(|p| match p {
            Pending::Dropped(r) => Ok(Err(r)),
            Pending::Render(doc) => render_page(cfg, source, doc, root),
            Pending::Image(raw) => import_image(cfg, source, raw, root),
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

/// Renders one document's page and writes it, or says why the page is dropped.
fn render_page(
    cfg: ShardSettings<'_>,
    source: &str,
    doc: Document,
    root: &Path,
) -> Result<ShardItem, ShardError> {
    let rel = format!("data/images/{source}/{}.png", doc.id);
    match render::render(&doc, cfg.render, page_seed(cfg.seed, source, &doc.id)) {
        Err(RenderError::TooLarge { .. }) => Ok(Err(DropReason::ImageTooLarge)),
        Ok(r) => {
            if let Err(reason) = check_image(r.image.width(), r.image.height(), cfg.filters) {
                return Ok(Err(reason));
            }
            let png = match encode_png(&r.image) {
                Ok(png) => png,
                Err(source) => return Err(ShardError::Encode { image: rel, source }),
            };
            write_replace(&root.join(&rel), &png)?;
            let sha = sha256_hex(&png);
            Ok(Ok((to_sample(source, &doc, rel), sha, r.degradations)))
        }
    }
}

/// Checks, shrinks to fit and writes one external image (photographs and slides keep their
/// colour), or says why it is dropped.
fn import_image(
    cfg: ShardSettings<'_>,
    source: &str,
    raw: Raw,
    root: &Path,
) -> Result<ShardItem, ShardError> {
    let Raw::Image {
        id,
        doc_type,
        image,
        prompt,
        target,
        ground_truth,
    } = raw
    else {
        return Ok(Err(DropReason::EmptyText));
    };
    let decoded = match image::load_from_memory(&image) {
        Ok(img) => img,
        Err(_) => return Ok(Err(DropReason::DecodeError)),
    };
    if let Err(reason) = check_image(decoded.width(), decoded.height(), cfg.filters) {
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
    let decoded = match fit_pixels(decoded.width(), decoded.height(), cfg.render.max_pixels) {
        Some((w, h)) => decoded.resize_exact(w, h, image::imageops::FilterType::Triangle),
        None => decoded,
    };
    // Photographs and slides keep their colour (pages are grayscale).
    let mut png = Vec::new();
    if let Err(source) =
        decoded.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    {
        return Err(ShardError::Encode { image: rel, source });
    }
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

/// The size an image of `w`×`h` is shrunk to so it holds at most `max_pixels` (sides
/// multiples of 28, aspect kept), or `None` when it already fits.
pub fn fit_pixels(w: u32, h: u32, max_pixels: u64) -> Option<(u32, u32)> {
    if (w as u64) * (h as u64) <= max_pixels {
        return None;
    }
    let m = render::SIDE_MULTIPLE as f64;
    let scale = (max_pixels as f64 / (w as f64 * h as f64)).sqrt();
    let side = |v: u32| (((v as f64 * scale) / m).floor().max(1.0) * m) as u32;
    Some((side(w), side(h)))
}
