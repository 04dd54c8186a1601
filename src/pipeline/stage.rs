//! The stage contract: what a stage declares, what it gets, what it returns.
//!
//! A stage is a pure function of (its config section, the shared sections it names, its
//! upstream artifacts). The runner hashes all of them before the stage runs (DVC's rule:
//! hash dependencies *before* running, so an input edited mid-run is never recorded as
//! current) and skips a stage whose completed artifact carries the same hash and whose
//! outputs are unchanged.
//!
//! Stages implement the typed [`Stage`]: their own `Config` (a `[section]` of the TOML
//! file, named after the stage) and the type of the `Metrics` they record, which
//! downstream stages read with [`StageCtx::upstream_metrics`]. The runner holds them as
//! [`AnyStage`] objects; every `Stage` is one.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::artifact::Artifact;
use super::settings::{ConfigError, SectionConfig, Settings};
use super::workspace::Workspace;

/// One step of the pipeline. Implementations live in `src/stages/`, one file (or folder)
/// each, and are listed once in the registry.
pub trait Stage: Send + Sync + 'static {
    /// Stable lower-case name, as used on the command line (`--from prepare`) and as the
    /// name of its config section.
    const NAME: &'static str;
    /// The stage's `[NAME]` section; [`super::NoConfig`] for a stage without settings.
    type Config: SectionConfig;
    /// The figures the stage records (its artifact's `metrics`), as downstream stages read
    /// them. Checked when the stage finishes: metrics that do not read as this type fail it.
    type Metrics: Serialize + DeserializeOwned;

    /// The name this instance runs under: [`Stage::NAME`] (a test may register one stage
    /// type under several names).
    fn name(&self) -> &'static str {
        Self::NAME
    }
    /// One line for `medpipe stages` and `--help`.
    fn description(&self) -> &'static str;
    /// File name of the artifact under `reports/` (e.g. `environment.json`).
    fn artifact_file(&self) -> &'static str;
    /// Stages whose artifacts this one reads; they must come earlier in the pipeline.
    fn upstream(&self) -> &[&'static str];
    /// Stages whose artifacts this one reads when they exist (completed), without requiring
    /// them (e.g. the report summarizes whatever ran). Hashed into the input when present.
    fn optional_upstream(&self) -> &[&'static str] {
        &[]
    }
    /// Sections owned by no stage that this one also reads, hashed into its input: a whole
    /// section (`model`), or only the keys of one that change what the stage produces
    /// (`model.max_pixels`; a key left unset is left out of the hash, so adding a key to a
    /// section makes no stage stale until it is set).
    fn shared_sections(&self) -> &[&'static str] {
        &[]
    }
    /// The config this stage's input hash covers, given its sections as written (canonical
    /// JSON, one key per section). Default: as written. A stage that resolves a setting
    /// against the machine hashes the resolved value instead (the probe hashes the device it
    /// chooses, so `auto` and `cpu` on a CPU machine are the same input).
    fn resolve_config(&self, sections: Value, _settings: &Settings, _ws: &Workspace) -> Value {
        sections
    }
    /// Bump when the stage's code changes what it produces: old artifacts become stale.
    fn code_version(&self) -> u32;
    /// Does the work. Every file it writes goes through `crate::fs::write_atomic`
    /// (or a `.partial` directory renamed at the end) and is returned in `outputs`.
    fn run(&self, config: &Self::Config, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput>;
}

/// A stage as the runner holds it (object-safe); implemented for every [`Stage`].
pub trait AnyStage: Send + Sync {
    /// As [`Stage::name`].
    fn name(&self) -> &'static str;
    /// As [`Stage::description`].
    fn description(&self) -> &'static str;
    /// As [`Stage::artifact_file`].
    fn artifact_file(&self) -> &'static str;
    /// As [`Stage::upstream`].
    fn upstream(&self) -> &[&'static str];
    /// As [`Stage::optional_upstream`].
    fn optional_upstream(&self) -> &[&'static str];
    /// The sections this stage reads: its own (when it has settings), then the shared ones.
    fn config_sections(&self) -> Vec<&'static str>;
    /// Parses and validates the stage's own section.
    ///
    /// # Errors
    /// A wrong type, an unknown key or a value out of range.
    fn check_config(&self, settings: &Settings) -> Result<(), ConfigError>;
    /// The sections hashed into the stage's input, canonical and resolved: its own in typed
    /// form (every field, defaults filled), the shared ones as written.
    ///
    /// # Errors
    /// As [`AnyStage::check_config`].
    fn config_json(&self, settings: &Settings, ws: &Workspace) -> Result<Value, ConfigError>;
    /// As [`Stage::code_version`].
    fn code_version(&self) -> u32;
    /// Reads the stage's settings, runs it, and checks its metrics against its type.
    ///
    /// # Errors
    /// Whatever the stage fails with.
    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput>;
}

impl<S: Stage> AnyStage for S {
    fn name(&self) -> &'static str {
        Stage::name(self)
    }
    fn description(&self) -> &'static str {
        Stage::description(self)
    }
    fn artifact_file(&self) -> &'static str {
        Stage::artifact_file(self)
    }
    fn upstream(&self) -> &[&'static str] {
        Stage::upstream(self)
    }
    fn optional_upstream(&self) -> &[&'static str] {
        Stage::optional_upstream(self)
    }
    fn config_sections(&self) -> Vec<&'static str> {
        let own = S::Config::IS_SECTION.then_some(Stage::name(self));
        let mut out: Vec<&'static str> = own.into_iter().collect();
        for s in self.shared_sections() {
            let section = s.split_once('.').map_or(*s, |(section, _)| section);
            if !out.contains(&section) {
                out.push(section);
            }
        }
        out
    }
    fn check_config(&self, settings: &Settings) -> Result<(), ConfigError> {
        if S::Config::IS_SECTION {
            settings.section::<S::Config>(Stage::name(self))?;
        }
        Ok(())
    }
    fn config_json(&self, settings: &Settings, ws: &Workspace) -> Result<Value, ConfigError> {
        let mut sections = serde_json::Map::new();
        if S::Config::IS_SECTION {
            let name = Stage::name(self);
            sections.insert(name.into(), settings.typed_json::<S::Config>(name)?);
        }
        for s in self.shared_sections() {
            match s.split_once('.') {
                None => {
                    sections.insert((*s).into(), settings.raw_json(s));
                }
                Some((section, key)) => match settings.raw_json(section).get(key) {
                    Some(v) if !v.is_null() => {
                        let entry = sections
                            .entry(section)
                            .or_insert_with(|| Value::Object(serde_json::Map::new()));
                        if let Value::Object(m) = entry {
                            m.insert(key.into(), v.clone());
                        }
                    }
                    _ => {}
                },
            }
        }
        let written = crate::json::canonical(Value::Object(sections));
        Ok(crate::json::canonical(
            self.resolve_config(written, settings, ws),
        ))
    }
    fn code_version(&self) -> u32 {
        Stage::code_version(self)
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let config: S::Config = if S::Config::IS_SECTION {
            ctx.settings.section(Stage::name(self))?
        } else {
            serde_json::from_value(Value::Null).context("a stage without settings")?
        };
        let out = Stage::run(self, &config, ctx)?;
        serde_json::from_value::<S::Metrics>(out.metrics.clone()).with_context(|| {
            format!(
                "stage `{}` recorded metrics that do not read as its declared metrics type",
                Stage::name(self)
            )
        })?;
        Ok(out)
    }
}

