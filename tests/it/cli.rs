//! The command line as a user meets it: the real binary in temp workspaces.

use crate::common::*;

#[test]
fn run_to_probe_writes_a_truthful_environment_and_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["run", "--to", "probe", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("reports/environment.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(env["status"], "completed");
    assert_eq!(env["schema_version"], 1);
    let m = &env["metrics"];
    let threads = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(m["cpu"]["logical_threads"].as_u64(), Some(threads));
    assert!(m["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(m["disk"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(m["device"], "cpu", "no CUDA in this build");
    assert!(m["gpu"]["gpus"].is_array());
    assert_eq!(m["versions"]["medpipe"], env!("CARGO_PKG_VERSION"));
    assert!(std::fs::read_to_string(dir.path().join("BUILD_LOG.md"))
        .unwrap()
        .contains("### probe — completed"));

    let st = run_in(dir.path(), &["status"]);
    assert!(st.status.success());
    assert!(
        stdout(&st).contains("probe      completed"),
        "{}",
        stdout(&st)
    );
    let again = run_in(dir.path(), &["run", "--to", "probe", "--quiet"]);
    assert!(
        stderr(&again).contains("probe: skipped (up to date)"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn explicit_device_flag_is_recorded_and_cuda_on_a_cpu_build_fails_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &["run", "--to", "probe", "--device", "cuda:0", "--quiet"],
    );
    if cfg!(feature = "cuda") {
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("built without CUDA"),
        "{}",
        stderr(&out)
    );
    let env = std::fs::read_to_string(dir.path().join("reports/environment.json")).unwrap();
    assert!(env.contains("\"status\": \"failed\""));
}

#[test]
fn config_with_a_toml_syntax_error_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[model]\nsource = \"builtin:tiny\n").unwrap();
    let out = run_in(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
}

#[test]
fn config_with_an_unknown_key_exits_2_listing_valid_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("typo.toml");
    std::fs::write(&cfg, "[probe]\ndevise = \"cpu\"\n").unwrap();
    let out = run_in(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("typo.toml") && err.contains("line 2"), "{err}");
    assert!(
        err.contains("unknown field `devise`") && err.contains("`device`"),
        "{err}"
    );
}

#[test]
fn config_value_of_the_wrong_type_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("types.toml");
    std::fs::write(&cfg, "[probe]\nmin_gpu_memory_mib = \"lots\"\n").unwrap();
    let out = run_in(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid type"), "{}", stderr(&out));
    let out = run_in(
        dir.path(),
        &["run", "--set", "probe.min_gpu_memory_mib=lots"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--set probe.min_gpu_memory_mib=lots"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_stage_in_from_exits_2_listing_stages() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["run", "--from", "trian"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("unknown stage `trian` in --from") && err.contains("probe"),
        "{err}"
    );
    assert!(!dir.path().join("reports").exists(), "nothing ran");
}

#[test]
fn help_teaches_with_examples_and_stages_lists_the_pipeline() {
    let out = medpipe().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(
        help.contains("--from") && help.contains("Examples:"),
        "{help}"
    );
    let out = medpipe().arg("stages").output().unwrap();
    assert!(stdout(&out).contains("probe"), "{}", stdout(&out));
}

#[test]
fn a_bad_flag_is_a_usage_error_with_exit_2() {
    let out = medpipe().args(["run", "--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn shipped_configs_parse() {
    for f in ["pipeline/default.toml", "pipeline/qwen2.5-vl-7b.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        medpipe::Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
}

#[test]
fn from_after_to_exits_2_showing_the_pipeline_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["run", "--from", "download", "--to", "probe"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("--from download comes after --to probe") && err.contains("probe → download"),
        "{err}"
    );
    assert!(!dir.path().join("reports").exists(), "nothing ran");
}
