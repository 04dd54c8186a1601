//! report: turns every earlier stage's artifact into FINAL_REPORT.json,
//! BENCHMARK_REPORT.md and charts in `reports/`.
//!
//! `inputs` lists the metrics layouts it reads (each owned by its stage); `build` decides
//! the recommendation, regression flag and warnings; `markdown` and `crate::charts` render;
//! `generate` writes the files.
//!
//! It runs whatever upstream completed: each earlier stage is an *optional* upstream, so a
//! missing or failed stage shows in the report as "not run" or "failed: <error>" instead of
//! stopping it. The report reads the artifacts by file name, including failed ones, which the
//! runner does not hand to stages.

use anyhow::Context;
pub mod build;
mod generate;
pub mod inputs;
mod markdown;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::pipeline::{NoConfig, Stage, StageCtx, StageOutput};
pub use build::{FinalReport, Inputs};
pub use generate::{
    generate, Generated, ReportError, BENCHMARK_REPORT_FILE, CHARTS_DIR, FINAL_REPORT_FILE,
    USED_CONFIG_FILE, USED_CONFIG_FILE_REL,
};

/// What the report stage records: the headline of FINAL_REPORT.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportMetrics {
    /// The variant to deploy, if any.
    pub recommendation: Option<String>,
    /// Whether the fine-tune is worse than the base beyond the noise.
    pub regression: bool,
    /// Warnings in the report.
    pub warnings: usize,
    /// Stages whose artifacts were completed.
    pub stages_completed: usize,
    /// Chart files, relative to `reports/`.
    pub charts: Vec<String>,
}

/// The report stage. `earlier` lists the stages registered before it (all optional
/// upstream), so a stage added to the registry is hashed into the report's input without
/// touching this file.
pub struct Report {
    earlier: Vec<&'static str>,
}

impl Report {
    /// A report stage reading the artifacts of `earlier` stages (registry order).
    pub fn new(earlier: Vec<&'static str>) -> Self {
        Self { earlier }
    }
}

impl Stage for Report {
    const NAME: &'static str = "report";
    type Config = NoConfig;
    type Metrics = ReportMetrics;

    fn description(&self) -> &'static str {
        "write FINAL_REPORT.json, BENCHMARK_REPORT.md and charts from every artifact"
    }
    fn artifact_file(&self) -> &'static str {
        "report.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &[]
    }
    fn optional_upstream(&self) -> &[&'static str] {
        &self.earlier
    }
    fn code_version(&self) -> u32 {
        1
    }

    // The report has no settings: it is a function of the artifacts alone.
    fn run(&self, _: &NoConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let reports = ctx.workspace().reports();
        let now = crate::build_info::rfc3339(std::time::SystemTime::now());
        let generated = generate::generate(ctx.upstream_states(), &reports, &now)
            .with_context(|| format!("writing the report in {}", reports.display()))?;
        let r = &generated.report;
        let recommendation = r
            .recommendation
            .variant
            .clone()
            .unwrap_or_else(|| "none".into());
        let regression = r.regression.as_ref().is_some_and(|g| g.regression);
        let summary = vec![
            ("recommendation".to_string(), recommendation.clone()),
            (
                "regression".to_string(),
                if regression { "YES" } else { "no" }.to_string(),
            ),
            ("warnings".to_string(), r.warnings.len().to_string()),
            ("charts".to_string(), r.charts.len().to_string()),
        ];
        Ok(StageOutput {
            metrics: json!({
                "recommendation": r.recommendation.variant,
                "regression": regression,
                "warnings": r.warnings.len(),
                "stages_completed": r.stages.iter().filter(|s| s.status == "completed").count(),
                "charts": r.charts,
            }),
            outputs: generated.files.clone(),
            summary,
            warnings: r.warnings.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::pipeline::{Artifact, RunOptions, Status, Workspace};

    #[test]
    fn report_is_registered_last_with_every_earlier_stage_as_optional_upstream() {
        let stages = crate::stages::registry();
        let last = stages.last().expect("the registry is not empty");
        assert_eq!(last.name(), "report");
        let earlier: Vec<&str> = stages[..stages.len() - 1]
            .iter()
            .map(|s| s.name())
            .collect();
        assert_eq!(last.optional_upstream(), earlier.as_slice());
        assert!(last.upstream().is_empty());
    }

    #[test]
    fn running_only_the_report_on_crafted_artifacts_records_its_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        std::fs::create_dir_all(ws.reports()).unwrap();
        let crafted =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/report/artifacts");
        for e in std::fs::read_dir(crafted).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), ws.reports().join(e.file_name())).unwrap();
        }
        let config = crate::Config::load(None, &[]).unwrap();
        // The crafted artifacts do not match this config's inputs: --force runs the report
        // on them anyway (without it, --only refuses a stale upstream).
        let opts = RunOptions {
            only: Some("report".into()),
            force: true,
            quiet: true,
            ..Default::default()
        };
        let run = crate::stages::pipeline()
            .run(&ws, &config, &opts, &mut |_| {})
            .unwrap();
        assert!(!run.failed(), "{run:?}");
        let art = Artifact::read(&ws.reports().join("report.json"))
            .unwrap()
            .unwrap();
        assert_eq!(art.status, Status::Completed);
        assert_eq!(art.metrics["recommendation"], "nf4+adapter");
        let paths: Vec<String> = art
            .outputs
            .iter()
            .map(|o| o.path.display().to_string())
            .collect();
        for want in [
            "reports/FINAL_REPORT.json",
            "reports/BENCHMARK_REPORT.md",
            "reports/charts/training_loss.png",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
        }
    }
}
