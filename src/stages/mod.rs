//! The pipeline's stages, one file each, in execution order.

pub mod baseline;
pub mod download;
pub mod evaluate;
pub mod prepare;
pub mod prepare_metrics;
pub mod probe;
pub mod quantize;
pub mod report;
pub mod train;

use std::path::Path;

use crate::config::Config;
use crate::pipeline::{AnyStage, ConfigError, Pipeline};

/// The stages this build of medpipe has, in pipeline order.
pub fn registry() -> Vec<Box<dyn AnyStage>> {
    let mut stages: Vec<Box<dyn AnyStage>> = vec![
        Box::new(probe::Probe),
        Box::new(download::Download),
        Box::new(baseline::Baseline),
        Box::new(quantize::Quantize),
        // Prepare resolves `dataset = ..` sources through download.json (registered above).
        Box::new(prepare::Prepare::new(&["download"])),
        Box::new(train::Train),
    ];
    // Evaluate reads the variant stages (quantize, train) registered before it, when present.
    let earlier: Vec<&'static str> = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(evaluate::Evaluate::new(&earlier)));
    // The report comes last and reads whatever ran before it.
    let earlier = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(report::Report::new(earlier)));
    stages
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
    pipeline.check_config(config)
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
}
