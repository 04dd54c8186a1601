//! Issue 15, "Trust what it says": a copied or moved workspace uses its own files, a
//! `--config` file changes only what it sets, bad values are refused before any work, and
//! `--only` does not run a stage on a stale upstream.

use std::path::Path;

use medpipe::pipeline::{Pipeline, RunError, RunOptions, Workspace};
use medpipe::Config;

use crate::common::*;
use crate::small::{self, read_json, Upstream};

/// `[train]` read by alpha, `[evaluate]` by beta: the sections a train-less config file
/// used to change.
fn train_then_evaluate() -> Pipeline {
    Pipeline::new(vec![
        Box::new(Double {
            name: "alpha",
            upstream: &[],
            sections: &["train"],
        }),
        Box::new(Double {
            name: "beta",
            upstream: &["alpha"],
            sections: &["evaluate"],
        }),
    ])
}

fn states(p: &Pipeline, ws: &Path, cfg: &Config) -> Vec<(String, &'static str, String)> {
    let ws = Workspace::open(ws).unwrap();
    p.status(&ws, cfg)
        .unwrap()
        .into_iter()
        .map(|s| (s.stage, s.state, s.reason))
        .collect()
}

#[test]
fn issue_15_a_config_file_changes_only_the_keys_it_sets() {
    let dir = tempfile::tempdir().unwrap();
    let p = train_then_evaluate();
    run_chain(&p, dir.path(), &[], RunOptions::default());

    // A file that only repeats a default changes nothing, in no section.
    let same = dir.path().join("same.toml");
    std::fs::write(&same, "[evaluate]\nmax_new_tokens = 64\n").unwrap();
    let cfg = Config::load(Some(&same), &[]).unwrap();
    let mut default = Config::load(None, &[]).unwrap();
    default.set_origin(same.clone());
    assert_eq!(cfg, default);
    assert_eq!(
        states(&p, dir.path(), &cfg),
        vec![
            ("alpha".into(), "completed", String::new()),
            ("beta".into(), "completed", String::new()),
        ]
    );

    // A file without [train] leaves train as pipeline/default.toml has it.
    let e = dir.path().join("e.toml");
    std::fs::write(&e, "[evaluate]\nmax_new_tokens = 32\n").unwrap();
    let cfg = Config::load(Some(&e), &[]).unwrap();
    assert_eq!(
        states(&p, dir.path(), &cfg),
        vec![
            ("alpha".into(), "completed", String::new()),
            (
                "beta".into(),
                "stale",
                "config changed: evaluate.max_new_tokens".into()
            ),
        ]
    );
}

/// (`--set` assignment, what the refusal must name).
const BAD_VALUES: [(&str, &str); 16] = [
    ("train.r=0", "train.r = 0 is not allowed (must be at least 1)"),
    ("train.lora_alpha=0", "train.lora_alpha = 0 is not allowed"),
    (
        "train.lora_dropout=1.5",
        "train.lora_dropout = 1.5 is not allowed (must be in [0, 1))",
    ),
    ("train.lr=0", "train.lr = 0 is not allowed (must be greater than 0)"),
    ("train.lr=-1e-4", "train.lr = -0.0001 is not allowed"),
    ("train.batch_size=0", "train.batch_size = 0 is not allowed"),
    ("evaluate.batch_size=0", "evaluate.batch_size = 0 is not allowed"),
    ("baseline.batch_sizes=[1, 0]", "baseline.batch_sizes = [1, 0] is not allowed"),
    (
        "prepare.split.train=0.7",
        "prepare.split = train 0.7 + val 0.1 + test 0.1 is not allowed (the three fractions must sum to 1)",
    ),
    ("baseline.runs=0", "baseline.runs = 0 is not allowed"),
    (
        "evaluate.max_new_tokens=0",
        "evaluate.max_new_tokens = 0 is not allowed (must be at least 1)",
    ),
    ("quantize.max_new_tokens=0", "quantize.max_new_tokens = 0 is not allowed"),
    (
        "prepare.sources=[]",
        "prepare.sources = [] is not allowed (must list at least one [[prepare.sources]])",
    ),
    (
        "probe.device=gpu",
        "probe.device = \"gpu\" is not allowed (must be auto, cpu, cuda, cuda:N or wgpu)",
    ),
    ("model.source=builtin:huge", "model.source = \"builtin:huge\""),
    ("prepare.render.degrade.blur_prob=2", "prepare.render.degrade.blur_prob = 2"),
];

