//! The pipeline's stages, one file (or folder) each, in execution order.
//!
//! Adding a stage is its file plus one line in [`work_stages`]: the engine, the config
//! check, `medpipe stages`, `status` and the report all take the list from here.

pub mod baseline;
pub mod download;
pub mod evaluate;
pub mod memory;
pub mod prepare;
pub mod probe;
pub mod quantize;
pub mod report;
pub mod train;

use std::path::Path;

use crate::config::Config;
use crate::pipeline::{AnyStage, ConfigError, Pipeline, Stage};

/// The stages that do the work, in pipeline order (the report is added after them).
pub fn work_stages() -> Vec<Box<dyn AnyStage>> {
    let mut stages: Vec<Box<dyn AnyStage>> = vec![
        Box::new(probe::Probe),
        Box::new(download::Download),
        Box::new(baseline::Baseline),
        Box::new(quantize::Quantize),
        // Prepare resolves `dataset = ..` sources through download.json (registered above).
        Box::new(prepare::Prepare::new(&[download::Download::NAME])),
        Box::new(train::Train),
    ];
    // Evaluate reads the variant stages (quantize, train) registered before it, when present.
    let earlier: Vec<&'static str> = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(evaluate::Evaluate::new(&earlier)));
    stages
}

/// `work` followed by the report, which reads every one of them when it has run.
pub fn with_report(mut work: Vec<Box<dyn AnyStage>>) -> Vec<Box<dyn AnyStage>> {
    let earlier = work.iter().map(|s| s.name()).collect();
    work.push(Box::new(report::Report::new(earlier)));
    work
}

/// The stages this build of medpipe has, in pipeline order.
pub fn registry() -> Vec<Box<dyn AnyStage>> {
    with_report(work_stages())
}

/// The standard pipeline.
pub fn pipeline() -> Pipeline {
    Pipeline::new(registry())
}

/// Loads the config (`path`, or the embedded default) with `--set` overrides and checks it
/// against every registered stage: an unknown section, a wrong type or a value out of range
/// is refused here, before anything runs, whichever stage would read it.
///
/// # Errors
/// As [`Config::load`] and [`Pipeline::check_config`].
pub fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
    let config = Config::load(path, overrides)?;
    check(&config)?;
    Ok(config)
}

