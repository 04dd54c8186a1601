//! The pipeline config: one TOML file, one section per stage, defaults that run the embedded
//! tiny pipeline on a CPU.
//!
//! Every section is `deny_unknown_fields`, so a typo is an error naming the file, line and the
//! valid keys (the toml crate reports the span, serde the expected fields). `--set a.b=v`
//! overrides are applied to the parsed table and then go through the very same typed
//! deserialization, so they are type-checked identically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::json::canonical;

use crate::stages::baseline::BaselineConfig;
use crate::stages::download::DownloadConfig;
use crate::stages::evaluate::EvaluateConfig;
use crate::stages::prepare::PrepareConfig;
use crate::stages::probe::ProbeConfig;

/// The embedded default config (`pipeline/default.toml`), used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../pipeline/default.toml");

/// Errors reading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--set {assignment}: expected `section.key=value`")]
    BadOverride { assignment: String },
    #[error("--set {assignment}: {message}")]
    Override { assignment: String, message: String },
    #[error("config {path}{}: {invalid}", .via.as_ref().map(|v| format!(" (--set {v})")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        /// The `--set` assignment that gave the value, when one did.
        via: Option<String>,
        invalid: InvalidValue,
    },
}

/// A config value outside what its key allows: the key (dotted), the value as given, and
/// the allowed range, so the message alone says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key} = {value} is not allowed ({allowed})")]
pub struct InvalidValue {
    /// Dotted key, `section.key` (`prepare.sources[1].name` for list items).
    pub key: String,
    /// The value as given.
    pub value: String,
    /// What the key accepts (`at least 1`, `in [0, 1)`).
    pub allowed: String,
}

/// `Ok` when `ok`, else an [`InvalidValue`] for `key = value` allowing `allowed`.
///
/// # Errors
/// When `ok` is false.
pub(crate) fn check(
    ok: bool,
    key: &str,
    value: impl std::fmt::Display,
    allowed: &str,
) -> Result<(), InvalidValue> {
    if ok {
        Ok(())
    } else {
        Err(InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            allowed: allowed.to_string(),
        })
    }
}

/// `key` must be at least 1 (a count, a size, a rank).
pub(crate) fn at_least_one(key: &str, value: impl Into<u64>) -> Result<(), InvalidValue> {
    let v = value.into();
    check(v >= 1, key, v, "must be at least 1")
}

/// `key` must be a finite number in `[0, 1]`.
pub(crate) fn fraction(key: &str, value: f64) -> Result<(), InvalidValue> {
    check(
        value.is_finite() && (0.0..=1.0).contains(&value),
        key,
        value,
        "must be in [0, 1]",
    )
}

/// Which model the pipeline works on. Shared by several stages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `builtin:tiny` (embedded, materialized by the download stage), `hf:org/name[@revision]`,
    /// or a local directory in the Hugging Face layout.
    #[serde(default = "default_model_source")]
    pub source: String,
}

fn default_model_source() -> String {
    "builtin:tiny".into()
}

impl ModelConfig {
    /// Checks `[model]`: a source of a known kind.
    ///
    /// # Errors
    /// An empty source, or a `builtin:` model other than `builtin:tiny`.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let s = self.source.trim();
        let allowed =
            "builtin:tiny, hf:org/name[@revision], or a directory (relative to the workspace)";
        check(!s.is_empty(), "model.source", "\"\"", allowed)?;
        check(
            s.strip_prefix("builtin:").is_none_or(|n| n == "tiny"),
            "model.source",
            format!("{s:?}"),
            allowed,
        )
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: default_model_source(),
        }
    }
}

/// The whole validated config. Each field is one `[section]` of the TOML file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[model]`: the model every stage works on.
    #[serde(default)]
    pub model: ModelConfig,
    /// `[probe]`: environment detection and device choice.
    #[serde(default)]
    pub probe: ProbeConfig,
    /// `[download]`: model and dataset sources on disk.
    #[serde(default)]
    pub download: DownloadConfig,
    /// `[prepare]`: dataset sources, rendering, filters and split.
    #[serde(default)]
    pub prepare: PrepareConfig,
    /// `[quantize]`: the NF4 checkpoint and its timing.
    #[serde(default)]
    pub quantize: crate::stages::quantize::QuantizeConfig,
    /// `[baseline]`: benchmark settings of the unquantized model.
    #[serde(default)]
    pub baseline: BaselineConfig,
    /// `[evaluate]`: variants, generation settings and bootstrap of the evaluation.
    #[serde(default)]
    pub evaluate: EvaluateConfig,
    /// `[train]`: QLoRA fine-tune hyper-parameters.
    #[serde(default)]
    pub train: crate::stages::train::TrainStageConfig,
    /// Where the config came from (for messages); not part of the file.
    #[serde(skip)]
    pub origin: PathBuf,
}

