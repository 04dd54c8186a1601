//! report: turns every stage artifact in `reports/` into FINAL_REPORT.json,
//! BENCHMARK_REPORT.md and charts (`crate::report` does the work).
//!
//! It runs whatever upstream completed: each earlier stage is an *optional* upstream, so a
//! missing or failed stage shows in the report as "not run" or "failed: <error>" instead of
//! stopping it. The report reads the artifacts by file name, including failed ones, which the
//! runner does not hand to stages.

use anyhow::Context;
use serde_json::json;

use crate::pipeline::{Stage, StageCtx, StageOutput};

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
    fn name(&self) -> &'static str {
        "report"
    }
    fn description(&self) -> &'static str {
        "write FINAL_REPORT.json, BENCHMARK_REPORT.md and charts from every artifact"
    }
    fn artifact_file(&self) -> &'static str {
        "report.json"
    }
    fn upstream(&self) -> &'static [&'static str] {
        &[]
    }
    fn optional_upstream(&self) -> &[&'static str] {
        &self.earlier
    }
    fn config_sections(&self) -> Vec<&'static str> {
        // The report has no settings: it is a function of the artifacts alone.
        Vec::new()
    }
    fn code_version(&self) -> u32 {
        1
    }

    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let reports = ctx.workspace().reports();
        let now = crate::pipeline::runner::rfc3339(std::time::SystemTime::now());
        let generated = crate::report::generate(&reports, &now)
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
