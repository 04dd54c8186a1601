//! download: puts the model (and any dataset sources) on disk in Hugging Face layout and
//! records every file.
//!
//! - `builtin:tiny` is materialized from `download.seed` under `checkpoints/base/`.
//! - `hf:org/name[@revision]` is fetched into the standard HF cache (shared with Python),
//!   verified against the hub's sha256, and pinned to the commit it resolved to.
//! - A local directory is used in place (its files are hashed).
//!
//! Writes `reports/download.json`. Its metrics carry `model_dir` (the model in HF layout:
//! what later stages load) and `datasets: [{name, dir, files}]`. A directory inside the
//! workspace (`checkpoints/base`) is recorded relative to it, so a copied or moved workspace
//! loads its own files; the HF cache and directories elsewhere stay absolute. Local sources
//! (`model.source`, a dataset's `source`) resolve against the workspace, as prepare's do.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::builtin;
use crate::fs::hash_file;
use crate::hub::{self, FetchedRepo, HubEnv, Progress, RepoRef};
use crate::pipeline::{Stage, StageCtx, StageOutput};

/// Documents of generated clinical text the builtin:tiny tokenizer is trained on.
const TOKENIZER_CORPUS_DOCS: usize = 2_000;

/// `[download]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DownloadConfig {
    /// Seed of `builtin:tiny` (weights and tokenizer corpus): the same seed gives
    /// byte-identical files.
    #[serde(default)]
    pub seed: u64,
    /// Files fetched from a `hf:` model repository (fnmatch patterns: `*` also matches `/`).
    #[serde(default = "default_model_files")]
    pub model_files: Vec<String>,
    /// Extra attempts at an interrupted transfer within one run (each resumes where the last
    /// stopped); a later `medpipe run` also resumes.
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// Dataset sources to fetch.
    #[serde(default)]
    pub datasets: Vec<DatasetSource>,
}

/// One dataset source: `[[download.datasets]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    /// Name later stages refer to it by.
    pub name: String,
    /// `hf-dataset:org/name[@revision]` or a local directory.
    pub source: String,
    /// Files to fetch (fnmatch patterns); each must match at least one file.
    #[serde(default = "default_dataset_files")]
    pub files: Vec<String>,
}

fn default_model_files() -> Vec<String> {
    [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "*.safetensors",
        "model.safetensors.index.json",
    ]
    .map(String::from)
    .to_vec()
}

fn default_retries() -> usize {
    3
}

fn default_dataset_files() -> Vec<String> {
    vec!["*".into()]
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            model_files: default_model_files(),
            retries: default_retries(),
            datasets: Vec::new(),
        }
    }
}

impl crate::pipeline::SectionConfig for DownloadConfig {
    /// Checks `[download]`: something to fetch, and datasets with distinct names.
    ///
    /// # Errors
    /// Empty `model_files`, a dataset without a name, files or source, or two datasets of one
    /// name.
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::check;
        check(
            !self.model_files.is_empty(),
            "download.model_files",
            "[]",
            "must list at least config.json and *.safetensors",
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, d) in self.datasets.iter().enumerate() {
            let key = |k: &str| format!("download.datasets[{i}].{k}");
            check(
                !d.name.trim().is_empty(),
                &key("name"),
                "\"\"",
                "must not be empty",
            )?;
            check(
                seen.insert(d.name.as_str()),
                &key("name"),
                format!("{:?}", d.name),
                "must differ from every other dataset's name",
            )?;
            check(
                !d.source.trim().is_empty(),
                &key("source"),
                "\"\"",
                "must be hf-dataset:org/name[@revision] or a directory",
            )?;
            check(
                !d.files.is_empty(),
                &key("files"),
                "[]",
                "must list at least one pattern",
            )?;
        }
        Ok(())
    }
}

/// Files a model directory must have.
const REQUIRED_MODEL_FILES: [&str; 2] = ["config.json", "*.safetensors"];