impl Config {
    /// Reads and validates `path` (or the embedded default when `None`), then applies
    /// `--set section.key=value` overrides.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, has unknown sections/keys or wrong types, or an
    /// override is malformed or ill-typed.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let (origin, text) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                (p.to_path_buf(), text)
            }
            None => (
                PathBuf::from("<embedded pipeline/default.toml>"),
                DEFAULT_CONFIG.to_string(),
            ),
        };
        Self::from_toml(&text, &origin, overrides)
    }

    /// Parses config text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        // First pass on the text itself, so errors carry line and column.
        toml::from_str::<Config>(text).map_err(parse_err)?;
        // Then the file is laid over the embedded default: a section or key the file does
        // not set takes the value pipeline/default.toml shows (issue 15), not a code default.
        let mut table: toml::Table =
            toml::from_str(DEFAULT_CONFIG).expect("the embedded default config is valid TOML");
        merge(&mut table, toml::from_str(text).map_err(parse_err)?);
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        let mut cfg = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            if overrides.is_empty() {
                parse_err(e)
            } else {
                ConfigError::Override {
                    assignment: overrides.join(" --set "),
                    message: e.to_string().trim_end().to_string(),
                }
            }
        })?;
        cfg.origin = origin.to_path_buf();
        cfg.validate().map_err(|invalid| ConfigError::Invalid {
            path: origin.to_path_buf(),
            // The last override of this key (or of a section holding it) decided the value.
            via: overrides
                .iter()
                .rev()
                .find(|o| {
                    let key = o.split('=').next().unwrap_or("").trim();
                    !key.is_empty()
                        && invalid.key.strip_prefix(key).is_some_and(|rest| {
                            rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                        })
                })
                .cloned(),
            invalid,
        })?;
        Ok(cfg)
    }

    /// Checks every section's values (each section's own `validate`), so a bad value is
    /// refused before the first stage runs, whichever stage would read it.
    ///
    /// # Errors
    /// The first value outside its allowed range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.model.validate()?;
        self.probe.validate()?;
        self.download.validate()?;
        self.baseline.validate()?;
        self.quantize.validate()?;
        self.prepare.validate()?;
        self.train.validate()?;
        self.evaluate.validate()
    }

    /// The named section as canonical JSON (sorted keys), for hashing and for artifacts.
    /// Unknown names give `null`.
    pub fn section_json(&self, name: &str) -> Value {
        let all = serde_json::to_value(self).expect("config serializes: plain data");
        canonical(all.get(name).cloned().unwrap_or(Value::Null))
    }
}

/// Applies one `section.key=value` (keys may nest: `prepare.render.max_pixels=1000`).
/// The value is read as a TOML value (`42`, `true`, `"x"`, `[1,2]`); anything that does not
/// parse as one is taken as a bare string, so `--set model.source=hf:Qwen/X` works unquoted.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadOverride {
        assignment: assignment.to_string(),
    };
    let (key, raw) = assignment.split_once('=').ok_or_else(bad)?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut node = table;
    for part in &path[..path.len() - 1] {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| ConfigError::Override {
            assignment: assignment.to_string(),
            message: format!("`{part}` is a value, not a section"),
        })?;
    }
    node.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

/// Lays `over` onto `base`: tables merge key by key (recursively), anything else (values,
/// arrays, arrays of tables such as `[[prepare.sources]]`) replaces what `base` had.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Config, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml(text, Path::new("test.toml"), &sets)
    }

    #[test]
    fn embedded_default_parses_and_uses_builtin_tiny() {
        let cfg = Config::load(None, &[]).unwrap();
        assert_eq!(cfg.model.source, "builtin:tiny");
    }

    #[test]
    fn unknown_key_names_file_line_and_valid_keys() {
        let err = parse("[model]\nsource = \"x\"\nsorce = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("unknown field `sorce`"), "{err}");
        assert!(err.contains("`source`"), "{err}");
    }

    #[test]
    fn unknown_section_lists_valid_sections() {
        let err = parse("[trian]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown field `trian`"), "{err}");
        assert!(err.contains("`probe`"), "{err}");
    }

    #[test]
    fn override_sets_a_typed_value() {
        let cfg = parse("", &["model.source=hf:Qwen/Qwen2.5-VL-7B-Instruct"]).unwrap();
        assert_eq!(cfg.model.source, "hf:Qwen/Qwen2.5-VL-7B-Instruct");
    }

    #[test]
    fn override_with_wrong_type_is_rejected() {
        let err = parse("", &["model.source=[1, 2]"]).unwrap_err().to_string();
        assert!(err.contains("--set model.source=[1, 2]"), "{err}");
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn override_without_section_is_rejected() {
        assert!(matches!(
            parse("", &["source=x"]),
            Err(ConfigError::BadOverride { .. })
        ));
    }

    #[test]
    fn a_file_without_a_section_takes_the_values_default_toml_shows() {
        let cfg = parse("[evaluate]\nmax_new_tokens = 32\n", &[]).unwrap();
        let default = Config::load(None, &[]).unwrap();
        assert_eq!(cfg.train, default.train);
        assert_eq!(
            cfg.train.r, 16,
            "pipeline/default.toml's r, not the recipe's 64"
        );
        assert_eq!(cfg.prepare, default.prepare);
        assert_eq!(cfg.evaluate.max_new_tokens, 32);
        assert_eq!(cfg.evaluate.batch_size, default.evaluate.batch_size);
    }

    #[test]
    fn the_7b_config_keeps_the_full_qlora_recipe() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline/qwen2.5-vl-7b.toml");
        let cfg = Config::load(Some(&path), &[]).unwrap();
        let (r, alpha, samples) = (cfg.train.r, cfg.train.lora_alpha, cfg.train.max_samples);
        assert_eq!((r, alpha, samples), (64, 128.0, 0));
    }

    #[test]
    fn an_out_of_range_value_names_file_key_value_and_range() {
        let err = parse("[train]\nlora_dropout = 1.5\n", &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config test.toml: train.lora_dropout = 1.5 is not allowed (must be in [0, 1))"
        );
    }

    #[test]
    fn an_out_of_range_override_is_named_as_the_set_that_gave_it() {
        let err = parse("", &["train.r=0"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "config test.toml (--set train.r=0): train.r = 0 is not allowed (must be at least 1)"
        );
    }

    #[test]
    fn section_json_is_canonical() {
        let cfg = parse("", &[]).unwrap();
        let text = serde_json::to_string(&cfg.section_json("model")).unwrap();
        assert_eq!(text, r#"{"source":"builtin:tiny"}"#);
        assert_eq!(cfg.section_json("nope"), Value::Null);
    }
}