/// What a completed stage hands back to the runner.
#[derive(Debug, Default)]
pub struct StageOutput {
    /// Stage-specific figures, stored as the artifact's `metrics` (units in the key names);
    /// they must read as the stage's `Metrics` type.
    pub metrics: Value,
    /// Files (or directories, hashed recursively) the stage produced, workspace-relative or
    /// absolute; their sha256 is recorded and checked on the next run.
    pub outputs: Vec<PathBuf>,
    /// A few key figures for the summary table and BUILD_LOG.md: (label, value with unit).
    pub summary: Vec<(String, String)>,
    /// Problems that did not stop the stage (shown in BUILD_LOG.md and the artifact).
    pub warnings: Vec<String>,
}

/// An earlier stage as a consumer sees it: its artifact when it has one.
#[derive(Debug, Clone)]
pub struct UpstreamState {
    /// The stage's name.
    pub stage: &'static str,
    /// Its artifact file under `reports/`.
    pub artifact_file: &'static str,
    /// `Ok(None)` when it has not run; `Err` with the reason when its artifact is unreadable.
    pub artifact: Result<Option<Artifact>, String>,
}

/// Everything a running stage may look at.
pub struct StageCtx<'a> {
    pub(crate) workspace: &'a Workspace,
    pub(crate) settings: &'a Settings,
    /// Completed upstream artifacts, required and optional.
    pub(crate) upstream: Vec<(&'static str, Artifact)>,
    /// Every declared upstream stage, completed or not, in pipeline order.
    pub(crate) states: Vec<UpstreamState>,
    pub(crate) progress: &'a MultiProgress,
    pub(crate) quiet: bool,
}

impl<'a> StageCtx<'a> {
    /// The workspace root and its standard folders.
    pub fn workspace(&self) -> &Workspace {
        self.workspace
    }

    /// The whole config document: for the shared sections a stage names in
    /// [`Stage::shared_sections`] (its own comes as `run`'s argument).
    pub fn settings(&self) -> &Settings {
        self.settings
    }