#[test]
fn issue_15_bad_values_of_any_stage_are_refused_with_exit_2_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    for (set, named) in BAD_VALUES {
        let out = medpipe()
            .args(["run", "--set", set, "--workspace"])
            .arg(&ws)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{set}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{set}: {}", stderr(&out));
        assert!(!ws.join("reports").exists(), "{set}: no stage ran");
    }
    // `--device` is the same key, and a one-section file is checked like the whole default.
    let out = medpipe()
        .args(["run", "--device", "cpuu", "--workspace"])
        .arg(&ws)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("probe.device = \"cpuu\""),
        "{}",
        stderr(&out)
    );
    let cfg = dir.path().join("one.toml");
    std::fs::write(&cfg, "[train]\nr = 0\n").unwrap();
    let out = medpipe()
        .args(["status", "--config"])
        .arg(&cfg)
        .arg("--workspace")
        .arg(&ws)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("one.toml") && err.contains("train.r = 0"),
        "{err}"
    );
}

#[test]
fn issue_15_only_refuses_a_stale_upstream_naming_it_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    run_chain(&p, dir.path(), &[], RunOptions::default());
    let beta_before = std::fs::read(dir.path().join("reports/beta.json")).unwrap();
    let cfg = Config::load(None, &["probe.min_gpu_memory_mib=7".into()]).unwrap();
    let ws = Workspace::open(dir.path()).unwrap();
    let only = |stage: &str, force: bool| RunOptions {
        only: Some(stage.into()),
        force,
        ..Default::default()
    };

    let err = p
        .run(&ws, &cfg, &only("beta", false), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunError::UpstreamStale { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "--only beta: upstream `alpha` is stale (config changed: probe.min_gpu_memory_mib); \
         run `medpipe run --to beta` to bring it up to date, or add --force to run `beta` on it anyway"
    );
    // Staleness is inherited: gamma's upstream beta would re-run after alpha.
    let err = p
        .run(&ws, &cfg, &only("gamma", false), &mut |_| {})
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("upstream `beta` is stale (upstream `alpha` will re-run)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("reports/beta.json")).unwrap(),
        beta_before,
        "nothing ran"
    );

    let r = p.run(&ws, &cfg, &only("beta", true), &mut |_| {}).unwrap();
    assert_eq!(actions(&r), pairs(&[("beta", "ran")]));
}

