//! The config the user writes: one TOML file, one section per stage plus the shared
//! `[model]`, laid over the embedded default that runs the tiny pipeline on a CPU.
//!
//! This module owns only what no stage owns: the default text and the `[model]` section.
//! Each stage owns, parses and validates its own section (`Stage::Config`); the registry
//! (`stages::load_config`) checks them all at load, so a typo or a bad value is
//! refused before the first stage runs. Every section is `deny_unknown_fields`, so a typo is
//! an error naming the file, line and the valid keys. `--set a.b=v` overrides go through the
//! very same typed deserialization.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pipeline::settings::{check, ConfigError, InvalidValue, SectionConfig, Settings};

/// The embedded default config (`pipeline/default.toml`), used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../pipeline/default.toml");

/// Which model the pipeline works on. Shared by several stages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `builtin:tiny` (embedded, materialized by the download stage), `hf:org/name[@revision]`,
    /// or a local directory in the Hugging Face layout.
    #[serde(default = "default_model_source")]
    pub source: String,
    /// Largest image the processor resizes to, pixels (`None`: the model's
    /// `preprocessor_config.json`). The memory planner counts images at this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pixels: Option<u64>,
    /// Smallest image the processor resizes to, pixels (`None`: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pixels: Option<u64>,
    /// Memory the model stages may use, MiB (`None`: what the device has free when the
    /// stage starts). A stage whose predicted peak exceeds it refuses before loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
}

fn default_model_source() -> String {
    "builtin:tiny".into()
}

impl SectionConfig for ModelConfig {
    /// Checks `[model]`: a source of a known kind.
    fn validate(&self) -> Result<(), InvalidValue> {
        let s = self.source.trim();
        let allowed =
            "builtin:tiny, hf:org/name[@revision], or a directory (relative to the workspace)";
        check(!s.is_empty(), "model.source", "\"\"", allowed)?;
        check(
            s.strip_prefix("builtin:").is_none_or(|n| n == "tiny"),
            "model.source",
            format!("{s:?}"),
            allowed,
        )?;
        // One 28x28 merged patch is the smallest image the processor makes.
        for (key, v) in [
            ("model.max_pixels", self.max_pixels),
            ("model.min_pixels", self.min_pixels),
        ] {
            if let Some(v) = v {
                check(v >= 784, key, v, "at least 784 (one 28x28 patch)")?;
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_pixels, self.max_pixels) {
            check(
                lo <= hi,
                "model.min_pixels",
                lo,
                &format!("at most model.max_pixels ({hi})"),
            )?;
        }
        if let Some(m) = self.memory_limit_mib {
            check(
                m > 0,
                "model.memory_limit_mib",
                m,
                "at least 1 (leave it out for the device's free memory)",
            )?;
        }
        Ok(())
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: default_model_source(),
            max_pixels: None,
            min_pixels: None,
            memory_limit_mib: None,
        }
    }
}

/// The stages read their sections from the settings: a `&Config` is a `&Settings`.
impl std::ops::Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// The loaded config: the document every stage reads its section from, and the shared
/// `[model]` section, typed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[model]`: the model every stage works on.
    pub model: ModelConfig,
    /// Every section, for the stages (each reads and checks its own).
    pub settings: Settings,
}

impl Config {
    /// Reads `path` (or the embedded default when `None`), lays it over the default, applies
    /// `--set section.key=value` overrides and checks `[model]`. Stage sections are checked
    /// by the registry: use `stages::load_config` for the whole check.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML, an override is malformed or ill-typed, or
    /// `[model]` is wrong.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::checked(Settings::load(path, DEFAULT_CONFIG, overrides)?)
    }

    /// Parses config text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(text: &str, origin: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::checked(Settings::from_toml(
            text,
            origin,
            DEFAULT_CONFIG,
            overrides,
        )?)
    }

    fn checked(settings: Settings) -> Result<Self, ConfigError> {
        let model = settings.section::<ModelConfig>("model")?;
        Ok(Self { model, settings })
    }

    /// Names another origin for messages.
    pub fn set_origin(&mut self, origin: std::path::PathBuf) {
        self.settings.set_origin(origin);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

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
    fn a_bad_model_source_names_file_key_and_what_is_allowed() {
        let err = parse("[model]\nsource = \"builtin:huge\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config test.toml: model.source = \"builtin:huge\" is not allowed"),
            "{err}"
        );
    }

    #[test]
    fn section_json_is_canonical() {
        let cfg = parse("", &[]).unwrap();
        let text = serde_json::to_string(&cfg.settings.raw_json("model")).unwrap();
        assert_eq!(text, r#"{"source":"builtin:tiny"}"#);
        assert_eq!(cfg.settings.raw_json("nope"), Value::Null);
    }
}
