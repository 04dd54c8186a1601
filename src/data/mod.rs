//! Training data: clinical documents with exact ground truth, rendered to images, filtered,
//! de-duplicated and split.
//!
//! A [`Document`] is what every source yields: a title, layout blocks (headings, paragraphs,
//! form fields, tables) and the ground-truth items a clinician needs from it. `render` draws
//! it; `sample` turns it into the JSONL row the model trains on; `split` assigns rows to
//! train/val/test.

pub mod document;
pub mod downloaded;
pub mod eval_docs;
pub mod filter;
pub mod mtsamples;
pub mod parquet;
pub mod raw;
pub mod render;
pub mod sample;
pub mod shards;
pub mod source;
pub mod split;
pub mod synthetic;
mod vocab;

pub use document::{Block, DocType, Document, Item, Layout};
pub use raw::Raw;
pub use sample::Sample;

use std::path::PathBuf;

/// Errors reading sources and producing samples.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected columns {expected:?}, found {found:?}")]
    MissingColumns {
        path: PathBuf,
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("evaluation document {name}: {source}")]
    EvalDoc {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("source `{source_name}` needs `path` (a local file) or `dataset` (one the download stage fetched)")]
    NoInput { source_name: String },
    #[error(transparent)]
    Downloaded(#[from] downloaded::DownloadedError),
    #[error("encoding image {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}
