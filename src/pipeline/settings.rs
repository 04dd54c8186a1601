//! The config document as the engine sees it: TOML sections by name, laid over a default,
//! with `--set` overrides applied. The engine knows no section's type; each stage parses
//! and validates its own (`Stage::Config`), and the app parses the shared ones (`[model]`).
//!
//! Errors keep the file's line and column: a section is first parsed from the text as
//! written (so the toml crate can point at the key), then from the merged document.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::json::canonical;

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
pub fn check(
    ok: bool,
    key: &str,
    value: impl fmt::Display,
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
///
/// # Errors
/// When it is 0.
pub fn at_least_one(key: &str, value: impl Into<u64>) -> Result<(), InvalidValue> {
    let v = value.into();
    check(v >= 1, key, v, "must be at least 1")
}

/// `key` must be a finite number in `[0, 1]`.
///
/// # Errors
/// When it is not.
pub fn fraction(key: &str, value: f64) -> Result<(), InvalidValue> {
    check(
        value.is_finite() && (0.0..=1.0).contains(&value),
        key,
        value,
        "must be in [0, 1]",
    )
}

/// One section's typed settings: how it is read from TOML and which values it allows.
pub trait SectionConfig: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Whether this is a `[section]` of the file; false only for [`NoConfig`].
    const IS_SECTION: bool = true;

    /// Checks the values' ranges (types are checked by deserialization).
    ///
    /// # Errors
    /// The first value outside its allowed range.
    fn validate(&self) -> Result<(), InvalidValue> {
        Ok(())
    }
}

/// The settings of a stage that has none (no section in the file, nothing hashed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NoConfig;

impl SectionConfig for NoConfig {
    const IS_SECTION: bool = false;
}

/// The config document: every section by name, as the file (laid over the default) and
/// the overrides leave it. Two are equal when they say the same (same sections and
/// origin), however the text was spelled.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The user's text (or the default's when no file was given), for line numbers.
    text: String,
    /// The default laid under it, then the overrides on top.
    merged: toml::Table,
    /// The `--set` assignments, in order.
    overrides: Vec<String>,
    /// Where the text came from, for messages.
    origin: PathBuf,
}

