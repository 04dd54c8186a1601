//! Checks made before anything is written: the output must not overlap the checkpoint, and
//! every skip entry must name a Linear module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::select::is_skipped;
use super::QuantError;

/// `path` made absolute, `.`/`..` folded and symlinks resolved as far as it exists (the
/// rest appended), so two spellings of one directory compare equal.
pub(super) fn resolved(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut abs = PathBuf::new();
    for c in std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .components()
    {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                abs.pop();
            }
            other => abs.push(other),
        }
    }
    let mut base = abs.clone();
    let mut rest = Vec::new();
    while !base.exists() {
        match base.file_name() {
            Some(name) => {
                rest.push(name.to_os_string());
                base.pop();
            }
            None => break,
        }
    }
    match base.canonicalize() {
        Ok(mut c) => {
            c.extend(rest.iter().rev());
            c
        }
        Err(_) => abs,
    }
}

/// Refuses an output directory that is the checkpoint, lies inside it, or contains it:
/// the output is replaced as a whole, which would delete the input.
pub(super) fn refuse_overlap(model_dir: &Path, out_dir: &Path) -> Result<(), QuantError> {
    let (model, out) = (resolved(model_dir), resolved(out_dir));
    if out.starts_with(&model) || model.starts_with(&out) {
        return Err(QuantError::OutputOverlapsInput {
            out: out_dir.to_path_buf(),
            model: model_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Every skip entry must match a Linear module, or a typo silently quantizes what was meant
/// to stay dense. `lm_head`, the default, may match nothing: a checkpoint with tied
/// embeddings has no `lm_head.weight`.
pub(super) fn check_skip_entries(
    skip: &[String],
    linears: &BTreeSet<String>,
    model_dir: &Path,
) -> Result<(), QuantError> {
    for entry in skip {
        let one = std::slice::from_ref(entry);
        if entry != "lm_head" && !linears.iter().any(|m| is_skipped(m, one)) {
            // One example per top-level module (`lm_head`, `model…`, `visual…`).
            let mut seen = BTreeSet::new();
            let examples: Vec<&str> = linears
                .iter()
                .filter(|m| seen.insert(m.split('.').next().unwrap_or_default()))
                .map(String::as_str)
                .collect();
            return Err(QuantError::SkipMatchesNothing {
                entry: entry.clone(),
                path: model_dir.to_path_buf(),
                hint: if examples.is_empty() {
                    "it has no Linear weights".into()
                } else {
                    format!("its Linear modules include `{}`", examples.join("`, `"))
                },
            });
        }
    }
    Ok(())
}
