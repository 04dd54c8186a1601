//! Where `medpipe bench` and `medpipe generate` find a model: a directory in Hugging Face
//! layout, or `builtin:tiny`, materialized once into a cache directory keyed by its seed
//! (with the same code the download stage uses, so it is the same model byte for byte).

use std::path::PathBuf;

use crate::builtin;

/// Documents of generated clinical text the builtin:tiny tokenizer is trained on (as the
/// download stage).
const TOKENIZER_CORPUS_DOCS: usize = 2_000;

/// Errors resolving a model argument.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("unknown builtin model `{0}` (available: builtin:tiny)")]
    UnknownBuiltin(String),
    #[error("`{0}` is a hub id; run `medpipe run --to download` and pass the model directory it reports")]
    Hub(String),
    #[error("model `{path}` is not a directory with a config.json")]
    NotAModel { path: PathBuf },
    #[error("materializing builtin:tiny into {dir}")]
    Builtin {
        dir: PathBuf,
        #[source]
        source: builtin::BuiltinError,
    },
}

/// The cache root: `$MEDPIPE_CACHE`, else `$XDG_CACHE_HOME/medpipe`, else
/// `$HOME/.cache/medpipe`, else the temp directory.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("MEDPIPE_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("medpipe")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/medpipe")))
        .unwrap_or_else(|| std::env::temp_dir().join("medpipe-cache"))
}

/// The directory of `model` (`builtin:tiny` or a directory), materializing builtin:tiny
/// for `seed` under [`cache_root`] when it is not there yet.
///
/// # Errors
/// An unknown builtin, a hub id, a path that is not a model directory, or a failed
/// materialization.
pub fn resolve_model(model: &str, seed: u64) -> Result<PathBuf, SourceError> {
    if let Some(name) = model.strip_prefix("builtin:") {
        if name != "tiny" {
            return Err(SourceError::UnknownBuiltin(model.to_string()));
        }
        let dir = cache_root().join(format!("builtin-tiny-seed{seed}"));
        if !dir.join("model.safetensors").is_file() {
            let corpus = builtin::tokenizer_corpus(seed, TOKENIZER_CORPUS_DOCS);
            builtin::materialize(&dir, seed, &corpus).map_err(|source| SourceError::Builtin {
                dir: dir.clone(),
                source,
            })?;
        }
        return Ok(dir);
    }
    if model.starts_with("hf:") || model.starts_with("hf-dataset:") {
        return Err(SourceError::Hub(model.to_string()));
    }
    let path = PathBuf::from(model);
    if !path.join("config.json").is_file() {
        return Err(SourceError::NotAModel { path });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_without_config_and_unknown_builtins_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model(tmp.path().to_str().unwrap(), 0).unwrap_err();
        assert!(matches!(err, SourceError::NotAModel { .. }), "{err}");
        assert!(matches!(
            resolve_model("builtin:huge", 0),
            Err(SourceError::UnknownBuiltin(_))
        ));
        assert!(matches!(
            resolve_model("hf:Qwen/X", 0),
            Err(SourceError::Hub(_))
        ));
    }
}
