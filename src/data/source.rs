//! Dataset sources (`[[prepare.sources]]`): their configuration, where their input lives,
//! and opening them as a stream of [`Raw`] items (defined in [`super::raw`]).
//!
//! File sources read a local `path`, or a `dataset` the download stage fetched (looked up in
//! `reports/download.json` by its `[[download.datasets]]` name or hub id, see
//! [`super::downloaded`]); then `path`, when given, is relative to that dataset's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::downloaded::{self, Downloaded};
use super::parquet::{ColumnMap, Preset};
use super::{mtsamples, parquet, synthetic, DataError};

// `Raw` lives in `data::raw`; the old path `data::source::Raw` stays valid for callers.
pub use super::raw::Raw;

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
        /// The CSV file; relative paths are resolved against the workspace, or against the
        /// dataset's folder when `dataset` is set (default there: its only `.csv` file).
        #[serde(default)]
        path: Option<PathBuf>,
        /// A dataset from `reports/download.json` (its download name or hub id `owner/name`).
        #[serde(default)]
        dataset: Option<String>,
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
        /// A `.parquet` file or a directory searched for them; relative to the workspace, or
        /// to the dataset's folder when `dataset` is set (default there: the whole folder).
        #[serde(default)]
        path: Option<PathBuf>,
        /// A dataset from `reports/download.json` (its download name or hub id `owner/name`).
        #[serde(default)]
        dataset: Option<String>,
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

    /// The downloaded dataset this source reads, when it names one.
    pub fn dataset(&self) -> Option<&str> {
        match self {
            SourceConfig::Synthetic { .. } => None,
            SourceConfig::Mtsamples { dataset, .. } | SourceConfig::Parquet { dataset, .. } => {
                dataset.as_deref()
            }
        }
    }

    /// The file (or folder) a file source reads: `path` against `root`, or inside its
    /// downloaded dataset. `datasets` is download.json's list (`None`: download has not
    /// completed); `suffix` picks the dataset's only matching file when `path` is absent.
    fn input(
        &self,
        root: &Path,
        path: Option<&Path>,
        datasets: Option<&[Downloaded]>,
        suffix: Option<&str>,
    ) -> Result<PathBuf, DataError> {
        match (self.dataset(), path) {
            (Some(id), path) => Ok(downloaded::path_in(
                downloaded::find(datasets, id)?,
                path,
                suffix,
            )?),
            (None, Some(p)) => Ok(resolve(root, p)),
            (None, None) => Err(DataError::NoInput {
                source_name: self.name().to_string(),
            }),
        }
    }

    /// Opens the source for reading; relative paths are resolved against `root`, datasets
    /// looked up in `datasets` (download.json's list; `None` when download has not completed).
    ///
    /// # Errors
    /// Neither `path` nor `dataset`, a dataset download.json does not have, a missing or
    /// unreadable file, or one without the expected columns.
    pub fn open(
        &self,
        root: &Path,
        seed: u64,
        datasets: Option<&[Downloaded]>,
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
                let file = self.input(root, path.as_deref(), datasets, Some(".csv"))?;
                let rows = mtsamples::open(&file, *max_chars)?;
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
                let input = self.input(root, path.as_deref(), datasets, None)?;
                let rows = parquet::open(
                    &input,
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
