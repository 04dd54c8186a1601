//! What `medpipe serve` serves: a checkpoint named on the command line, or a workspace's
//! variant (the one FINAL_REPORT.json recommends, or the one `--variant` names), found the way
//! the evaluate stage found it; and the workspace figures `/v1/benchmark` returns.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::pipeline::artifact::{Artifact, Status};
use crate::stages::download::DownloadMetrics;
use crate::stages::evaluate::{plan_variants, EvaluateConfig, UpstreamView, Variant};
use crate::stages::quantize::QuantizeMetrics;
use crate::stages::train::TrainingMetrics;

/// The FINAL_REPORT.json of a workspace, relative to its root.
pub const FINAL_REPORT: &str = "reports/FINAL_REPORT.json";

/// Where the model to serve is.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// How the user named it (`builtin:tiny`, a directory, `workspace W, variant nf4`).
    pub label: String,
    /// `base`, `nf4`, `nf4+adapter`, or `custom` for a checkpoint given with `--model`.
    pub variant: String,
    /// Why this one: the report's recommendation, or the flag.
    pub reason: String,
    pub model_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    /// Where the tokenizer and image processor are (a workspace's base checkpoint: the NF4
    /// directory holds only weights).
    pub encoder_dir: PathBuf,
}

/// Why no model could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Model(#[from] crate::bench::source::SourceError),
    #[error("{path} not found: run `medpipe run` in the workspace first, or serve a checkpoint with --model")]
    NoReport { path: PathBuf },
    #[error("{path}: {reason}")]
    Report { path: PathBuf, reason: String },
    #[error(
        "{path} recommends no variant ({reasons}); pick one with --variant base|nf4|nf4+adapter"
    )]
    NoRecommendation { path: PathBuf, reasons: String },
    #[error("unknown variant `{0}` (expected base, nf4 or nf4+adapter)")]
    UnknownVariant(String),
    #[error("variant `{variant}` cannot be served from workspace {workspace}: {why}")]
    Unavailable {
        variant: String,
        workspace: PathBuf,
        why: String,
    },
}

/// A checkpoint named on the command line (`DIR` or `builtin:tiny`), with an optional adapter.
///
/// # Errors
/// As [`crate::bench::source::resolve_model`].
pub fn from_model(model: &str, adapter: Option<PathBuf>) -> Result<ModelChoice, SourceError> {
    let dir = crate::bench::source::resolve_model(model, 0)?;
    Ok(ModelChoice {
        label: model.to_string(),
        variant: if adapter.is_some() {
            "custom+adapter".into()
        } else {
            "custom".into()
        },
        reason: "named with --model".into(),
        encoder_dir: dir.clone(),
        model_dir: dir,
        adapter_dir: adapter,
    })
}

/// The workspace's variant `variant`, or, when `None`, the one its FINAL_REPORT.json
/// recommends.
///
/// # Errors
/// No report, no recommendation and no `--variant`, an unknown variant, or one whose stage
/// has not completed.
pub fn from_workspace(ws: &Path, variant: Option<&str>) -> Result<ModelChoice, SourceError> {
    let report_path = ws.join(FINAL_REPORT);
    let (name, reason) = match variant {
        Some(v) => (v.to_string(), "named with --variant".to_string()),
        None => {
            let report = read_json(&report_path)?;
            let rec = report
                .get("recommendation")
                .ok_or_else(|| SourceError::Report {
                    path: report_path.clone(),
                    reason: "no `recommendation`".into(),
                })?;
            let reasons = rec
                .get("reasons")
                .and_then(Value::as_array)
                .map(|r| {
                    r.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            match rec.get("variant").and_then(Value::as_str) {
                Some(v) => (
                    v.to_string(),
                    format!("recommended by {FINAL_REPORT}: {reasons}"),
                ),
                None => {
                    return Err(SourceError::NoRecommendation {
                        path: report_path,
                        reasons,
                    })
                }
            }
        }
    };
    let wanted = Variant::ALL
        .into_iter()
        .find(|v| v.name() == name)
        .ok_or_else(|| SourceError::UnknownVariant(name.clone()))?;
    let unavailable = |why: String| SourceError::Unavailable {
        variant: name.clone(),
        workspace: ws.to_path_buf(),
        why,
    };
    let download: Option<DownloadMetrics> = completed_metrics(ws, "download")?;
    let download =
        download.ok_or_else(|| unavailable("the download stage has not completed".into()))?;
    let quantize: Option<QuantizeMetrics> = completed_metrics(ws, "quantize")?;
    let train: Option<TrainingMetrics> = completed_metrics(ws, "train")?;
    let resolve = |p: &str| ws.join(p);
    let base_dir = resolve(&download.model_dir);
    let plans = plan_variants(
        &EvaluateConfig::default(),
        &UpstreamView {
            registered: &["download", "quantize", "train"],
            download: Some(download),
            quantize,
            train,
            resolve: &resolve,
        },
    );
    let plan = plans
        .into_iter()
        .find(|p| p.variant == wanted)
        .ok_or_else(|| unavailable("no plan".into()))?;
    let src = plan.source.map_err(unavailable)?;
    Ok(ModelChoice {
        label: format!("workspace {}, variant {name}", ws.display()),
        variant: name,
        reason,
        model_dir: src.model_dir,
        adapter_dir: src.adapter_dir,
        encoder_dir: base_dir,
    })
}

/// The metrics of `stage`'s artifact in `ws` when it completed.
fn completed_metrics<M: serde::de::DeserializeOwned>(
    ws: &Path,
    stage: &str,
) -> Result<Option<M>, SourceError> {
    let Some(file) = crate::stages::pipeline()
        .stages()
        .find(|s| s.name() == stage)
        .map(|s| s.artifact_file())
    else {
        return Ok(None);
    };
    let path = ws.join("reports").join(file);
    let artifact = Artifact::read(&path).map_err(|e| SourceError::Report {
        path: path.clone(),
        reason: format!("{:#}", anyhow::Error::new(e)),
    })?;
    match artifact {
        Some(a) if a.status == Status::Completed => serde_json::from_value(a.metrics)
            .map(Some)
            .map_err(|e| SourceError::Report {
                path,
                reason: format!("its metrics do not read: {e}"),
            }),
        _ => Ok(None),
    }
}

fn read_json(path: &Path) -> Result<Value, SourceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::NoReport {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(SourceError::Report {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    serde_json::from_str(&text).map_err(|e| SourceError::Report {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })
}

/// The figures `/v1/benchmark` returns: FINAL_REPORT.json's variants, recommendation and
/// warnings, and the baseline stage's benchmark metrics, as the workspace holds them.
///
/// # Errors
/// No FINAL_REPORT.json, or one that does not parse.
pub fn workspace_figures(ws: &Path) -> Result<Value, SourceError> {
    let report = read_json(&ws.join(FINAL_REPORT))?;
    let pick = |k: &str| report.get(k).cloned().unwrap_or(Value::Null);
    let baseline = Artifact::read(&ws.join("reports/baseline.json"))
        .ok()
        .flatten()
        .filter(|a| a.status == Status::Completed)
        .map_or(Value::Null, |a| a.metrics);
    Ok(serde_json::json!({
        "workspace": ws.display().to_string(),
        "generated_at": pick("generated_at"),
        "device": pick("device"),
        "recommendation": pick("recommendation"),
        "variants": pick("variants"),
        "regression": pick("regression"),
        "warnings": pick("warnings"),
        "baseline_bench": baseline,
    }))
}