/// `download.json`: the model and dataset files fetched or materialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DownloadMetrics {
    /// Model source as configured (`builtin:tiny`, `hf:Qwen/Qwen2.5-VL-7B-Instruct`).
    pub model_source: String,
    /// Resolved revision (commit sha) when the source has one.
    pub revision: Option<String>,
    /// The model's directory: workspace-relative when inside the workspace, else absolute.
    pub model_dir: String,
    /// The commit the model resolved to (`None` for builtin and local models).
    pub model_revision: Option<String>,
    /// The datasets fetched, with their files (read by prepare's `dataset = ..` sources).
    pub datasets: Vec<crate::data::downloaded::Downloaded>,
    /// Every file with its size and hash.
    pub files: Vec<DownloadedFile>,
    /// Sum of `files[].bytes`.
    pub total_bytes: u64,
}

/// One downloaded or materialized file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DownloadedFile {
    /// Path relative to the model or dataset directory.
    pub path: String,
    /// Size, bytes.
    pub bytes: u64,
    /// sha256 of the content, hex.
    pub sha256: String,
    /// Where it came from (`hf:...@rev`, `builtin:tiny seed 0`, a local path).
    pub source: String,
}

/// The download stage.
pub struct Download;

/// The model directory download.json records, as an absolute path (it is recorded
/// workspace-relative when the model lives in the workspace, issue 15).
///
/// # Errors
/// The artifact records no model directory.
pub fn model_dir(ctx: &StageCtx<'_>, download: &DownloadMetrics) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        !download.model_dir.is_empty(),
        "download.json has no metrics.model_dir"
    );
    Ok(ctx.path(&download.model_dir))
}

impl Stage for Download {
    const NAME: &'static str = "download";
    type Config = DownloadConfig;
    type Metrics = DownloadMetrics;

