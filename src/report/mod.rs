//! The final report: FINAL_REPORT.json, BENCHMARK_REPORT.md and its charts, as a pure
//! function of the stage artifacts in `reports/` (plus a `generated_at` timestamp).
//!
//! `inputs` holds the metrics layouts the stages write; `build` reads the artifacts and
//! decides the recommendation, regression flag and warnings; `markdown` and `charts` render.

pub mod build;
pub mod charts;
pub mod inputs;
pub mod markdown;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use build::{FinalReport, Inputs};
use charts::{Bar, BarChart, Chart, ChartError, LineChart};

use crate::pipeline::fs::{write_atomic, write_json_atomic, FsError};

/// FINAL_REPORT.json, in `reports/`.
pub const FINAL_REPORT_FILE: &str = "FINAL_REPORT.json";
/// BENCHMARK_REPORT.md, in `reports/`.
pub const BENCHMARK_REPORT_FILE: &str = "BENCHMARK_REPORT.md";
/// Charts folder, in `reports/`.
pub const CHARTS_DIR: &str = "charts";
/// The config rebuilt from the artifacts, in `reports/`.
pub const USED_CONFIG_FILE: &str = "pipeline.used.toml";
/// The same, relative to the workspace (as the reproduce commands name it).
pub const USED_CONFIG_FILE_REL: &str = "reports/pipeline.used.toml";

/// Errors generating the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Chart(#[from] ChartError),
    #[error(transparent)]
    Write(#[from] FsError),
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Generated {
    pub report: FinalReport,
    /// Every file written, absolute.
    pub files: Vec<PathBuf>,
}

/// Reads the artifacts in `reports`, writes FINAL_REPORT.json, BENCHMARK_REPORT.md,
/// `pipeline.used.toml` and `charts/*.{png,svg}` there. Missing or failed upstream artifacts
/// are reported, not errors. Equal artifacts and `generated_at` give equal bytes.
///
/// # Errors
/// Drawing or writing a file.
pub fn generate(reports: &Path, generated_at: &str) -> Result<Generated, ReportError> {
    let inputs = build::read_inputs(reports);
    let mut files = Vec::new();
    let mut chart_names = Vec::new();
    for (name, chart) in chart_specs(&inputs) {
        let stem = reports.join(CHARTS_DIR).join(name);
        for p in charts::render(&chart, &stem)? {
            if let Some(f) = p.file_name() {
                chart_names.push(format!("{CHARTS_DIR}/{}", f.to_string_lossy()));
            }
            files.push(p);
        }
    }
    let report = build::assemble(&inputs, generated_at, chart_names);
    let (used_config, conflicts) = used_config(&inputs);
    let mut report = report;
    report.warnings.extend(conflicts);

    let json_path = reports.join(FINAL_REPORT_FILE);
    write_json_atomic(&json_path, &report)?;
    files.push(json_path);
    let cfg_path = reports.join(USED_CONFIG_FILE);
    write_atomic(&cfg_path, used_config.as_bytes())?;
    files.push(cfg_path);
    let md_path = reports.join(BENCHMARK_REPORT_FILE);
    write_atomic(
        &md_path,
        markdown::render(&report, &inputs, &used_config).as_bytes(),
    )?;
    files.push(md_path);
    Ok(Generated { report, files })
}

/// The charts the inputs allow, by file stem: training loss, then accuracy, latency and
/// memory by variant. A chart whose figures no stage produced is left out.
fn chart_specs(inputs: &Inputs) -> Vec<(&'static str, Chart)> {
    let mut out = Vec::new();
    if let Some(t) = inputs.training.as_ref().filter(|t| !t.steps.is_empty()) {
        let mut series = vec![(
            "train".to_string(),
            t.steps.iter().map(|s| (s.step as f64, s.loss)).collect(),
        )];
        if !t.val.is_empty() {
            series.push((
                "validation".to_string(),
                t.val.iter().map(|v| (v.step as f64, v.loss)).collect(),
            ));
        }
        out.push((
            "training_loss",
            Chart::Lines(LineChart {
                title: "Training loss".into(),
                x_label: "optimizer step".into(),
                y_label: "cross-entropy (nats)".into(),
                series,
            }),
        ));
    }
    let variants = build::variant_rows(inputs);
    let acc: Vec<Bar> = variants
        .iter()
        .filter_map(|v| {
            v.combined.map(|c| Bar {
                label: v.name.clone(),
                value: 100.0 * c.value,
                whisker: Some((100.0 * c.ci95_low, 100.0 * c.ci95_high)),
            })
        })
        .collect();
    if !acc.is_empty() {
        out.push((
            "accuracy_by_variant",
            Chart::Bars(BarChart {
                title: "Combined accuracy by variant (95% CI)".into(),
                y_label: "combined accuracy (%)".into(),
                bars: acc,
            }),
        ));
    }
    let lat: Vec<Bar> = variants
        .iter()
        .filter_map(|v| {
            v.performance.latency_ms.as_ref().map(|l| Bar {
                label: v.name.clone(),
                value: l.p50_ms,
                whisker: Some((l.p50_ms, l.p95_ms)),
            })
        })
        .collect();
    if !lat.is_empty() {
        out.push((
            "latency_by_variant",
            Chart::Bars(BarChart {
                title: "Latency per document by variant (p50, whisker to p95)".into(),
                y_label: "latency (ms)".into(),
                bars: lat,
            }),
        ));
    }
    let mem: Vec<Bar> = variants
        .iter()
        .filter_map(|v| {
            v.performance.peak_memory_bytes.map(|b| Bar {
                label: v.name.clone(),
                value: b as f64 / (1u64 << 30) as f64,
                whisker: None,
            })
        })
        .collect();
    if !mem.is_empty() {
        out.push((
            "memory_by_variant",
            Chart::Bars(BarChart {
                title: "Peak memory by variant".into(),
                y_label: "peak memory (GiB)".into(),
                bars: mem,
            }),
        ));
    }
    out
}

/// The pipeline config as the artifacts recorded it, as TOML (sections sorted; `null`
/// values, which TOML cannot express, left out so their defaults apply), plus a warning
/// for each section two artifacts recorded differently (the later stage's wins).
fn used_config(inputs: &Inputs) -> (String, Vec<String>) {
    let mut table = toml::Table::new();
    let mut seen: Vec<(String, String, Value)> = Vec::new();
    let mut conflicts = Vec::new();
    for (stage, _) in build::STAGES {
        let Some(a) = inputs.artifacts.get(stage) else {
            continue;
        };
        let Value::Object(sections) = &a.config else {
            continue;
        };
        for (name, v) in sections {
            if let Some((_, first, old)) = seen.iter().find(|(n, _, _)| n == name) {
                if old != v {
                    conflicts.push(format!(
                        "config section `{name}` differs between the artifacts of `{first}` and `{stage}`; the reproduce config uses `{stage}`'s"
                    ));
                }
            }
            seen.retain(|(n, _, _)| n != name);
            seen.push((name.clone(), stage.to_string(), v.clone()));
            if let Some(t) = json_to_toml(v) {
                table.insert(name.clone(), t);
            }
        }
    }
    let text = toml::to_string(&table).unwrap_or_default();
    (text, conflicts)
}

fn json_to_toml(v: &Value) -> Option<toml::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        Value::Object(m) => toml::Value::Table(
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), json_to_toml(v)?)))
                .collect(),
        ),
    })
}
