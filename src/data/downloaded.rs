//! Datasets the download stage put on disk, as listed in `reports/download.json`
//! (`metrics.datasets: [{name, source, revision, dir, files}]`, written by
//! `stages::download`), and the lookup a `[[prepare.sources]]` entry's `dataset = ".."` goes
//! through.
//!
//! A source names a dataset either by its `[[download.datasets]]` name or by its hub id
//! (`owner/name`, the `hf-dataset:` source without the prefix and `@revision`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One dataset recorded by the download stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Downloaded {
    /// Its `[[download.datasets]]` name.
    pub name: String,
    /// As configured: `hf-dataset:owner/name[@revision]` or a local directory.
    pub source: String,
    /// The commit a hub dataset resolved to (`None` for a local directory).
    #[serde(default)]
    pub revision: Option<String>,
    /// Directory holding its files: relative to the workspace when inside it, else absolute
    /// (an HF snapshot or a local directory elsewhere).
    pub dir: PathBuf,
    /// Its files, relative to `dir`, `/`-separated.
    #[serde(default)]
    pub files: Vec<String>,
}

impl Downloaded {
    /// The hub id (`owner/name`) of a `hf-dataset:` source, or `None` for a local one.
    pub fn hub_id(&self) -> Option<&str> {
        let rest = self.source.strip_prefix("hf-dataset:")?;
        Some(rest.split('@').next().unwrap_or(rest))
    }

    /// Whether `id` names this dataset (by name or hub id).
    pub fn is(&self, id: &str) -> bool {
        self.name == id || self.hub_id() == Some(id)
    }

    /// The files of this dataset whose name ends with `suffix` (e.g. `.csv`), as absolute
    /// paths, in the order download.json lists them.
    pub fn files_ending(&self, suffix: &str) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|f| f.to_ascii_lowercase().ends_with(suffix))
            .map(|f| self.dir.join(f))
            .collect()
    }
}

/// Why a named dataset could not be found.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DownloadedError {
    #[error("dataset `{id}` needs the download stage's reports/download.json, which has not completed (add it under [[download.datasets]] and run `medpipe run --to download`)")]
    NoDownload { id: String },
    #[error("reports/download.json: `metrics.datasets` is not a list of {{name, source, dir, files}}: {message}")]
    Malformed { message: String },
    #[error("dataset `{id}` is not in reports/download.json (it has: {available}); add it under [[download.datasets]]")]
    NotDownloaded { id: String, available: String },
    #[error("dataset `{id}` ({dir}) has no `{suffix}` file among {files:?}; name one with `path`")]
    NoFile {
        id: String,
        dir: PathBuf,
        suffix: String,
        files: Vec<String>,
    },
    #[error("dataset `{id}` ({dir}) has {n} `{suffix}` files; name one with `path`")]
    Ambiguous {
        id: String,
        dir: PathBuf,
        suffix: String,
        n: usize,
    },
}

/// Reads the dataset list from the download artifact's `metrics` (absent list: none).
///
/// # Errors
/// [`DownloadedError::Malformed`] when `datasets` is there but not the expected shape.
pub fn from_metrics(metrics: &Value) -> Result<Vec<Downloaded>, DownloadedError> {
    match metrics.get("datasets") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => Vec::<Downloaded>::deserialize(v).map_err(|e| DownloadedError::Malformed {
            message: e.to_string(),
        }),
    }
}

