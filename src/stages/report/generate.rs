//! Writing the final report: FINAL_REPORT.json, BENCHMARK_REPORT.md and its charts, as a
//! pure function of the earlier stages' artifacts (plus a `generated_at` timestamp).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::build::{self, FinalReport, Inputs};
use super::markdown;
use crate::charts::{self, Bar, BarChart, Chart, ChartError, LineChart};

use crate::fs::{write_atomic, write_json_atomic, FsError};
use crate::pipeline::UpstreamState;

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
    /// The report as written to FINAL_REPORT.json.
    pub report: FinalReport,
    /// Every file written, absolute.
    pub files: Vec<PathBuf>,
}

/// Reads the earlier stages' artifacts (as the runner hands them to the report stage),
/// writes FINAL_REPORT.json, BENCHMARK_REPORT.md,
/// `pipeline.used.toml` and `charts/*.{png,svg}` there. Missing or failed upstream artifacts
/// are reported, not errors. Equal artifacts and `generated_at` give equal bytes.
///
/// # Errors
/// Drawing or writing a file.
pub fn generate(
    states: &[UpstreamState],
    reports: &Path,
    generated_at: &str,
) -> Result<Generated, ReportError> {
    let inputs = build::read_inputs(states);
    let mut files = Vec::new();
    let mut chart_names = Vec::new();
    let mut chart_warnings = Vec::new();
    for (name, chart) in chart_specs(&inputs) {
        let stem = reports.join(CHARTS_DIR).join(name);
        match charts::render(&chart, &stem) {
            Ok(paths) => {
                for p in paths {
                    if let Some(f) = p.file_name() {
                        chart_names.push(format!("{CHARTS_DIR}/{}", f.to_string_lossy()));
                    }
                    files.push(p);
                }
            }
            // A chart that cannot be drawn is a warning; failing to write one is an error.
            Err(ChartError::Draw { message, .. }) => {
                chart_warnings.push(format!("chart `{name}` could not be drawn: {message}"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut report = build::assemble(&inputs, generated_at, chart_names);
    let (used_config, conflicts) = used_config(&inputs);
    report.warnings.extend(conflicts);
    report.warnings.extend(chart_warnings);

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
                y_from_zero: false,
                ..Default::default()
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
                y_max: Some(100.0),
                ..Default::default()
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
                ..Default::default()
            }),
        ));
    }
    let largest = variants
        .iter()
        .filter_map(|v| build::own_memory(&v.performance))
        .max()
        .unwrap_or(0);
    // GiB for real models, MiB when every bar would read 0.0 GiB (builtin:tiny).
    let (unit, scale) = if largest >= 1 << 30 {
        ("GiB", (1u64 << 30) as f64)
    } else {
        ("MiB", (1u64 << 20) as f64)
    };
    let mem: Vec<Bar> = variants
        .iter()
        .filter_map(|v| {
            build::own_memory(&v.performance).map(|b| Bar {
                label: v.name.clone(),
                value: b as f64 / scale,
                whisker: None,
            })
        })
        .collect();
    if !mem.is_empty() {
        out.push((
            "memory_by_variant",
            Chart::Bars(BarChart {
                title: "Memory by variant (each variant's own load and run)".into(),
                y_label: format!("memory ({unit})"),
                bars: mem,
                ..Default::default()
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
    for entry in &inputs.stages {
        let stage = entry.stage.as_str();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Crafted artifacts (a 7B run on an H100, hand-made figures) and the expected report.
    /// Regenerate the expected files after an intended change with
    /// `UPDATE_GOLDEN=1 cargo test --lib stages::report::generate::tests` and review the diff.
    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/report")
    }

    const STAMP: &str = "2026-11-20T11:00:00Z";

    /// The registry's stages before the report, with their artifacts in `reports` as the
    /// runner would hand them over.
    fn states_in(reports: &Path) -> Vec<UpstreamState> {
        let stages = crate::stages::registry();
        stages[..stages.len() - 1]
            .iter()
            .map(|s| UpstreamState {
                stage: s.name(),
                artifact_file: s.artifact_file(),
                artifact: crate::pipeline::Artifact::read(&reports.join(s.artifact_file()))
                    .map_err(|e| format!("{:#}", anyhow::Error::from(e))),
            })
            .collect()
    }

    fn generate_in(reports: &Path, generated_at: &str) -> Result<Generated, ReportError> {
        generate(&states_in(reports), reports, generated_at)
    }

    /// A workspace `reports/` holding a copy of the crafted artifacts.
    fn crafted_reports() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(golden_dir().join("artifacts")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        dir
    }

    /// Replaces the value of every `generated_at` (JSON) / `Generated at:` (Markdown).
    fn mask_timestamps(text: &str) -> String {
        text.lines()
            .map(|l| {
                if l.trim_start().starts_with("\"generated_at\"") {
                    "  \"generated_at\": \"<masked>\",".to_string()
                } else if l.starts_with("Generated at: ") {
                    let rest = l.split_once(" · ").map(|x| x.1).unwrap_or("");
                    format!("Generated at: <masked> · {rest}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn edit_metrics(path: &Path, f: impl FnOnce(&mut Value)) {
        let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    #[test]
    fn crafted_artifacts_give_the_golden_report() {
        let dir = crafted_reports();
        let g = generate_in(dir.path(), STAMP).unwrap();
        assert_eq!(
            g.report.recommendation.variant.as_deref(),
            Some("nf4+adapter")
        );
        for file in [FINAL_REPORT_FILE, BENCHMARK_REPORT_FILE, USED_CONFIG_FILE] {
            let got = std::fs::read_to_string(dir.path().join(file)).unwrap();
            let want_path = golden_dir().join("expected").join(file);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(want_path.parent().unwrap()).unwrap();
                std::fs::write(&want_path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&want_path).unwrap();
            assert_eq!(
                mask_timestamps(&got),
                mask_timestamps(&want),
                "{file} differs from {}",
                want_path.display()
            );
        }
        for chart in [
            "training_loss",
            "accuracy_by_variant",
            "latency_by_variant",
            "memory_by_variant",
        ] {
            for ext in ["png", "svg"] {
                let rel = format!("{CHARTS_DIR}/{chart}.{ext}");
                assert!(g.report.charts.contains(&rel), "{rel} not listed");
                assert!(dir.path().join(&rel).is_file(), "{rel} not written");
            }
        }
    }

    #[test]
    fn regenerating_gives_the_same_bytes_apart_from_the_timestamp() {
        let a = crafted_reports();
        let b = crafted_reports();
        generate_in(a.path(), STAMP).unwrap();
        let gb = generate_in(b.path(), "2030-01-01T00:00:00Z").unwrap();
        for f in &gb.files {
            let rel = f.strip_prefix(b.path()).unwrap();
            let x = std::fs::read(a.path().join(rel)).unwrap();
            let y = std::fs::read(f).unwrap();
            if rel
                .extension()
                .is_some_and(|e| e == "png" || e == "svg" || e == "toml")
            {
                assert_eq!(x, y, "{} differs", rel.display());
            } else {
                assert_eq!(
                    mask_timestamps(&String::from_utf8(x).unwrap()),
                    mask_timestamps(&String::from_utf8(y).unwrap()),
                    "{} differs",
                    rel.display()
                );
            }
        }
        // And the timestamp is the only difference.
        let json = std::fs::read_to_string(b.path().join(FINAL_REPORT_FILE)).unwrap();
        assert!(json.contains("2030-01-01T00:00:00Z"));
    }

    #[test]
    fn a_fine_tune_worse_than_base_beyond_the_interval_is_flagged() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            v["metrics"]["comparisons"][0]["diff"] =
                serde_json::json!({"value": -0.08, "ci95_low": -0.13, "ci95_high": -0.02});
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        let r = g.report.regression.unwrap();
        assert!(r.regression);
        assert_eq!(r.method, "paired bootstrap of the difference");
        assert!(
            g.report.warnings[0].starts_with("REGRESSION: `nf4+adapter`"),
            "{:?}",
            g.report.warnings
        );
        let md = std::fs::read_to_string(dir.path().join(BENCHMARK_REPORT_FILE)).unwrap();
        assert!(md.contains("**REGRESSION**"));
    }

    #[test]
    fn without_a_paired_comparison_the_candidate_interval_decides_the_flag() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            v["metrics"]["comparisons"] = serde_json::json!([]);
            // Adapter's interval [0.60, 0.64] stays below base's 0.65.
            v["metrics"]["variants"][2]["scores"]["overall"]["combined"] =
                serde_json::json!({"value": 0.62, "ci95_low": 0.60, "ci95_high": 0.64});
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        let r = g.report.regression.unwrap();
        assert_eq!(r.method, "interval of the candidate");
        assert!(r.regression, "{r:?}");
        assert_ne!(
            g.report.recommendation.variant.as_deref(),
            Some("nf4+adapter")
        );
    }

    #[test]
    fn missing_and_failed_upstream_stages_are_reported_not_fatal() {
        let dir = crafted_reports();
        std::fs::remove_file(dir.path().join("training_metrics.json")).unwrap();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            v["status"] = "failed".into();
            v["metrics"] = Value::Null;
            v["error"] = serde_json::json!({"message": "evaluating nf4+adapter", "causes": ["CUDA out of memory"]});
        });
        std::fs::write(dir.path().join("quantize.json"), b"{ truncated").unwrap();
        let g = generate_in(dir.path(), STAMP).unwrap();
        let status = |s: &str| {
            g.report
                .stages
                .iter()
                .find(|e| e.stage == s)
                .map(|e| (e.status.clone(), e.error.clone()))
                .unwrap()
        };
        assert_eq!(status("train").0, "not run");
        let (st, err) = status("evaluate");
        assert_eq!(st, "failed");
        assert_eq!(
            err.as_deref(),
            Some("evaluating nf4+adapter: CUDA out of memory")
        );
        let (st, err) = status("quantize");
        assert_eq!(st, "unreadable");
        assert!(err.unwrap().contains("quantize.json"));
        assert_eq!(g.report.recommendation.variant, None);
        assert!(g.report.recommendation.reasons[0].contains("evaluate stage failed"));
        let md = std::fs::read_to_string(dir.path().join(BENCHMARK_REPORT_FILE)).unwrap();
        assert!(md.contains("| train | not run |"), "{md}");
        assert!(md.contains("| evaluate | failed |"));
        assert!(md.contains("CUDA out of memory"));
        // Without training or evaluation there is no loss or accuracy chart.
        assert!(!g.report.charts.iter().any(|c| c.contains("training_loss")));
        assert!(!g.report.charts.iter().any(|c| c.contains("accuracy")));
    }

    #[test]
    fn a_variant_within_the_noise_of_the_best_wins_on_memory() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            let vs = &mut v["metrics"]["variants"];
            // base is best at 0.82; nf4+adapter's interval reaches 0.82 and it needs
            // 6.80 GiB against base's 16 GiB; nf4's interval does not reach it.
            vs[0]["scores"]["overall"]["combined"] =
                serde_json::json!({"value": 0.82, "ci95_low": 0.76, "ci95_high": 0.88});
            vs[2]["scores"]["overall"]["combined"] =
                serde_json::json!({"value": 0.80, "ci95_low": 0.74, "ci95_high": 0.86});
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        let rec = &g.report.recommendation;
        assert_eq!(rec.variant.as_deref(), Some("nf4+adapter"));
        assert!(
            rec.reasons[0].contains("within the noise of the most accurate variant `base`"),
            "{:?}",
            rec.reasons
        );
        assert!(
            rec.reasons[0]
                .contains("5.40 GiB of weights (process peak 6.80 GiB) vs 15.45 GiB of weights"),
            "{:?}",
            rec.reasons
        );
    }

    #[test]
    fn weight_bytes_not_the_shared_process_peak_decide_between_tied_variants() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            let vs = &mut v["metrics"]["variants"];
            // All three within the noise; one process ran them all, so the peak RSS is the
            // same high-water mark for each.
            for i in 0..3 {
                vs[i]["scores"]["overall"]["combined"] =
                    serde_json::json!({"value": 0.80, "ci95_low": 0.74, "ci95_high": 0.86});
                vs[i]["performance"]["peak_memory_bytes"] = 17179869184u64.into();
            }
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        // nf4 holds the fewest weight bytes (5.25 GiB against 5.40 and 15.45).
        assert_eq!(g.report.recommendation.variant.as_deref(), Some("nf4"));
    }

    #[test]
    fn issue_15_each_variants_own_measured_memory_decides_between_tied_variants_and_is_charted() {
        let dir = crafted_reports();
        let gib = 1u64 << 30;
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            let vs = &mut v["metrics"]["variants"];
            // All within the noise. On disk nf4 is smallest, but measured per variant
            // nf4+adapter holds the least (resident weights, peak of its own load and run).
            for (i, (resident, peak)) in [(15, 16), (6, 7), (5, 5)].into_iter().enumerate() {
                vs[i]["scores"]["overall"]["combined"] =
                    serde_json::json!({"value": 0.80, "ci95_low": 0.74, "ci95_high": 0.86});
                let p = &mut vs[i]["performance"];
                p["weights_resident_bytes"] = (resident * gib).into();
                p["rss_delta_bytes"] = (peak * gib).into();
                p["peak_memory_bytes"] = (peak * gib).into();
            }
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        let rec = &g.report.recommendation;
        assert_eq!(rec.variant.as_deref(), Some("nf4+adapter"), "{rec:?}");
        assert!(
            rec.reasons
                .iter()
                .any(|r| r.contains("7.00 GiB (weights resident 6.00 GiB)")),
            "{:?}",
            rec.reasons
        );
        let md = std::fs::read_to_string(dir.path().join(BENCHMARK_REPORT_FILE)).unwrap();
        assert!(
            md.contains("| nf4 | f32 | 5.25 GiB | 6.00 GiB | 7.00 GiB | 7.00 GiB |"),
            "{md}"
        );
        let svg =
            std::fs::read_to_string(dir.path().join(CHARTS_DIR).join("memory_by_variant.svg"))
                .unwrap();
        assert!(svg.contains("own load and run"), "{svg}");
    }

    #[test]
    fn issue_15_the_reproduce_block_asks_status_about_the_repro_workspace() {
        let dir = crafted_reports();
        let g = generate_in(dir.path(), STAMP).unwrap();
        let last = g.report.reproduce.last().unwrap();
        assert_eq!(last, "./target/release/medpipe status --workspace repro");
        assert!(g
            .report
            .reproduce
            .iter()
            .any(|c| c.contains("run --config") && c.contains("--workspace repro")));
        let md = std::fs::read_to_string(dir.path().join(BENCHMARK_REPORT_FILE)).unwrap();
        assert!(md.contains("medpipe status --workspace repro"), "{md}");
    }

    #[test]
    fn when_no_variant_extracts_anything_nothing_is_recommended() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("evaluation.json"), |v| {
            for i in 0..3 {
                v["metrics"]["variants"][i]["scores"]["overall"]["combined"] =
                    serde_json::json!({"value": 0.0, "ci95_low": 0.0, "ci95_high": 0.0});
            }
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        // the accuracy axis is in percent: it runs to 100 even when every bar is 0
        let svg =
            std::fs::read_to_string(dir.path().join(CHARTS_DIR).join("accuracy_by_variant.svg"))
                .unwrap();
        assert!(
            svg.contains("\n100\n") || svg.contains("\n100.0\n"),
            "{svg}"
        );
        assert!(!svg.contains("\n1.0\n") && !svg.contains("\n0.5\n"));
        // zero-width intervals are called what they are, not "up to 0.0 points wide"
        let small = g
            .report
            .warnings
            .iter()
            .find(|w| w.starts_with("small test set"))
            .expect("a small-test-set warning");
        assert!(
            small.contains("zero width") && !small.contains("0.0 points"),
            "{small}"
        );
        let rec = &g.report.recommendation;
        assert_eq!(rec.variant, None);
        assert!(
            rec.reasons[0].contains("no variant extracted a single term"),
            "{:?}",
            rec.reasons
        );
    }

    #[test]
    fn degenerate_charts_draw_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            Chart::Bars(BarChart {
                title: "none".into(),
                y_label: "y".into(),
                bars: vec![],
                ..Default::default()
            }),
            Chart::Bars(BarChart {
                title: "zero".into(),
                y_label: "y".into(),
                bars: vec![Bar {
                    label: "a".into(),
                    value: 0.0,
                    whisker: Some((0.0, 0.0)),
                }],
                ..Default::default()
            }),
            Chart::Lines(LineChart {
                title: "one point".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                series: vec![("s".into(), vec![(1.0, 1.0)])],
                y_from_zero: true,
                ..Default::default()
            }),
        ];
        for (i, c) in cases.iter().enumerate() {
            charts::render(c, &dir.path().join(format!("c{i}"))).unwrap();
        }
    }

    #[test]
    fn the_reproduce_config_drops_nulls_and_warns_on_disagreeing_sections() {
        let dir = crafted_reports();
        edit_metrics(&dir.path().join("dataset.json"), |v| {
            v["config"]["model"] = serde_json::json!({"source": "builtin:tiny"});
            v["config"]["prepare"]["max_records"] = Value::Null;
        });
        let g = generate_in(dir.path(), STAMP).unwrap();
        let toml_text = std::fs::read_to_string(dir.path().join(USED_CONFIG_FILE)).unwrap();
        assert!(!toml_text.contains("max_records"), "{toml_text}");
        // Stage order decides: evaluate (after prepare) recorded the 7B source last.
        assert!(toml_text.contains("source = \"hf:Qwen/Qwen2.5-VL-7B-Instruct\""));
        assert!(
            g.report
                .warnings
                .iter()
                .any(|w| w.contains("config section `model` differs")),
            "{:?}",
            g.report.warnings
        );
    }

    #[test]
    fn an_empty_reports_directory_still_gives_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate_in(dir.path(), STAMP).unwrap();
        assert!(g.report.stages.iter().all(|s| s.status == "not run"));
        assert!(g.report.charts.is_empty());
        assert!(dir.path().join(BENCHMARK_REPORT_FILE).is_file());
    }
}
