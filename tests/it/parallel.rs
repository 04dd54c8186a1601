//! Data parallel training at the stage level (`train.devices`), on four samples of one
//! micro-batch each (`resume::TRAIN_SETS`): two CPU peers ship the
//! adapter one CPU ships when it accumulates both peers' micro-batches, bit for bit; a list
//! that mixes backends or names no device is refused before anything runs. (The trainer-level
//! properties, resume included, are specified in `src/train/trainer.rs`.) `medpipe bench
//! --train --peers N` measures N peers on one device.

use std::path::Path;

use crate::common::stderr;
use crate::resume::TRAIN_SETS as SETS;
use crate::small::{self, artifact_of, read_json, Upstream};

fn train(ws: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--from", "train", "--to", "train"];
    args.extend_from_slice(&SETS);
    args.extend_from_slice(extra);
    small::run(ws, &args)
}

#[test]
fn two_cpu_peers_ship_the_adapter_of_one_cpu_accumulating_their_micro_batches() {
    let (_one_tmp, one) = small::copy_of(Upstream::Prepare);
    let (_two_tmp, two) = small::copy_of(Upstream::Prepare);
    train(&one, &["--set", "train.grad_accum=2"]);
    train(
        &two,
        &[
            "--set",
            "train.grad_accum=1",
            "--set",
            r#"train.devices=["cpu", "cpu"]"#,
        ],
    );
    let metrics = |ws: &Path| read_json(&ws.join("reports").join(artifact_of("train")));
    let (a, b) = (metrics(&one), metrics(&two));
    assert_eq!(b["status"], "completed");
    assert_eq!(b["metrics"]["devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(a["metrics"]["devices"], serde_json::json!(["cpu"]));
    // Two samples per optimizer step either way: 2 steps per epoch.
    assert_eq!(b["metrics"]["total_steps"], a["metrics"]["total_steps"]);
    assert_eq!(b["metrics"]["steps"], a["metrics"]["steps"]);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let read = |ws: &Path| std::fs::read(ws.join("checkpoints/adapter").join(f)).unwrap();
        assert!(
            read(&two) == read(&one),
            "{f} differs from the one-device run"
        );
    }
}

#[test]
fn a_device_list_that_mixes_backends_or_names_no_device_is_refused_before_training() {
    let (_tmp, ws) = small::copy_of(Upstream::Prepare);
    for (devices, expected) in [
        (
            r#"train.devices=["cpu", "wgpu"]"#,
            "must all be devices of one backend",
        ),
        (r#"train.devices=["cpu", "gpu0"]"#, "\"gpu0\""),
    ] {
        let mut args = vec!["--from", "train", "--to", "train", "--set", devices];
        args.extend_from_slice(&SETS);
        let out = small::command(&ws, "run", &args).output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{devices}: {err}");
        assert!(
            err.contains("train.devices") && err.contains(expected),
            "{devices}: {err}"
        );
        assert!(
            !ws.join("checkpoints/train-state").exists(),
            "{devices}: training started: {err}"
        );
    }
}

#[test]
fn bench_train_with_two_peers_takes_two_micro_batches_a_step_and_the_planner_counts_both() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("peers.json");
    let run = crate::common::medpipe()
        .args([
            "bench",
            "--train",
            "--model",
            "builtin:tiny",
            "--peers",
            "2",
        ])
        .args(["--seq-len", "128", "--steps", "2", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(r["peers"], 2);
    // Samples per step = samples/s × step time: one micro-batch of 1 on each peer.
    let step_s: f64 = r["step_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() / 1e3)
        .sum::<f64>()
        / 2.0;
    let per_step = r["samples_per_s"].as_f64().unwrap() * step_s;
    assert!(
        (per_step - 2.0).abs() < 0.01,
        "{per_step} samples a step: {r}"
    );
    // Two micro-batches' activations, one AdamW: measured within the planner's band.
    let ratio = r["work_bytes"].as_f64().unwrap() / r["predicted_work_bytes"].as_f64().unwrap();
    assert!(
        (0.6..=1.5).contains(&ratio),
        "measured / predicted = {ratio:.3}: {r}"
    );
}