    /// The completed artifact of an upstream stage this stage declared (required or optional;
    /// an optional one that has not completed is absent).
    ///
    /// # Errors
    /// If `stage` is not among the declared upstream stages (a programming error in the stage).
    pub fn upstream(&self, stage: &str) -> anyhow::Result<&Artifact> {
        self.upstream
            .iter()
            .find(|(n, _)| *n == stage)
            .map(|(_, a)| a)
            .ok_or_else(|| anyhow::anyhow!("stage did not declare `{stage}` as upstream"))
    }

    /// Whether an upstream stage's artifact is here and completed.
    pub fn completed(&self, stage: &str) -> bool {
        self.upstream.iter().any(|(n, _)| *n == stage)
    }

    /// The metrics of upstream stage `U`, typed as `U` declares them.
    ///
    /// # Errors
    /// `U` is not a completed upstream of this stage, or its metrics do not read as its type
    /// (an artifact from another medpipe version).
    pub fn upstream_metrics<U: Stage>(&self) -> anyhow::Result<U::Metrics> {
        let artifact = self.upstream(U::NAME)?;
        serde_json::from_value(artifact.metrics.clone())
            .with_context(|| format!("reading the metrics of upstream stage `{}`", U::NAME))
    }

    /// The metrics of upstream stage `U` when it has completed, `None` when it has not (an
    /// optional upstream).
    ///
    /// # Errors
    /// As [`StageCtx::upstream_metrics`], for a completed `U`.
    pub fn completed_metrics<U: Stage>(&self) -> anyhow::Result<Option<U::Metrics>> {
        if self.completed(U::NAME) {
            self.upstream_metrics::<U>().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Every declared upstream stage in pipeline order, with its artifact whatever its
    /// status (the report shows failed and missing stages too).
    pub fn upstream_states(&self) -> &[UpstreamState] {
        &self.states
    }

    /// Absolute path of a workspace-relative path.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.workspace.root().join(rel)
    }

    /// A progress bar for long loops (hidden with `--quiet` or when stderr is not a terminal).
    pub fn progress_bar(&self, len: u64, message: impl Into<String>) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = self.progress.add(ProgressBar::new(len));
        bar.set_style(count_style(true));
        bar.set_message(message.into());
        bar
    }

    /// A progress counter for loops whose total is not known in advance (a streamed
    /// source): items done and their rate, no bar or total.
    pub fn counter(&self, message: impl Into<String>) -> ProgressBar {
        let bar = self.progress_bar(0, message);
        bar.set_style(count_style(false));
        bar
    }

    /// A progress bar counting bytes (downloads, hashing).
    pub fn bytes_bar(&self, len: u64, message: impl Into<String>) -> ProgressBar {
        let bar = self.progress_bar(len, message);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:<24} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .expect("the template is a valid literal")
            .progress_chars("=> "),
        );
        bar
    }
}

/// Items per second with one decimal (`152.3/s`); indicatif's `{per_sec}` prints every digit.
fn rate(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.1}/s", state.per_sec());
}

/// The style of an item count: with a bar, total and eta when the total is known, else
/// the count and its rate.
pub(crate) fn count_style(known_total: bool) -> ProgressStyle {
    let template = if known_total {
        "{spinner} {msg:<24} [{bar:30}] {pos}/{len} ({rate}, eta {eta})"
    } else {
        "{spinner} {msg:<24} {pos} done ({rate})"
    };
    ProgressStyle::with_template(template)
        .expect("the templates are valid literals")
        .with_key("rate", rate)
        .progress_chars("=> ")
}

#[cfg(test)]
mod progress_tests {
    use std::sync::{Arc, Mutex};

    use indicatif::{ProgressDrawTarget, TermLike};

    use super::*;

    /// A terminal that keeps what is written to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn shown(known_total: bool, len: u64, done: u64) -> String {
        let screen = Screen::default();
        let bar = ProgressBar::with_draw_target(
            Some(len),
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
        );
        bar.set_style(count_style(known_total));
        bar.set_message("prepare synthetic");
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.inc(done);
        bar.abandon(); // draws the final state as it is
        let written = screen.0.lock().unwrap();
        written.clone()
    }

    #[test]
    fn issue_15_a_count_without_a_total_shows_no_zero_total_and_a_rounded_rate() {
        let text = shown(false, 0, 256);
        assert!(!text.contains("/0"), "{text}");
        let rate = text
            .rsplit("256 done (")
            .next()
            .and_then(|r| r.split("/s)").next())
            .filter(|_| text.contains("256 done ("))
            .unwrap_or_else(|| panic!("no count and rate in {text}"));
        assert!(!rate.contains(','), "{rate}");
        assert_eq!(rate.split('.').nth(1).map(str::len), Some(1), "{rate}");
        let text = shown(true, 300, 256);
        assert!(text.contains("256/300 ("), "{text}");
    }
}
