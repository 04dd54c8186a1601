//! Dataset sources (`[[prepare.sources]]`) and the raw items they yield.
//!
//! A source is read as a stream of [`Raw`] items: a document to render, a ready image (VQA
//! datasets), or a row the reader had to reject (with the reason, so it is counted).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::document::{Document, Item};
use super::filter::DropReason;
use super::parquet::{ColumnMap, Preset};
use super::{mtsamples, parquet, synthetic, DataError};

/// One `[[prepare.sources]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The seeded synthetic generator (the default).
    Synthetic {
        /// Name in sample ids, image folders and reports (letters, digits, `_`, `-`).
        #[serde(default = "default_synthetic_name")]
        name: String,
        /// Documents to generate.
        count: usize,
        /// Accept ending with zero samples instead of failing the stage.
        #[serde(default)]
        allow_empty: bool,
    },
    /// An MTSamples-style transcript CSV, rendered to pages.
    Mtsamples {
        /// Name in sample ids, image folders and reports.
        #[serde(default = "default_mtsamples_name")]
        name: String,
        /// The CSV file; relative paths are resolved against the workspace.
        path: PathBuf,
        /// Transcription characters kept per page (cut at a sentence end).
        #[serde(default = "default_max_chars")]
        max_chars: usize,
        /// Rows read at most (0: all).
        #[serde(default)]
        limit: usize,
        /// Accept ending with zero samples instead of failing the stage.
        #[serde(default)]
        allow_empty: bool,
    },
    /// Hugging Face datasets-style parquet shards (a file or a directory of them).
    Parquet {
        /// Name in sample ids, image folders and reports.
        #[serde(default = "default_parquet_name")]
        name: String,
        /// A `.parquet` file or a directory searched for them; relative to the workspace.
        path: PathBuf,
        /// `pathvqa` or `pubmedvision`: the column mapping of that dataset.
        #[serde(default)]
        preset: Option<Preset>,
        /// Column mapping; entries given here override the preset's.
        #[serde(default)]
        columns: ColumnMap,
        /// Folder image paths are relative to (default: the parquet file's folder).
        #[serde(default)]
        image_root: Option<PathBuf>,
        /// Document type recorded for these samples.
        #[serde(default = "default_vqa")]
        doc_type: String,
        /// Rows read at most (0: all).
        #[serde(default)]
        limit: usize,
        /// Accept ending with zero samples instead of failing the stage.
        #[serde(default)]
        allow_empty: bool,
    },
}

fn default_parquet_name() -> String {
    "parquet".into()
}
fn default_vqa() -> String {
    "vqa".into()
}

fn default_mtsamples_name() -> String {
    "mtsamples".into()
}
fn default_max_chars() -> usize {
    700
}

fn default_synthetic_name() -> String {
    synthetic::SOURCE.into()
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Synthetic { name, .. }
            | SourceConfig::Mtsamples { name, .. }
            | SourceConfig::Parquet { name, .. } => name,
        }
    }

    /// The kind, as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Synthetic { .. } => "synthetic",
            SourceConfig::Mtsamples { .. } => "mtsamples",
            SourceConfig::Parquet { .. } => "parquet",
        }
    }

    /// Whether ending with zero samples is allowed.
    pub fn allow_empty(&self) -> bool {
        match self {
            SourceConfig::Synthetic { allow_empty, .. }
            | SourceConfig::Mtsamples { allow_empty, .. }
            | SourceConfig::Parquet { allow_empty, .. } => *allow_empty,
        }
    }

    /// Opens the source for reading; relative paths are resolved against `root`.
    ///
    /// # Errors
    /// A missing or unreadable file, or one without the expected columns.
    pub fn open(
        &self,
        root: &Path,
        seed: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<Raw, DataError>> + Send>, DataError> {
        match self {
            SourceConfig::Synthetic { count, .. } => Ok(Box::new(
                synthetic::documents(seed, *count).map(|d| Ok(Raw::Doc(d))),
            )),
            SourceConfig::Mtsamples {
                path,
                max_chars,
                limit,
                ..
            } => {
                let rows = mtsamples::open(&resolve(root, path), *max_chars)?;
                let limit = if *limit == 0 { usize::MAX } else { *limit };
                Ok(Box::new(rows.take(limit)))
            }
            SourceConfig::Parquet {
                path,
                preset,
                columns,
                image_root,
                doc_type,
                limit,
                ..
            } => {
                let root_dir = image_root.as_ref().map(|p| resolve(root, p));
                let rows = parquet::open(
                    &resolve(root, path),
                    &columns.resolve(*preset),
                    root_dir.as_deref(),
                    doc_type,
                )?;
                let limit = if *limit == 0 { usize::MAX } else { *limit };
                Ok(Box::new(rows.take(limit)))
            }
        }
    }
}

/// Resolves a configured path against the workspace root.
pub fn resolve(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// One item read from a source.
#[derive(Debug, Clone)]
pub enum Raw {
    /// A document to render.
    Doc(Document),
    /// A sample that already has an image (encoded bytes) and an answer.
    Image {
        id: String,
        doc_type: String,
        image: Vec<u8>,
        prompt: String,
        target: String,
        ground_truth: Vec<Item>,
    },
    /// A row the reader could not turn into an item.
    Rejected { reason: DropReason },
}
