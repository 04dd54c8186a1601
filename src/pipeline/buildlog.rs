//! BUILD_LOG.md: the human story of every run, one Markdown section per stage run.
//! Only this module writes it (STYLE 14). Appends go through the atomic writer too: the
//! log is small, and a torn log is worse than a slower append.

use std::fmt::Write as _;

use super::artifact::{Artifact, Status};
use super::workspace::Workspace;
use crate::build_info::{git_commit, rfc3339, MEDPIPE_VERSION};
use crate::fs::{self, FsError};

fn append(ws: &Workspace, text: &str) -> Result<(), FsError> {
    let path = ws.build_log();
    let mut log = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# medpipe build log\n\nEvery `medpipe run` appends here: what ran, why, the key figures, problems.\n"
                .to_string()
        }
        Err(source) => {
            return Err(FsError {
                action: "reading",
                path,
                source,
            })
        }
    };
    log.push_str(text);
    fs::write_atomic(&path, log.as_bytes())
}

/// Opens a run's section: when, which medpipe, which config.
///
/// # Errors
/// I/O on BUILD_LOG.md.
pub(crate) fn append_run_header(ws: &Workspace, origin: &std::path::Path) -> Result<(), FsError> {
    let text = format!(
        "\n## Run {} — medpipe {}{} — config {}\n",
        rfc3339(std::time::SystemTime::now()),
        MEDPIPE_VERSION,
        git_commit()
            .map(|c| format!(" ({})", &c[..c.len().min(10)]))
            .unwrap_or_default(),
        origin.display(),
    );
    append(ws, &text)
}

/// One stage's section: status, duration, why it ran, figures, warnings, error.
///
/// # Errors
/// I/O on BUILD_LOG.md.
pub(crate) fn append_stage(
    ws: &Workspace,
    a: &Artifact,
    artifact_file: &str,
    reason: &str,
) -> Result<(), FsError> {
    let mut s = String::new();
    let status = match a.status {
        Status::Completed => "completed",
        Status::Failed => "FAILED",
    };
    let _ = writeln!(
        s,
        "\n### {} — {} in {:.1} s\n\n- finished: {}\n- why it ran: {}\n- artifact: reports/{}, input hash `{}`",
        a.stage,
        status,
        a.duration_s,
        a.finished_at,
        reason,
        artifact_file,
        &a.input_hash[..a.input_hash.len().min(12)],
    );
    if !a.summary.is_empty() {
        let _ = writeln!(s, "\n| figure | value |\n| --- | --- |");
        for (k, v) in &a.summary {
            let _ = writeln!(s, "| {k} | {v} |");
        }
    }
    for w in &a.warnings {
        let _ = writeln!(s, "\n> warning: {w}");
    }
    if let Some(e) = &a.error {
        let _ = writeln!(s, "\n**Error:** {}", e.full());
    }
    append(ws, &s)
}