    fn description(&self) -> &'static str {
        "fetch the model (hf: into the HF cache, verified) or materialize builtin:tiny; fetch datasets"
    }
    fn artifact_file(&self) -> &'static str {
        "download.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe"]
    }
    /// Only `[model] source` changes what is fetched.
    fn shared_sections(&self) -> &[&'static str] {
        &["model.source"]
    }
    fn code_version(&self) -> u32 {
        // 2: workspace-relative model_dir, dataset dirs and cache paths (issue 15).
        2
    }

    fn run(&self, cfg: &DownloadConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let clock = Instant::now();
        let source = ctx
            .settings()
            .section::<crate::config::ModelConfig>("model")?
            .source;
        let env = HubEnv::from_env();
        let mut bar: Option<ProgressBar> = None;

        let (kind, model) = if let Some(name) = source.strip_prefix("builtin:") {
            if name != "tiny" {
                bail!("unknown builtin model `{source}` (available: builtin:tiny)");
            }
            ("builtin", place_builtin_tiny(ctx, cfg.seed)?)
        } else if let Some(repo) = RepoRef::parse(&source)? {
            if repo.kind != hub::RepoKind::Model {
                bail!("[model] source `{source}` names a dataset; use hf:org/name for a model");
            }
            let required = REQUIRED_MODEL_FILES.map(String::from);
            let fetched = hub::fetch(
                &env,
                &repo,
                &cfg.model_files,
                &required,
                cfg.retries,
                &mut |p| on_progress(ctx, &mut bar, p),
            )
            .with_context(|| format!("fetching model {repo}"))?;
            ("hf", Placed::from_hub(fetched))
        } else {
            let required = REQUIRED_MODEL_FILES.map(String::from);
            let dir = ctx.workspace().root().join(&source);
            let placed =
                place_local(&source, &dir, &cfg.model_files, &required).with_context(|| {
                    format!("[model] source `{source}` (a Hugging Face model directory)")
                })?;
            ("local", placed)
        };
        check_shards(&model.dir)?;

        let mut seen = std::collections::BTreeSet::new();
        let mut sets = Vec::new();
        for ds in &cfg.datasets {
            if !seen.insert(ds.name.as_str()) {
                bail!("two [[download.datasets]] are named `{}`", ds.name);
            }
            let placed = match RepoRef::parse(&ds.source)? {
                Some(repo) if repo.kind == hub::RepoKind::Dataset => {
                    let fetched =
                        hub::fetch(&env, &repo, &ds.files, &ds.files, cfg.retries, &mut |p| {
                            on_progress(ctx, &mut bar, p)
                        })
                        .with_context(|| format!("fetching dataset `{}` ({repo})", ds.name))?;
                    Placed::from_hub(fetched)
                }
                Some(_) => bail!(
                    "dataset `{}`: `{}` names a model; use hf-dataset:org/name",
                    ds.name,
                    ds.source
                ),
                None => {
                    let dir = ctx.workspace().root().join(&ds.source);
                    place_local(&ds.source, &dir, &ds.files, &ds.files)
                        .with_context(|| format!("dataset `{}`", ds.name))?
                }
            };
            sets.push((ds, placed));
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        // Record what lives in the workspace relative to it (issue 15: a copy must not load
        // the original's files).
        let ws = ctx.workspace();
        let mut model = model;
        model.relativize(ws);
        for (_, p) in &mut sets {
            p.relativize(ws);
        }

        let datasets: Vec<Value> = sets
            .iter()
            .map(|(ds, p)| {
                json!({
                    "name": ds.name,
                    "source": ds.source,
                    "revision": p.revision,
                    "dir": p.dir,
                    "files": p.records.iter().map(|r| r["path"].clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let all = std::iter::once(&model).chain(sets.iter().map(|(_, p)| p));
        let records: Vec<&Value> = all.clone().flat_map(|p| &p.records).collect();
        let outputs: Vec<PathBuf> = all.clone().map(|p| p.dir.clone()).collect();
        let warnings: Vec<String> = all.flat_map(|p| p.warnings.iter().cloned()).collect();

        let bytes = |action: Option<&str>| -> u64 {
            records
                .iter()
                .filter(|r| action.is_none_or(|a| r["action"] == a))
                .filter_map(|r| r["size_bytes"].as_u64())
                .sum()
        };
        let (total_bytes, downloaded_bytes) = (bytes(None), bytes(Some("downloaded")));
        let summary = summarize(
            &source,
            &model,
            &records,
            sets.len(),
            total_bytes,
            downloaded_bytes,
        );
        let metrics = json!({
            "model_source": source,
            "model_kind": kind,
            "model_dir": model.dir,
            "model_revision": model.revision,
            "builtin": model.builtin,
            "datasets": datasets,
            "files": records,
            "total_bytes": total_bytes,
            "downloaded_bytes": downloaded_bytes,
            "reused_bytes": bytes(Some("reused")),
            "elapsed_s": clock.elapsed().as_secs_f64(),
            "hub": {
                "endpoint": env.endpoint,
                "cache_dir": env.cache_dir,
                "offline": env.offline,
                "token_set": env.token.is_some(),
            },
        });
        Ok(StageOutput {
            metrics,
            outputs,
            summary,
            warnings,
        })
    }
}

/// A model or dataset on disk in HF layout, with one report row per file.
struct Placed {
    /// Absolute directory (snapshot, checkpoint or local directory).
    dir: PathBuf,
    /// The commit a hub source resolved to.
    revision: Option<String>,
    records: Vec<Value>,
    warnings: Vec<String>,
    /// For builtin:tiny: seed, tokenizer size and dimensions.
    builtin: Value,
}

impl Placed {
    /// Rewrites the directory and the files' `cache_path` relative to the workspace when
    /// they are inside it.
    fn relativize(&mut self, ws: &crate::pipeline::Workspace) {
        self.dir = ws.relative(&self.dir);
        for r in &mut self.records {
            if let Some(p) = r["cache_path"].as_str().map(PathBuf::from) {
                r["cache_path"] = json!(ws.relative(&p));
            }
        }
    }

    fn from_hub(f: FetchedRepo) -> Self {
        Self {
            records: hub_records(&f),
            dir: f.snapshot_dir,
            revision: Some(f.commit),
            warnings: f.warnings,
            builtin: Value::Null,
        }
    }
}

/// Materializes builtin:tiny under `checkpoints/base`.
fn place_builtin_tiny(ctx: &StageCtx<'_>, seed: u64) -> anyhow::Result<Placed> {
    let dir = ctx.workspace().checkpoints().join("base");
    let corpus = builtin::tokenizer_corpus(seed, TOKENIZER_CORPUS_DOCS);
    let m = builtin::materialize(&dir, seed, &corpus)
        .with_context(|| format!("materializing builtin:tiny into {}", dir.display()))?;
    let records = m
        .files
        .iter()
        .map(|f| local_record("builtin:tiny", &dir, f, "generated"))
        .collect::<anyhow::Result<_>>()?;
    let s = &m.spec;
    let builtin = json!({
        "seed": seed,
        "tokenizer_tokens": m.tokenizer_size,
        "dims": {
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads,
            "vision_depth": s.vision_config.depth,
            "vision_hidden_size": s.vision_config.hidden_size,
            "vision_num_heads": s.vision_config.num_heads,
        },
    });
    Ok(Placed {
        dir,
        revision: None,
        records,
        warnings: Vec::new(),
        builtin,
    })
}

/// The local directory `dir` (the source `source` resolved against the workspace) used in
/// place: its files matching `patterns`, each pattern in `required` matching at least one.
fn place_local(
    source: &str,
    dir: &Path,
    patterns: &[String],
    required: &[String],
) -> anyhow::Result<Placed> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving `{source}`"))?;
    let names = local_files(&dir, patterns)?;
    if let Some(p) = required
        .iter()
        .find(|p| !names.iter().any(|n| hub::glob_match(p, n)))
    {
        bail!("{} has no file matching `{p}`", dir.display());
    }
    let records = names
        .iter()
        .map(|n| local_record(source, &dir, n, "local"))
        .collect::<anyhow::Result<_>>()?;
    Ok(Placed {
        dir,
        revision: None,
        records,
        warnings: Vec::new(),
        builtin: Value::Null,
    })
}

/// Key figures: the model, where it is, and how its files came.
fn summarize(
    source: &str,
    model: &Placed,
    records: &[&Value],
    n_datasets: usize,
    total_bytes: u64,
    downloaded_bytes: u64,
) -> Vec<(String, String)> {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let breakdown = ["downloaded", "reused", "generated", "local"]
        .iter()
        .map(|a| (*a, records.iter().filter(|r| r["action"] == *a).count()))
        .filter(|(_, n)| *n > 0)
        .map(|(a, n)| match a {
            "downloaded" => format!("{n} downloaded, {}", mb(downloaded_bytes)),
            _ => format!("{n} {a}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut summary = vec![
        (
            "model".to_string(),
            match &model.revision {
                Some(c) => format!("{source} @ {c}"),
                None => source.to_string(),
            },
        ),
        ("model dir".to_string(), model.dir.display().to_string()),
        (
            "files".to_string(),
            format!("{} files, {} ({breakdown})", records.len(), mb(total_bytes)),
        ),
    ];
    if n_datasets > 0 {
        summary.push(("datasets".into(), n_datasets.to_string()));
    }
    summary
}

/// When the model is sharded, every shard its `model.safetensors.index.json` names must be
/// present (a pattern that fetched some shards but not others would load half a model).
fn check_shards(model_dir: &Path) -> anyhow::Result<()> {
    let index = model_dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return Ok(());
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let Some(map) = v["weight_map"].as_object() else {
        bail!("{} has no `weight_map` object", index.display());
    };
    let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    shards.sort();
    shards.dedup();
    if let Some(missing) = shards.iter().find(|s| !model_dir.join(s).is_file()) {
        bail!(
            "{} names shard `{missing}`, which is not in {} (check download.model_files)",
            index.display(),
            model_dir.display()
        );
    }
    Ok(())
}

/// Feeds fetch progress into one bytes bar (bytes, rate, ETA), created when the total is known.
fn on_progress(ctx: &StageCtx<'_>, bar: &mut Option<ProgressBar>, p: Progress<'_>) {
    match p {
        Progress::Planned { total_bytes } => {
            if total_bytes > 0 {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                *bar = Some(ctx.bytes_bar(total_bytes, "download"));
            }
        }
        Progress::File { name } => {
            if let Some(b) = bar {
                b.set_message(name.to_string());
            }
        }
        Progress::Advanced { bytes } => {
            if let Some(b) = bar {
                b.inc(bytes);
            }
        }
    }
}

/// The report rows of a fetched repository.
fn hub_records(f: &FetchedRepo) -> Vec<Value> {
    f.files
        .iter()
        .map(|file| {
            json!({
                "source": f.repo.to_string(),
                "path": file.path,
                "revision": f.commit,
                "size_bytes": file.size_bytes,
                "sha256": file.sha256,
                "expected_sha256": file.expected_sha256,
                "verified": file.expected_sha256.is_some(),
                "cache_path": file.cache_path,
                "action": file.action.as_str(),
                "resumed_from_bytes": file.resumed_from_bytes,
            })
        })
        .collect()
}

/// The report row of a file in a local (or generated) directory.
fn local_record(source: &str, dir: &Path, name: &str, action: &str) -> anyhow::Result<Value> {
    let path = dir.join(name);
    let (sha256, size) = hash_file(&path)?;
    Ok(json!({
        "source": source,
        "path": name,
        "revision": null,
        "size_bytes": size,
        "sha256": sha256,
        "expected_sha256": null,
        "verified": false,
        "cache_path": path,
        "action": action,
        "resumed_from_bytes": 0,
    }))
}

/// Files under `dir` (relative, `/`-separated, sorted) matching any pattern.
fn local_files(dir: &Path, patterns: &[String]) -> anyhow::Result<Vec<String>> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (sources are builtin:tiny, hf:org/name[@revision], hf-dataset:org/name[@revision], or a local directory)",
            dir.display()
        );
    }
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                walk(&e.path(), &format!("{name}/"), out)?;
            } else {
                out.push(name);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.retain(|n| patterns.iter().any(|p| hub::glob_match(p, n)));
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_fetches_only_what_the_model_needs() {
        let c = DownloadConfig::default();
        let wanted = |n: &str| c.model_files.iter().any(|p| hub::glob_match(p, n));
        for n in [
            "config.json",
            "model-00001-of-00005.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.json",
            "preprocessor_config.json",
        ] {
            assert!(wanted(n), "{n}");
        }
        for n in [
            "pytorch_model.bin",
            "README.md",
            "onnx/model.onnx",
            "merges.txt",
        ] {
            assert!(!wanted(n), "{n}");
        }
    }

    #[test]
    fn a_shard_named_by_the_index_but_absent_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(tmp.path().join("model.safetensors.index.json"), index).unwrap();
        std::fs::write(tmp.path().join("model-00001-of-00002.safetensors"), b"x").unwrap();
        let err = check_shards(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        std::fs::write(tmp.path().join("model-00002-of-00002.safetensors"), b"x").unwrap();
        check_shards(tmp.path()).unwrap();
    }

    #[test]
    fn local_directory_lists_matching_files_and_rejects_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("sub")).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "README.md",
            "sub/x.safetensors",
        ] {
            std::fs::write(tmp.path().join(f), b"x").unwrap();
        }
        let names = local_files(tmp.path(), &default_model_files()).unwrap();
        assert_eq!(
            names,
            ["config.json", "model.safetensors", "sub/x.safetensors"]
        );
        let err = local_files(&tmp.path().join("README.md"), &default_model_files()).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