/// The dataset `id` names among `datasets`; `None` for `datasets` means the download stage
/// has not completed (or is not part of this pipeline).
///
/// # Errors
/// [`DownloadedError::NoDownload`], or [`DownloadedError::NotDownloaded`] listing what
/// download.json has.
pub fn find<'a>(
    datasets: Option<&'a [Downloaded]>,
    id: &str,
) -> Result<&'a Downloaded, DownloadedError> {
    let Some(datasets) = datasets else {
        return Err(DownloadedError::NoDownload { id: id.into() });
    };
    datasets
        .iter()
        .find(|d| d.is(id))
        .ok_or_else(|| DownloadedError::NotDownloaded {
            id: id.into(),
            available: if datasets.is_empty() {
                "no datasets".into()
            } else {
                datasets
                    .iter()
                    .map(|d| format!("`{}` ({})", d.name, d.source))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// The path a source reads inside dataset `d`: `path` joined to its directory when given,
/// else its only file ending with `suffix` (or its directory when `suffix` is `None`).
///
/// # Errors
/// No file, or several, ending with `suffix` and no `path` to choose.
pub fn path_in(
    d: &Downloaded,
    path: Option<&Path>,
    suffix: Option<&str>,
) -> Result<PathBuf, DownloadedError> {
    if let Some(p) = path {
        return Ok(d.dir.join(p));
    }
    let Some(suffix) = suffix else {
        return Ok(d.dir.clone());
    };
    let mut found = d.files_ending(suffix);
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(DownloadedError::NoFile {
            id: d.name.clone(),
            dir: d.dir.clone(),
            suffix: suffix.into(),
            files: d.files.clone(),
        }),
        n => Err(DownloadedError::Ambiguous {
            id: d.name.clone(),
            dir: d.dir.clone(),
            suffix: suffix.into(),
            n,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metrics() -> Value {
        json!({
            "model_dir": "/m",
            "datasets": [
                {"name": "mt", "source": "hf-dataset:someone/mtsamples@abc", "revision": "abc123",
                 "dir": "/cache/mt", "files": ["README.md", "data/mtsamples.csv"]},
                {"name": "local_pvqa", "source": "/data/pvqa", "revision": null,
                 "dir": "/data/pvqa", "files": ["a.parquet", "b.parquet"]},
            ]
        })
    }

    #[test]
    fn a_dataset_is_found_by_its_download_name_or_its_hub_id() {
        let ds = from_metrics(&metrics()).unwrap();
        assert_eq!(find(Some(&ds), "mt").unwrap().dir, Path::new("/cache/mt"));
        assert_eq!(
            find(Some(&ds), "someone/mtsamples").unwrap().name,
            "mt",
            "the hub id without prefix and revision"
        );
        assert_eq!(find(Some(&ds), "local_pvqa").unwrap().hub_id(), None);
    }

    #[test]
    fn a_missing_dataset_is_named_with_the_list_download_json_has() {
        let ds = from_metrics(&metrics()).unwrap();
        let e = find(Some(&ds), "other/set").unwrap_err().to_string();
        assert!(
            e.contains("dataset `other/set` is not in reports/download.json"),
            "{e}"
        );
        assert!(
            e.contains("`mt` (hf-dataset:someone/mtsamples@abc)") && e.contains("`local_pvqa`"),
            "{e}"
        );
        let e = find(Some(&[]), "x").unwrap_err().to_string();
        assert!(e.contains("it has: no datasets"), "{e}");
        let e = find(None, "x").unwrap_err().to_string();
        assert!(e.contains("has not completed"), "{e}");
    }

    #[test]
    fn the_file_is_the_only_one_with_the_suffix_or_the_given_path() {
        let ds = from_metrics(&metrics()).unwrap();
        assert_eq!(
            path_in(&ds[0], None, Some(".csv")).unwrap(),
            Path::new("/cache/mt/data/mtsamples.csv")
        );
        assert_eq!(
            path_in(&ds[0], Some(Path::new("x.csv")), Some(".csv")).unwrap(),
            Path::new("/cache/mt/x.csv")
        );
        assert_eq!(
            path_in(&ds[1], None, None).unwrap(),
            Path::new("/data/pvqa")
        );
        assert!(matches!(
            path_in(&ds[1], None, Some(".parquet")),
            Err(DownloadedError::Ambiguous { n: 2, .. })
        ));
        assert!(matches!(
            path_in(&ds[1], None, Some(".csv")),
            Err(DownloadedError::NoFile { .. })
        ));
    }

    #[test]
    fn a_download_artifact_without_datasets_has_none_and_a_bad_list_is_an_error() {
        assert!(from_metrics(&json!({"model_dir": "/m"}))
            .unwrap()
            .is_empty());
        assert!(matches!(
            from_metrics(&json!({"datasets": [{"name": 3}]})),
            Err(DownloadedError::Malformed { .. })
        ));
    }
}
