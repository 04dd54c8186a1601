//! The stage contract: what a stage declares, what it gets, what it returns.
//!
//! A stage is a pure function of (its config sections, its upstream artifacts). The runner
//! hashes both before the stage runs (DVC's rule: hash dependencies *before* running, so an
//! input edited mid-run is never recorded as current) and skips a stage whose completed
//! artifact carries the same hash and whose outputs are unchanged.

use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use serde_json::Value;

use super::artifact::Artifact;
use super::workspace::Workspace;
use crate::config::Config;

/// One step of the pipeline. Implementations live in `src/stages/`, one file each.
pub trait Stage: Send + Sync {
    /// Stable lower-case name, as used on the command line (`--from prepare`).
    fn name(&self) -> &'static str;
    /// One line for `medpipe stages` and `--help`.
    fn description(&self) -> &'static str;
    /// File name of the artifact under `reports/` (e.g. `environment.json`).
    fn artifact_file(&self) -> &'static str;
    /// Stages whose artifacts this one reads; they must come earlier in the pipeline.
    fn upstream(&self) -> &'static [&'static str];
    /// Stages whose artifacts this one reads when they exist (completed), without requiring
    /// them (e.g. the report summarizes whatever ran). Hashed into the input when present.
    fn optional_upstream(&self) -> &[&'static str] {
        &[]
    }
    /// Config sections this stage reads (hashed into its input). Default: its own name.
    fn config_sections(&self) -> Vec<&'static str> {
        vec![self.name()]
    }
    /// The config this stage's input hash covers, given its `config_sections` as written
    /// (canonical JSON, one key per section). Default: as written. A stage that resolves a
    /// setting against the machine hashes the resolved value instead (the probe hashes the
    /// device it chooses, so `auto` and `cpu` on a CPU machine are the same input).
    fn resolve_config(&self, sections: Value, _config: &Config, _ws: &Workspace) -> Value {
        sections
    }
    /// Bump when the stage's code changes what it produces: old artifacts become stale.
    fn code_version(&self) -> u32;
    /// Does the work. Every file it writes goes through `pipeline::fs::write_atomic`
    /// (or a `.partial` directory renamed at the end) and is returned in `outputs`.
    fn run(&self, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput>;
}

/// What a completed stage hands back to the runner.
#[derive(Debug, Default)]
pub struct StageOutput {
    /// Stage-specific figures, stored as the artifact's `metrics` (units in the key names).
    pub metrics: Value,
    /// Files (or directories, hashed recursively) the stage produced, workspace-relative or
    /// absolute; their sha256 is recorded and checked on the next run.
    pub outputs: Vec<PathBuf>,
    /// A few key figures for the summary table and BUILD_LOG.md: (label, value with unit).
    pub summary: Vec<(String, String)>,
    /// Problems that did not stop the stage (shown in BUILD_LOG.md and the artifact).
    pub warnings: Vec<String>,
}

/// Everything a running stage may look at.
pub struct StageCtx<'a> {
    pub(crate) workspace: &'a Workspace,
    pub(crate) config: &'a Config,
    pub(crate) upstream: Vec<(&'static str, Artifact)>,
    pub(crate) progress: &'a MultiProgress,
    pub(crate) quiet: bool,
}

impl<'a> StageCtx<'a> {
    /// The workspace root and its standard folders.
    pub fn workspace(&self) -> &Workspace {
        self.workspace
    }

    /// The whole validated pipeline config (a stage reads only its declared sections).
    pub fn config(&self) -> &Config {
        self.config
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

    /// The device model work runs on: the one the probe resolved (`metrics.device` of
    /// `reports/environment.json`), so every stage uses the device that was hashed into
    /// its inputs. The stage must declare `probe` as upstream.
    ///
    /// # Errors
    /// No probe upstream, or an artifact without a valid `metrics.device`.
    pub fn device(&self) -> anyhow::Result<crate::device::Device> {
        let probe = self.upstream("probe")?;
        let name = probe
            .metric("/device")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow::anyhow!("reports/environment.json has no metrics.device"))?;
        crate::device::Device::parse(name)
            .map_err(|e| anyhow::Error::new(e).context("reports/environment.json metrics.device"))
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
