//! Data parallel training at the stage level (`train.devices`), on four samples of one
//! micro-batch each (`resume::TRAIN_SETS`): two CPU peers ship the
//! adapter one CPU ships when it accumulates both peers' micro-batches, bit for bit; a list
//! that mixes backends or names no device is refused before anything runs. (The trainer-level
//! properties, resume included, are specified in `src/train/trainer.rs`.)

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
