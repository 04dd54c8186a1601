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

use crate::device::{Device, Precision, PrecisionError};
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
    /// The float the model stages compute in (`auto`: bf16 on CUDA, f16 on wgpu, f32 on the
    /// CPU). Left out of the section's JSON when `auto`, so older hashes stay valid.
    #[serde(default, skip_serializing_if = "ModelDtype::is_auto")]
    pub dtype: ModelDtype,
}

/// `[model] dtype`: the compute precision of the model stages, or `auto` for the device's
/// natural one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl ModelDtype {
    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }

    /// The precision on `device`: `auto` is bf16 on CUDA (what the hub's checkpoints store
    /// and Hopper computes fastest), f16 on wgpu (WGSL has no bf16; f32 on an adapter
    /// without f16, which this asks the adapter, opening it) and f32 on the CPU (its kernels
    /// compute in f32; bf16 weights stay bf16 in memory there anyway).
    ///
    /// # Errors
    /// An explicit half precision the device cannot compute in, naming what can.
    pub fn resolve(self, device: Device) -> Result<Precision, PrecisionError> {
        let precision = match (self, device) {
            (Self::Auto, Device::Wgpu) if !crate::device::wgpu::supports_f16() => Precision::F32,
            (Self::Auto, Device::Cpu) | (Self::F32, _) => Precision::F32,
            (Self::Auto, Device::Wgpu) | (Self::F16, _) => Precision::F16,
            (Self::Auto, Device::Cuda(_)) | (Self::Bf16, _) => Precision::Bf16,
        };
        precision.supported_on(device)?;
        Ok(precision)
    }
}

impl std::fmt::Display for ModelDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
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
            dtype: ModelDtype::Auto,
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
    fn dtype_auto_is_bf16_on_cuda_f16_on_wgpu_f32_on_the_cpu() {
        let auto = parse("", &[]).unwrap().model.dtype;
        assert_eq!(auto, ModelDtype::Auto);
        let on = |d: ModelDtype, dev| d.resolve(dev).map_err(|e| e.to_string());
        assert_eq!(on(auto, Device::Cuda(1)), Ok(Precision::Bf16));
        assert_eq!(on(auto, Device::Cpu), Ok(Precision::F32));
        // wgpu: f16 where the adapter has it (lavapipe does).
        if crate::test_util::wgpu_available("dtype_auto_is_bf16_on_cuda_f16_on_wgpu") {
            assert!(crate::device::wgpu::supports_f16());
            assert_eq!(on(auto, Device::Wgpu), Ok(Precision::F16));
        }
        for dev in [Device::Cpu, Device::Wgpu, Device::Cuda(0)] {
            assert_eq!(on(ModelDtype::F32, dev), Ok(Precision::F32));
        }
        assert_eq!(on(ModelDtype::F16, Device::Wgpu), Ok(Precision::F16));
        let err = on(ModelDtype::F16, Device::Cpu).unwrap_err();
        assert!(err.contains("f16 is not supported on cpu"), "{err}");
        let err = on(ModelDtype::Bf16, Device::Wgpu).unwrap_err();
        assert!(err.contains("WGSL has no bf16"), "{err}");
    }

    #[test]
    fn a_dtype_typo_names_the_file_line_and_the_accepted_values() {
        let err = parse("[model]\ndtype = \"fp16\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml") && err.contains("line 2"), "{err}");
        assert!(err.contains("unknown variant `fp16`"), "{err}");
        assert!(err.contains("`f16`") && err.contains("`auto`"), "{err}");
        let cfg = parse("", &["model.dtype=bf16"]).unwrap();
        assert_eq!(cfg.model.dtype, ModelDtype::Bf16);
    }

    #[test]
    fn section_json_is_canonical() {
        let cfg = parse("", &[]).unwrap();
        let text = serde_json::to_string(&cfg.settings.raw_json("model")).unwrap();
        assert_eq!(text, r#"{"source":"builtin:tiny"}"#);
        assert_eq!(cfg.settings.raw_json("nope"), Value::Null);
    }
}