impl Settings {
    /// Reads `path` (or takes `default` when `None`), lays it over `default` and applies
    /// `--set section.key=value` overrides. Checks TOML syntax and override form only:
    /// sections are typed and validated by their owners.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML, or an override is malformed.
    pub fn load(
        path: Option<&Path>,
        default: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
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
                default.to_string(),
            ),
        };
        Self::from_toml(&text, &origin, default, overrides)
    }

    /// As [`Settings::load`], from text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Settings::load`].
    pub fn from_toml(
        text: &str,
        origin: &Path,
        default: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        };
        let user: toml::Table = toml::from_str(text).map_err(parse_err)?;
        // A section or key the file does not set takes the value the default shows
        // (issue 15), not a code default.
        let mut merged: toml::Table = toml::from_str(default).map_err(parse_err)?;
        merge(&mut merged, user);
        for assignment in overrides {
            apply_override(&mut merged, assignment)?;
        }
        Ok(Self {
            text: text.to_string(),
            merged,
            overrides: overrides.to_vec(),
            origin: origin.to_path_buf(),
        })
    }

    /// Where the config came from (a path, or the embedded default's name).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Names another origin for messages (a config rebuilt from artifacts).
    pub fn set_origin(&mut self, origin: PathBuf) {
        self.origin = origin;
    }

    /// Refuses a section no one reads (a typo such as `[trian]`), naming the valid ones.
    ///
    /// # Errors
    /// The first unknown section, with its line when it is in the file.
    pub fn check_sections(&self, known: &[&'static str]) -> Result<(), ConfigError> {
        let seed = Pick::<IgnoredAny> {
            name: None,
            known,
            _t: PhantomData,
        };
        seed.deserialize(toml::Deserializer::new(&self.text))
            .map_err(|e| self.parse_error(&e))?;
        if let Some(k) = self.merged.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::Override {
                assignment: self.overrides.join(" --set "),
                message: format!("unknown section `{k}`, expected one of {}", one_of(known)),
            });
        }
        Ok(())
    }

    /// Section `name`, typed and validated.
    ///
    /// # Errors
    /// A wrong type or unknown key (with its line when it is in the file), or a value out
    /// of range (naming the `--set` that gave it, when one did).
    pub fn section<T: SectionConfig>(&self, name: &str) -> Result<T, ConfigError> {
        // First pass on the text itself, so errors carry line and column.
        let seed = Pick::<T> {
            name: Some(name),
            known: &[],
            _t: PhantomData,
        };
        seed.deserialize(toml::Deserializer::new(&self.text))
            .map_err(|e| self.parse_error(&e))?;
        let value = self
            .merged
            .get(name)
            .cloned()
            .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
        let typed = T::deserialize(value).map_err(|e| {
            let message = format!("{name}: {}", e.to_string().trim_end());
            if self.overrides.is_empty() {
                ConfigError::Parse {
                    path: self.origin.clone(),
                    message,
                }
            } else {
                ConfigError::Override {
                    assignment: self.overrides.join(" --set "),
                    message,
                }
            }
        })?;
        typed.validate().map_err(|invalid| self.invalid(invalid))?;
        Ok(typed)
    }

    /// `invalid` as an error naming this config's file and the `--set` that gave the value:
    /// for checks across sections, which no single section's `validate` can make.
    pub fn invalid(&self, invalid: InvalidValue) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.clone(),
            via: self.override_of(&invalid.key),
            invalid,
        }
    }

    /// Section `name` exactly as merged, as canonical JSON (`null` when absent). Hashing
    /// uses the typed form where the owner is known ([`Settings::typed_json`]).
    pub fn raw_json(&self, name: &str) -> Value {
        canonical(
            self.merged
                .get(name)
                .map(|v| serde_json::to_value(v).expect("TOML values are JSON values"))
                .unwrap_or(Value::Null),
        )
    }

    /// Section `name` read as `T` and written back as canonical JSON: every field present
    /// with its default, so equal settings hash equally however they were written.
    ///
    /// # Errors
    /// As [`Settings::section`].
    pub fn typed_json<T: SectionConfig>(&self, name: &str) -> Result<Value, ConfigError> {
        let typed: T = self.section(name)?;
        Ok(canonical(
            serde_json::to_value(&typed).expect("a config section serializes: plain data"),
        ))
    }

    fn parse_error(&self, e: &toml::de::Error) -> ConfigError {
        ConfigError::Parse {
            path: self.origin.clone(),
            message: e.to_string().trim_end().to_string(),
        }
    }

    /// The last override of `key` (or of a section holding it): the one that decided it.
    fn override_of(&self, key: &str) -> Option<String> {
        self.overrides
            .iter()
            .rev()
            .find(|o| {
                let k = o.split('=').next().unwrap_or("").trim();
                !k.is_empty()
                    && key.strip_prefix(k).is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                    })
            })
            .cloned()
    }
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.merged == other.merged && self.origin == other.origin
    }
}

/// Reads one section of a TOML document (`name`), ignoring the others; or, with no name,
/// checks that every section is `known`. Running it on the document's own text lets the
/// toml crate report line and column.
struct Pick<'a, T> {
    name: Option<&'a str>,
    known: &'a [&'static str],
    _t: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Pick<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Pick<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table of sections")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            match self.name {
                Some(name) if key == name => found = Some(map.next_value::<T>()?),
                Some(_) => {
                    map.next_value::<IgnoredAny>()?;
                }
                None if self.known.contains(&key.as_str()) => {
                    map.next_value::<IgnoredAny>()?;
                }
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown field `{key}`, expected one of {}",
                        one_of(self.known)
                    )))
                }
            }
        }
        Ok(found)
    }
}

/// `` `a`, `b`, `c` ``: the valid names, as serde lists expected fields.
fn one_of(names: &[&str]) -> String {
    names
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
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