/// Checks a loaded config against the whole registry: no unknown section, every stage's
/// section typed and in range.
///
/// # Errors
/// As [`Pipeline::check_config`], and a section no stage reads.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let pipeline = pipeline();
    config.check_sections(&pipeline.config_sections())?;
    pipeline.check_config(config)?;
    // A dtype the named device cannot compute in fails now, not after the stages before
    // the first model stage (`auto` devices are checked when the probe has chosen).
    // `auto` has a precision on every device; resolving it would open a wgpu adapter.
    let probe: probe::ProbeConfig = config.section("probe")?;
    let explicit = config.model.dtype != crate::config::ModelDtype::Auto;
    if let Some(device) = crate::device::Device::parse(&probe.device)
        .ok()
        .filter(|_| explicit)
    {
        if let Err(e) = config.model.dtype.resolve(device) {
            return Err(config.invalid(crate::pipeline::InvalidValue {
                key: "model.dtype".into(),
                value: format!("\"{}\"", config.model.dtype),
                allowed: format!("with probe.device = \"{}\": {e}", probe.device),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Config, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let config = Config::from_toml(text, Path::new("test.toml"), &sets)?;
        check(&config)?;
        Ok(config)
    }

    fn train(cfg: &Config) -> train::TrainStageConfig {
        cfg.section("train").unwrap()
    }

    #[test]
    fn unknown_section_lists_valid_sections() {
        let err = parse("[trian]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown field `trian`"), "{err}");
        assert!(err.contains("`probe`"), "{err}");
    }

    #[test]
    fn an_unknown_section_given_by_an_override_is_refused_too() {
        let err = parse("", &["trian.r=4"]).unwrap_err().to_string();
        assert!(err.contains("--set trian.r=4"), "{err}");
        assert!(err.contains("unknown section `trian`"), "{err}");
    }

    #[test]
    fn the_valid_sections_are_the_shared_model_and_one_per_stage_with_settings() {
        assert_eq!(
            pipeline().config_sections(),
            [
                "probe", "model", "download", "baseline", "quantize", "prepare", "train",
                "evaluate"
            ]
        );
    }

    #[test]
    fn a_file_without_a_section_takes_the_values_default_toml_shows() {
        let cfg = parse("[evaluate]\nmax_new_tokens = 32\n", &[]).unwrap();
        let default = load_config(None, &[]).unwrap();
        assert_eq!(train(&cfg), train(&default));
        assert_eq!(
            train(&cfg).r,
            16,
            "pipeline/default.toml's r, not the recipe's 64"
        );
        let prepare = |c: &Config| c.section::<prepare::PrepareConfig>("prepare").unwrap();
        assert_eq!(prepare(&cfg), prepare(&default));
        let evaluate = |c: &Config| c.section::<evaluate::EvaluateConfig>("evaluate").unwrap();
        assert_eq!(evaluate(&cfg).max_new_tokens, 32);
        assert_eq!(evaluate(&cfg).batch_size, evaluate(&default).batch_size);
    }

    #[test]
    fn the_7b_config_keeps_the_full_qlora_recipe() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline/qwen2.5-vl-7b.toml");
        let cfg = load_config(Some(&path), &[]).unwrap();
        let t = train(&cfg);
        assert_eq!((t.r, t.lora_alpha, t.max_samples), (64, 128.0, 0));
        assert_eq!(t.recompute.to_string(), "layers");
    }

    #[test]
    fn a_recompute_typo_names_the_accepted_forms() {
        let err = parse("[train]\nrecompute = \"every_n:0\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(
            err.contains("\"layers\" or \"every_n:K\" with K >= 1"),
            "{err}"
        );
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

    /// A stage added by a test: its own `[extra]` section and typed metrics. Nothing
    /// else in the crate names it.
    struct Extra;

    #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct ExtraConfig {
        level: u32,
    }

    impl crate::pipeline::SectionConfig for ExtraConfig {
        fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
            crate::pipeline::settings::check(
                self.level <= 9,
                "extra.level",
                self.level,
                "at most 9",
            )
        }
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct ExtraMetrics {
        level_squared: u32,
    }

    impl Stage for Extra {
        const NAME: &'static str = "extra";
        type Config = ExtraConfig;
        type Metrics = ExtraMetrics;

        fn description(&self) -> &'static str {
            "a stage added by a test"
        }
        fn artifact_file(&self) -> &'static str {
            "extra.json"
        }
        fn upstream(&self) -> &[&'static str] {
            &[]
        }
        fn code_version(&self) -> u32 {
            1
        }
        fn run(
            &self,
            cfg: &ExtraConfig,
            _: &mut crate::pipeline::StageCtx<'_>,
        ) -> anyhow::Result<crate::pipeline::StageOutput> {
            let metrics = ExtraMetrics {
                level_squared: cfg.level * cfg.level,
            };
            Ok(crate::pipeline::StageOutput {
                metrics: serde_json::to_value(metrics)?,
                summary: vec![("level²".into(), (cfg.level * cfg.level).to_string())],
                ..Default::default()
            })
        }
    }

    #[test]
    fn model_stages_hash_only_the_image_bounds_of_model_and_probe_and_download_only_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let ws = crate::pipeline::Workspace::open(dir.path()).unwrap();
        let hash_of = |stage: &str, sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let cfg = Config::from_toml("", Path::new("x.toml"), &sets).unwrap();
            pipeline()
                .stages()
                .find(|s| s.name() == stage)
                .unwrap()
                .config_json(&cfg.settings, &ws)
                .unwrap()
        };
        for stage in ["baseline", "quantize", "train", "evaluate"] {
            let plain = hash_of(stage, &[]);
            assert!(plain.get("model").is_none(), "{stage}: {plain}");
            assert_eq!(plain, hash_of(stage, &["model.memory_limit_mib=100"]));
            assert_eq!(
                hash_of(stage, &["model.max_pixels=50176"])["model"],
                serde_json::json!({ "max_pixels": 50176 }),
                "{stage}"
            );
        }
        // The compute dtype changes what every model stage measures or trains.
        for stage in ["baseline", "quantize", "train", "evaluate"] {
            assert_eq!(
                hash_of(stage, &["model.dtype=f16"])["model"],
                serde_json::json!({ "dtype": "f16" }),
                "{stage}"
            );
        }
        // Recomputation and the read-back interval change the time and memory of training,
        // not the adapter, while the other train keys are hashed.
        let train = hash_of("train", &[]);
        assert_eq!(train, hash_of("train", &["train.recompute=\"layers\""]));
        assert_eq!(train, hash_of("train", &["train.log_every=1"]));
        assert!(train["train"].get("recompute").is_none(), "{train}");
        assert!(train["train"].get("log_every").is_none(), "{train}");
        assert_ne!(train, hash_of("train", &["train.lora_dropout=0.1"]));
        for stage in ["probe", "download"] {
            let plain = hash_of(stage, &[]);
            assert_eq!(
                plain["model"],
                serde_json::json!({ "source": "builtin:tiny" })
            );
            for set in ["model.memory_limit_mib=100", "model.max_pixels=50176"] {
                assert_eq!(plain, hash_of(stage, &[set]), "{stage} {set}");
            }
        }
    }

    #[test]
    fn a_dtype_the_named_device_cannot_compute_in_is_refused_before_any_stage_runs() {
        let err = parse("[model]\ndtype = \"f16\"\n", &["probe.device=cpu"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config test.toml: model.dtype = \"f16\" is not allowed (with probe.device = \"cpu\": dtype f16 is not supported on cpu"),
            "{err}"
        );
        let err = parse("", &["probe.device=wgpu", "model.dtype=bf16"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set model.dtype=bf16"), "{err}");
        assert!(err.contains("WGSL has no bf16"), "{err}");
        // auto is checked once the probe has chosen; every device has a precision for auto.
        for device in ["auto", "cpu", "wgpu", "cuda:1"] {
            parse("", &[&format!("probe.device={device}")]).unwrap();
        }
        parse("", &["probe.device=cuda", "model.dtype=bf16"]).unwrap();
    }

    #[test]
    fn issue_16_a_stage_added_with_one_line_shows_in_stages_config_status_and_the_report() {
        let mut work = work_stages();
        work.push(Box::new(Extra)); // the one line
        let p = Pipeline::new(with_report(work));

        // `medpipe stages` lists the pipeline's stages.
        let names: Vec<&str> = p.stages().map(|s| s.name()).collect();
        assert_eq!(&names[names.len() - 2..], ["extra", "report"]);

        // Its section is known, typed and validated with the others.
        let cfg = Config::from_toml("[extra]\nlevel = 3\n", Path::new("x.toml"), &[]).unwrap();
        cfg.check_sections(&p.config_sections()).unwrap();
        p.check_config(&cfg).unwrap();
        let bad = Config::from_toml("[extra]\nlevel = 12\n", Path::new("x.toml"), &[]).unwrap();
        assert_eq!(
            p.check_config(&bad).unwrap_err().to_string(),
            "config x.toml: extra.level = 12 is not allowed (at most 9)"
        );

        // `medpipe status` shows it; it runs; the report lists it with its figures.
        let dir = tempfile::tempdir().unwrap();
        let ws = crate::pipeline::Workspace::open(dir.path()).unwrap();
        let state = |p: &Pipeline| {
            p.status(&ws, &cfg)
                .unwrap()
                .into_iter()
                .find(|s| s.stage == "extra")
                .map(|s| s.state)
        };
        assert_eq!(state(&p), Some("missing"));
        let only = |stage: &str| crate::pipeline::RunOptions {
            only: Some(stage.into()),
            quiet: true,
            ..Default::default()
        };
        let run = p.run(&ws, &cfg, &only("extra"), &mut |_| {}).unwrap();
        assert!(!run.failed(), "{run:?}");
        assert_eq!(state(&p), Some("completed"));
        let run = p.run(&ws, &cfg, &only("report"), &mut |_| {}).unwrap();
        assert!(!run.failed(), "{run:?}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ws.reports().join("FINAL_REPORT.json")).unwrap())
                .unwrap();
        let entry = report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == "extra")
            .unwrap_or_else(|| panic!("no `extra` in {}", report["stages"]));
        assert_eq!(entry["status"], "completed");
        assert_eq!(entry["summary"][0], serde_json::json!(["level²", "9"]));
    }

    #[test]
    fn issue_16_metrics_that_do_not_match_the_declared_type_fail_the_stage() {
        struct Liar;
        impl Stage for Liar {
            const NAME: &'static str = "liar";
            type Config = crate::pipeline::NoConfig;
            type Metrics = ExtraMetrics;
            fn description(&self) -> &'static str {
                "records metrics of the wrong shape"
            }
            fn artifact_file(&self) -> &'static str {
                "liar.json"
            }
            fn upstream(&self) -> &[&'static str] {
                &[]
            }
            fn code_version(&self) -> u32 {
                1
            }
            fn run(
                &self,
                _: &crate::pipeline::NoConfig,
                _: &mut crate::pipeline::StageCtx<'_>,
            ) -> anyhow::Result<crate::pipeline::StageOutput> {
                Ok(crate::pipeline::StageOutput {
                    metrics: serde_json::json!({"level_squared": "nine"}),
                    ..Default::default()
                })
            }
        }
        let p = Pipeline::new(vec![Box::new(Liar)]);
        let dir = tempfile::tempdir().unwrap();
        let ws = crate::pipeline::Workspace::open(dir.path()).unwrap();
        let cfg = Config::load(None, &[]).unwrap();
        let opts = crate::pipeline::RunOptions {
            quiet: true,
            ..Default::default()
        };
        let run = p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap();
        let err = run.stages[0].error.as_deref().unwrap_or_default();
        assert!(
            err.contains("do not read as its declared metrics type"),
            "{err}"
        );
    }
}