#[test]
fn issue_15_only_through_the_binary_exits_2_naming_the_stale_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    let out = run_in(ws, &["run", "--to", "probe", "--device", "cpu"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_in(
        ws,
        &[
            "run",
            "--only",
            "download",
            "--device",
            "cpu",
            "--set",
            "model.source=hf:org/other",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("--only download: upstream `probe` is stale (config changed: model.source)"),
        "{}",
        stderr(&out)
    );
    assert!(!ws.join("reports/download.json").exists());
}

#[test]
fn issue_15_the_device_is_resolved_by_the_probe_alone_so_auto_and_cpu_on_a_cpu_machine_are_one_input(
) {
    // Only the probe hashes [probe]; every model stage reads the probe's resolved device.
    for s in medpipe::stages::registry() {
        if s.name() != "probe" {
            assert!(
                !s.config_sections().contains(&"probe"),
                "{} hashes [probe] itself",
                s.name()
            );
        }
    }
    if cfg!(feature = "cuda") {
        return; // `auto` may pick a GPU here: the question below is about CPU machines.
    }
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    let out = run_in(ws, &["run", "--to", "probe", "--device", "cpu"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env = read_json(&ws.join("reports/environment.json"));
    assert_eq!(env["metrics"]["device"], "cpu");
    let out = run_in(ws, &["status", "--json", "--set", "probe.device=auto"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st[0]["stage"], "probe");
    assert_eq!(st[0]["state"], "completed", "{}", stdout(&out));
}

#[test]
fn issue_15_a_relative_model_source_resolves_against_the_workspace_not_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let model = ws.join("models/tiny");
    std::fs::create_dir_all(&model).unwrap();
    let fixtures = crate::common::fixture("qwen2_5_vl_tiny");
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixtures.join(f), model.join(f)).unwrap();
    }
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = medpipe()
        .current_dir(&elsewhere)
        .args([
            "run",
            "--to",
            "download",
            "--device",
            "cpu",
            "--set",
            "model.source=models/tiny",
            "--workspace",
        ])
        .arg(&ws)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let d = read_json(&ws.join("reports/download.json"));
    assert_eq!(d["metrics"]["model_dir"], "models/tiny");
    assert_eq!(d["metrics"]["model_kind"], "local");
}

#[test]
fn issue_15_a_copied_workspace_loads_its_own_model_and_reverifies_what_it_inherited() {
    let (dir, ws1) = small::copy_of(Upstream::Download);
    let d = read_json(&ws1.join("reports/download.json"));
    assert_eq!(d["metrics"]["model_dir"], "checkpoints/base");

    // A copy whose model was changed in place, size and mtimes kept: the stat fingerprints
    // still match, so only re-hashing (the root differs) can tell.
    let tampered = dir.path().join("tampered");
    cp_a(&ws1, &tampered);
    let cfg = tampered.join("checkpoints/base/config.json");
    let mut bytes = std::fs::read(&cfg).unwrap();
    let at = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    let mtime = std::fs::metadata(&cfg).unwrap().modified().unwrap();
    std::fs::write(&cfg, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&cfg)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out = small::command(&tampered, "status", &["--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st[1]["stage"], "download");
    assert_eq!(st[1]["state"], "stale", "{}", stdout(&out));
    assert_eq!(
        st[1]["reason"],
        "output checkpoints/base changed on disk",
        "{}",
        stdout(&out)
    );

    // An intact copy, its original moved away: completed, and the next stage loads the
    // copy's model.
    let wsf = dir.path().join("wsf");
    cp_a(&ws1, &wsf);
    std::fs::rename(&ws1, dir.path().join("moved")).unwrap();
    let out = small::command(&wsf, "status", &["--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st[1]["state"], "completed", "{}", stdout(&out));
    let log = small::run(&wsf, &["--to", "baseline"]);
    assert!(log.contains("· download: skipped (up to date)"), "{log}");
    assert!(log.contains("✓ baseline"), "{log}");
    // The re-verified artifact now records where it lives.
    let d = read_json(&wsf.join("reports/download.json"));
    assert_eq!(
        Path::new(d["workspace"].as_str().unwrap()),
        wsf.canonicalize().unwrap()
    );
}

#[test]
fn issue_15_generate_refuses_a_request_longer_than_the_model_holds_up_front_and_takes_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("page.png");
    image::RgbImage::from_pixel(56, 56, image::Rgb([240, 240, 240]))
        .save(&img)
        .unwrap();
    let generate = |extra: &[&str]| {
        medpipe()
            .env("MEDPIPE_CACHE", tmp.path().join("cache"))
            .args(["generate", "--model", "builtin:tiny", "--device", "cpu"])
            .args(["--prompt", "List the lab values", "--image"])
            .arg(&img)
            .args(extra)
            .output()
            .unwrap()
    };
    // builtin:tiny holds 4096 positions; 2^64-1 used to overflow into "KV cache full".
    for n in ["100000", "18446744073709551615"] {
        let out = generate(&["--max-new-tokens", n]);
        assert_eq!(out.status.code(), Some(2), "{n}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "plus {n} new tokens exceeds the model's max_position_embeddings 4096"
            )),
            "{err}"
        );
        assert!(err.contains("(allowed: at most "), "{err}");
    }
    // --adapter is read (as forward's is): a directory without an adapter is named.
    let missing = tmp.path().join("no-adapter");
    let out = generate(&[
        "--max-new-tokens",
        "2",
        "--adapter",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-adapter"), "{}", stderr(&out));
}
