//! Writing a benchmark result: `X.json`, the Markdown table `X.md` beside it, and the charts
//! `X_latency.{png,svg}` and `X_batch_sweep.{png,svg}`, all atomically.

use std::path::{Path, PathBuf};

use crate::bench::charts::write_charts;
use crate::bench::markdown::{community_rows, results_table, COMMUNITY_HEADER};
use crate::bench::schema::BenchResult;
use crate::charts::ChartError;
use crate::fs::{write_atomic, write_json_atomic, FsError};

/// Errors writing benchmark outputs.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Chart(#[from] ChartError),
}

/// The Markdown file: the results table, then the community row(s) under their header.
pub fn markdown_document(r: &BenchResult) -> String {
    format!(
        "{}\nCommunity results row(s):\n\n{}\n{}\n",
        results_table(r),
        COMMUNITY_HEADER,
        community_rows(r)
    )
}

/// Writes `json` (the result), the `.md` beside it and the charts; returns every path.
///
/// # Errors
/// Writing any file or drawing a chart.
pub fn write_result(r: &BenchResult, json: &Path) -> Result<Vec<PathBuf>, OutputError> {
    write_json_atomic(json, r)?;
    let md = json.with_extension("md");
    write_atomic(&md, markdown_document(r).as_bytes())?;
    let mut out = vec![json.to_path_buf(), md];
    out.extend(write_charts(r, &json.with_extension(""))?);
    Ok(out)
}
