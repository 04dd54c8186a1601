//! The download stage end to end, offline: `medpipe run --to download` against the mock hub
//! (`mock_hub.rs`) through `HF_ENDPOINT`, with a temporary `HF_HOME` and workspace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::mock_hub::{sha256_hex, MockFile, MockHub, MockRepo};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Bytes sent before the mock drops the connection in the resume test.
const DROP_AFTER: usize = 700_000;

fn fixture(rel: &str) -> Vec<u8> {
    let p = crate::common::fixture("qwen2_5_vl_tiny").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading fixture {}: {e}", p.display()))
}

/// The fixture model as a hub repository, plus files the stage must not fetch.
fn tiny_repo(id: &str) -> MockRepo {
    MockRepo {
        kind: "models",
        id: id.into(),
        commit: COMMIT.into(),
        files: vec![
            MockFile::new("README.md", b"# tiny\n".to_vec(), false),
            MockFile::new("config.json", fixture("config.json"), false),
            MockFile::new(
                "generation_config.json",
                br#"{"do_sample": false}"#.to_vec(),
                false,
            ),
            MockFile::new(
                "preprocessor_config.json",
                fixture("preprocessor_config.json"),
                false,
            ),
            MockFile::new("model.safetensors", fixture("model.safetensors"), true),
            MockFile::new("pytorch_model.bin", vec![7u8; 4096], true),
        ],
        gated: false,
    }
}

/// The fixture model split as the hub's large checkpoints are: `model-0000i-of-00005`
/// shards (tensors dealt round-robin) and `model.safetensors.index.json`.
fn sharded_tiny_repo(id: &str) -> (MockRepo, Vec<String>) {
    use safetensors::{tensor::TensorView, SafeTensors};
    let whole = fixture("model.safetensors");
    let st = SafeTensors::deserialize(&whole).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let shard_names: Vec<String> = (1..=5)
        .map(|i| format!("model-{i:05}-of-00005.safetensors"))
        .collect();
    let mut weight_map = serde_json::Map::new();
    let mut files = vec![
        MockFile::new("config.json", fixture("config.json"), false),
        MockFile::new(
            "preprocessor_config.json",
            fixture("preprocessor_config.json"),
            false,
        ),
    ];
    for (s, shard) in shard_names.iter().enumerate() {
        let mine: Vec<(String, TensorView)> = names
            .iter()
            .skip(s)
            .step_by(5)
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        for (n, _) in &mine {
            weight_map.insert(n.clone(), shard.clone().into());
        }
        let bytes = safetensors::serialize(mine, None).unwrap();
        files.push(MockFile::new(shard, bytes, true));
    }
    let index = serde_json::json!({
        "metadata": { "total_size": whole.len() },
        "weight_map": weight_map,
    });
    files.push(MockFile::new(
        "model.safetensors.index.json",
        index.to_string().into_bytes(),
        false,
    ));
    let repo = MockRepo {
        kind: "models",
        id: id.into(),
        commit: COMMIT.into(),
        files,
        gated: false,
    };
    (repo, shard_names)
}

struct Env {
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    hf_home: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Self {
            ws: tmp.path().join("ws"),
            hf_home: tmp.path().join("hf"),
            _tmp: tmp,
        }
    }

    fn repo_dir(&self, folder: &str) -> PathBuf {
        self.hf_home.join("hub").join(folder)
    }

    /// `medpipe run --to download` with the hub at `endpoint`.
    fn run(&self, endpoint: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        self.run_range(&["--to", "download"], endpoint, args, extra_env)
    }

    /// `medpipe run <range>` (e.g. `--only prepare`) with the hub at `endpoint`.
    fn run_range(
        &self,
        range: &[&str],
        endpoint: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_medpipe"));
        c.arg("run")
            .args(range)
            .args(["-q", "--workspace"])
            .arg(&self.ws)
            .args(args)
            .env("HF_HOME", &self.hf_home)
            .env("HF_ENDPOINT", endpoint);
        for v in [
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            c.env_remove(v);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().expect("running medpipe")
    }

    fn artifact(&self) -> Value {
        let text = std::fs::read_to_string(self.ws.join("reports/download.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// `run` fails (exit 1) with an error naming `what`.
    fn run_fails_naming(&self, endpoint: &str, args: &[&str], what: &str) {
        let out = self.run(endpoint, args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let error = self.error_text();
        assert!(error.contains(what), "{what:?} not named in: {error}");
    }

    /// The failed artifact's full error text.
    fn error_text(&self) -> String {
        let a = self.artifact();
        assert_eq!(a["status"], "failed", "{a:#}");
        let mut parts = vec![a["error"]["message"].as_str().unwrap_or("").to_string()];
        for c in a["error"]["causes"].as_array().into_iter().flatten() {
            parts.push(c.as_str().unwrap_or("").to_string());
        }
        parts.join(": ")
    }
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "medpipe failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn files_by_path(a: &Value) -> std::collections::BTreeMap<String, Value> {
    a["metrics"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f.clone()))
        .collect()
}

#[test]
fn hf_model_fills_the_cache_and_a_second_run_reuses_it() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    ok(&e.run(&hub.url(), &["--set", "model.source=hf:test/tiny"], &[]));

    let a = e.artifact();
    let m = &a["metrics"];
    let snapshot = e
        .repo_dir("models--test--tiny")
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(m["model_dir"].as_str().unwrap(), snapshot.to_str().unwrap());
    assert_eq!(m["model_revision"], COMMIT);
    let files = files_by_path(&a);
    let want = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ];
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        want,
        "only what the model needs"
    );
    let repo = tiny_repo("test/tiny");
    for name in want {
        let f = &files[name];
        let content = &repo.files.iter().find(|x| x.path == name).unwrap().content;
        assert_eq!(f["action"], "downloaded", "{name}");
        assert_eq!(f["revision"], COMMIT);
        assert_eq!(f["sha256"], sha256_hex(content), "{name}");
        assert_eq!(f["size_bytes"], content.len() as u64);
        assert_eq!(f["source"], "hf:test/tiny@main");
        let cache_path = PathBuf::from(f["cache_path"].as_str().unwrap());
        assert_eq!(cache_path, snapshot.join(name));
        assert_eq!(&std::fs::read(&cache_path).unwrap(), content);
    }
    assert_eq!(files["model.safetensors"]["verified"], true);
    assert_eq!(
        files["model.safetensors"]["expected_sha256"],
        sha256_hex(&fixture("model.safetensors"))
    );
    // The huggingface_hub cache layout: refs, content-addressed blobs, snapshot links.
    let dir = e.repo_dir("models--test--tiny");
    assert_eq!(
        std::fs::read_to_string(dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let blob = dir
        .join("blobs")
        .join(sha256_hex(&fixture("model.safetensors")));
    assert!(blob.is_file());
    assert!(
        std::fs::symlink_metadata(snapshot.join("model.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(!snapshot.join("pytorch_model.bin").exists());
    assert!(!hub
        .requests()
        .iter()
        .any(|r| r.path.contains("pytorch_model.bin")));
    assert_eq!(m["total_bytes"], m["downloaded_bytes"]);

    // Second run: everything comes from the cache, no file is transferred.
    hub.clear_log();
    ok(&e.run(
        &hub.url(),
        &["--set", "model.source=hf:test/tiny", "--from", "download"],
        &[],
    ));
    let a = e.artifact();
    assert!(
        files_by_path(&a).values().all(|f| f["action"] == "reused"),
        "{a:#}"
    );
    assert_eq!(a["metrics"]["downloaded_bytes"], 0);
    assert!(
        hub.requests()
            .iter()
            .all(|r| !r.path.contains("/resolve/") && !r.path.starts_with("/lfs/")),
        "{:?}",
        hub.requests()
    );
}

#[test]
fn a_dropped_connection_resumes_on_the_next_run_and_the_file_verifies() {
    let hub = MockHub::start(
        vec![tiny_repo("test/tiny")],
        Some(("model.safetensors", DROP_AFTER)),
    );
    let e = Env::new();
    let args = [
        "--set",
        "model.source=hf:test/tiny",
        "--set",
        "download.retries=0",
    ];
    e.run_fails_naming(&hub.url(), &args, "model.safetensors");
    let sha = sha256_hex(&fixture("model.safetensors"));
    let dir = e.repo_dir("models--test--tiny");
    let part = dir.join("blobs").join(format!("{sha}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), DROP_AFTER as u64);
    assert!(!dir
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors")
        .exists());

    hub.clear_log();
    ok(&e.run(&hub.url(), &args, &[]));
    let f = files_by_path(&e.artifact())["model.safetensors"].clone();
    assert_eq!(f["action"], "downloaded");
    assert_eq!(f["resumed_from_bytes"], DROP_AFTER as u64);
    assert_eq!(f["sha256"], sha);
    assert!(!part.exists());
    let resumed = format!("bytes={DROP_AFTER}-");
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.path.starts_with("/lfs/") && r.range.as_deref() == Some(resumed.as_str())),
        "no request continued at {DROP_AFTER}: {:?}",
        hub.requests()
    );
}

/// Issue 19: a real-size checkpoint comes in shards with an index. Every shard is fetched and
/// verified, a shard cut off mid-transfer resumes on the next run, and the downloaded
/// snapshot loads and gives the fixture's reference logits.
#[test]
fn a_sharded_checkpoint_downloads_every_shard_resumes_a_cut_one_and_loads() {
    let (repo, shards) = sharded_tiny_repo("test/sharded");
    let cut = shards[2].clone();
    let cut_sha = repo.files.iter().find(|f| f.path == cut).unwrap().sha256();
    let hub = MockHub::start(vec![repo], Some((cut.as_str(), 100_000)));
    let e = Env::new();
    let args = [
        "--set",
        "model.source=hf:test/sharded",
        "--set",
        "download.retries=0",
    ];
    e.run_fails_naming(&hub.url(), &args, &cut);

    hub.clear_log();
    ok(&e.run(&hub.url(), &args, &[]));
    let files = files_by_path(&e.artifact());
    let mut want: Vec<&str> = shards.iter().map(String::as_str).collect();
    want.extend([
        "config.json",
        "model.safetensors.index.json",
        "preprocessor_config.json",
    ]);
    want.sort();
    assert_eq!(files.keys().map(String::as_str).collect::<Vec<_>>(), want);
    for shard in &shards {
        assert_eq!(files[shard]["verified"], true, "{shard}");
    }
    assert_eq!(files[&cut]["resumed_from_bytes"], 100_000);
    assert_eq!(files[&cut]["sha256"], cut_sha);
    // The shards finished in the first run are reused, not fetched again.
    for shard in shards.iter().take(2) {
        assert_eq!(files[shard]["action"], "reused", "{shard}");
    }
    let snapshot = e
        .repo_dir("models--test--sharded")
        .join("snapshots")
        .join(COMMIT);
    crate::forward::assert_dir_gives_the_tiny_reference(&snapshot);
}

#[test]
fn a_dropped_connection_is_resumed_within_the_run_when_retries_are_allowed() {
    let hub = MockHub::start(
        vec![tiny_repo("test/tiny")],
        Some(("model.safetensors", DROP_AFTER)),
    );
    let e = Env::new();
    ok(&e.run(
        &hub.url(),
        &[
            "--set",
            "model.source=hf:test/tiny",
            "--set",
            "download.retries=2",
        ],
        &[],
    ));
    let f = files_by_path(&e.artifact())["model.safetensors"].clone();
    assert_eq!(f["sha256"], sha256_hex(&fixture("model.safetensors")));
    let resumed = format!("bytes={DROP_AFTER}-");
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.path.starts_with("/lfs/") && r.range.as_deref() == Some(resumed.as_str())));
}

#[test]
fn a_commit_revision_is_fetched_without_a_ref_and_a_local_directory_is_used_in_place() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    let source = format!("model.source=hf:test/tiny@{COMMIT}");
    ok(&e.run(&hub.url(), &["--set", &source], &[]));
    let a = e.artifact();
    assert_eq!(a["metrics"]["model_revision"], COMMIT);
    let refs = e.repo_dir("models--test--tiny").join("refs");
    assert!(!refs.join(COMMIT).exists() && !refs.join("main").exists());

    // The snapshot directory itself as a local source: same files, hashed in place.
    let dir = a["metrics"]["model_dir"].as_str().unwrap().to_string();
    ok(&e.run(
        &hub.url(),
        &[
            "--set",
            &format!("model.source={dir}"),
            "--from",
            "download",
        ],
        &[],
    ));
    let local = e.artifact();
    assert_eq!(local["metrics"]["model_kind"], "local");
    assert_eq!(local["metrics"]["model_dir"].as_str().unwrap(), dir);
    let (h, l) = (files_by_path(&a), files_by_path(&local));
    assert_eq!(h.keys().collect::<Vec<_>>(), l.keys().collect::<Vec<_>>());
    for (k, f) in &l {
        assert_eq!(f["action"], "local");
        assert_eq!(f["sha256"], h[k]["sha256"], "{k}");
    }
}

#[test]
fn a_complete_leftover_part_file_is_restarted_instead_of_failing_forever() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    let good = fixture("model.safetensors");
    let blobs = e.repo_dir("models--test--tiny").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.part", sha256_hex(&good))), &good).unwrap();
    ok(&e.run(&hub.url(), &["--set", "model.source=hf:test/tiny"], &[]));
    let f = files_by_path(&e.artifact())["model.safetensors"].clone();
    assert_eq!(f["sha256"], sha256_hex(&good));
    assert_eq!(f["resumed_from_bytes"], 0);
}

#[test]
fn a_cached_file_corrupted_on_disk_is_downloaded_again() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    let args = ["--set", "model.source=hf:test/tiny"];
    ok(&e.run(&hub.url(), &args, &[]));
    let good = fixture("model.safetensors");
    let blob = e
        .repo_dir("models--test--tiny")
        .join("blobs")
        .join(sha256_hex(&good));
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&blob, &bad).unwrap();
    ok(&e.run(
        &hub.url(),
        &["--set", "model.source=hf:test/tiny", "--from", "download"],
        &[],
    ));
    let files = files_by_path(&e.artifact());
    assert_eq!(files["model.safetensors"]["action"], "downloaded");
    assert_eq!(files["config.json"]["action"], "reused");
    let warnings = e.artifact()["warnings"].to_string();
    assert!(
        warnings.contains("model.safetensors") && warnings.contains("corrupt"),
        "{warnings}"
    );
    assert_eq!(std::fs::read(&blob).unwrap(), good);
}

#[test]
fn content_not_matching_its_sha256_fails_naming_both_hashes_and_leaves_nothing_complete() {
    let mut repo = tiny_repo("test/tiny");
    let good = fixture("model.safetensors");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    repo.files
        .iter_mut()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .served = Some(bad.clone());
    let hub = MockHub::start(vec![repo], None);
    let e = Env::new();
    let out = e.run(&hub.url(), &["--set", "model.source=hf:test/tiny"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = e.error_text();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains(&sha256_hex(&good)),
        "expected hash missing: {err}"
    );
    assert!(
        err.contains(&sha256_hex(&bad)),
        "actual hash missing: {err}"
    );
    let dir = e.repo_dir("models--test--tiny");
    assert!(!dir.join("blobs").join(sha256_hex(&good)).exists());
    assert!(std::fs::symlink_metadata(
        dir.join("snapshots").join(COMMIT).join("model.safetensors")
    )
    .is_err());
}

#[test]
fn a_missing_repository_is_named_in_the_error() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    let out = e.run(&hub.url(), &["--set", "model.source=hf:test/nope"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = e.error_text();
    assert!(
        err.contains("test/nope") && err.contains("repository not found"),
        "{err}"
    );
}

#[test]
fn a_gated_repository_asks_for_hf_token_and_works_with_one() {
    let mut repo = tiny_repo("test/gated");
    repo.gated = true;
    let hub = MockHub::start(vec![repo], None);
    let e = Env::new();
    let args = ["--set", "model.source=hf:test/gated"];
    let out = e.run(&hub.url(), &args, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = e.error_text();
    assert!(err.contains("HF_TOKEN") && err.contains("401"), "{err}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HF_TOKEN"));

    ok(&e.run(&hub.url(), &args, &[("HF_TOKEN", "hf_test")]));
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer hf_test")));
}

#[test]
fn offline_mode_uses_only_the_cache() {
    let hub = MockHub::start(vec![tiny_repo("test/tiny")], None);
    let e = Env::new();
    let args = ["--set", "model.source=hf:test/tiny", "--from", "download"];
    let offline = [("HF_HUB_OFFLINE", "1")];
    // Nothing cached yet: a clear error, and no request reaches the hub.
    let out = e.run(&hub.url(), &args[..2], &offline);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = e.error_text();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("not in the cache"),
        "{err}"
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    ok(&e.run(&hub.url(), &args, &[]));
    let online_dir = e.artifact()["metrics"]["model_dir"].clone();
    // Cached: works with the hub unreachable (port 9, discard, is closed here).
    ok(&e.run("http://127.0.0.1:9", &args, &offline));
    let a = e.artifact();
    assert_eq!(a["metrics"]["model_dir"], online_dir);
    let files = files_by_path(&a);
    assert_eq!(files.len(), 4);
    assert!(files.values().all(|f| f["action"] == "reused"));
    assert_eq!(files["model.safetensors"]["verified"], true);

    // A cached file removed: offline mode names what is missing.
    let snap = PathBuf::from(online_dir.as_str().unwrap());
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let out = e.run("http://127.0.0.1:9", &args, &offline);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        e.error_text().contains("*.safetensors"),
        "{}",
        e.error_text()
    );
}

#[test]
fn hf_dataset_fetches_only_the_matching_files() {
    let ds = MockRepo {
        kind: "datasets",
        id: "test/ds".into(),
        commit: COMMIT.into(),
        files: vec![
            MockFile::new("README.md", b"# ds".to_vec(), false),
            MockFile::new("data/train-0.parquet", vec![1u8; 3000], true),
            MockFile::new("data/test-0.parquet", vec![2u8; 1000], true),
        ],
        gated: false,
    };
    let hub = MockHub::start(vec![ds], None);
    let e = Env::new();
    let set = r#"download.datasets=[{name = "ds", source = "hf-dataset:test/ds@main", files = ["data/*.parquet"]}]"#;
    ok(&e.run(&hub.url(), &["--set", set], &[]));
    let a = e.artifact();
    let d = &a["metrics"]["datasets"][0];
    assert_eq!(d["name"], "ds");
    let dir = e
        .repo_dir("datasets--test--ds")
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(d["dir"].as_str().unwrap(), dir.to_str().unwrap());
    let mut files: Vec<&str> = d["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["data/test-0.parquet", "data/train-0.parquet"]);
    assert_eq!(
        std::fs::read(dir.join("data/train-0.parquet")).unwrap(),
        vec![1u8; 3000]
    );
    assert!(!dir.join("README.md").exists());
    // The default model is still builtin:tiny.
    assert_eq!(a["metrics"]["model_kind"], "builtin");
}

#[test]
fn issue_5_prepare_reads_an_mtsamples_csv_the_download_stage_fetched_named_by_hub_id() {
    let mut csv = b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
    for i in 0..6 {
        csv.extend_from_slice(format!("\"Visit {i}.\",\" Cardiology\",\"Follow-up {i}\",\"Pulse 7{i}. Metoprolol {i}5 mg twice daily.\",\"metoprolol\"\n").as_bytes());
    }
    let ds = MockRepo {
        kind: "datasets",
        id: "test/mt".into(),
        commit: COMMIT.into(),
        files: vec![MockFile::new("data/mtsamples.csv", csv, false)],
        gated: false,
    };
    let hub = MockHub::start(vec![ds], None);
    let e = Env::new();
    let sets = [
        "--set",
        r#"download.datasets=[{name = "mt", source = "hf-dataset:test/mt@main"}]"#,
        "--set",
        r#"prepare.sources=[{kind = "synthetic", count = 8}, {kind = "mtsamples", dataset = "test/mt"}]"#,
        "--set",
        "prepare.contact_sheet_pages=0",
    ];
    ok(&e.run(&hub.url(), &sets, &[]));
    ok(&e.run_range(&["--only", "prepare"], &hub.url(), &sets, &[]));
    let text = std::fs::read_to_string(e.ws.join("reports/dataset.json")).unwrap();
    let a: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(a["status"], "completed", "{a:#}");
    assert_eq!(a["metrics"]["sources"]["mtsamples"]["read"], 6, "{a:#}");
    assert_eq!(a["metrics"]["sources"]["mtsamples"]["kept"], 6, "{a:#}");
    assert!(a["upstream"].get("download").is_some(), "{}", a["upstream"]);
}

#[test]
fn builtin_tiny_is_byte_identical_for_the_same_seed() {
    let read_all = |dir: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (a, b, c) = (Env::new(), Env::new(), Env::new());
    // No hub is needed: nothing is fetched for builtin:tiny.
    ok(&a.run("http://127.0.0.1:9", &[], &[]));
    ok(&b.run("http://127.0.0.1:9", &[], &[]));
    ok(&c.run("http://127.0.0.1:9", &["--set", "download.seed=1"], &[]));
    let base = |e: &Env| e.ws.join("checkpoints/base");
    let (fa, fb, fc) = (
        read_all(&base(&a)),
        read_all(&base(&b)),
        read_all(&c.ws.join("checkpoints/base")),
    );
    assert_eq!(fa.len(), 7);
    assert_eq!(fa, fb, "same seed, different bytes");
    let weights = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n == "model.safetensors")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(
        weights(&fa),
        weights(&fc),
        "another seed must change the weights"
    );
    let m = &a.artifact()["metrics"];
    // Workspace-relative, so a copied workspace loads its own model (issue 15).
    assert_eq!(m["model_dir"], "checkpoints/base");
    assert!(m["files"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["action"] == "generated"));
}

#[test]
fn a_local_dataset_directory_is_listed_in_place_and_duplicate_names_are_rejected() {
    let e = Env::new();
    let data = e.ws.parent().unwrap().join("mtsamples");
    std::fs::create_dir_all(data.join("raw")).unwrap();
    std::fs::write(data.join("raw/mtsamples.csv"), "a,b\n1,2\n").unwrap();
    std::fs::write(data.join("notes.txt"), "x").unwrap();
    let one = format!(
        r#"download.datasets=[{{name = "mt", source = "{}", files = ["*.csv"]}}]"#,
        data.display()
    );
    ok(&e.run("http://127.0.0.1:9", &["--set", &one], &[]));
    let a = e.artifact();
    let d = &a["metrics"]["datasets"][0];
    assert_eq!(d["dir"].as_str().unwrap(), data.to_str().unwrap());
    assert_eq!(d["files"], serde_json::json!(["raw/mtsamples.csv"]));
    let f = files_by_path(&a)["raw/mtsamples.csv"].clone();
    assert_eq!(f["action"], "local");
    assert_eq!(f["sha256"], sha256_hex(b"a,b\n1,2\n"));

    let two = format!(
        r#"download.datasets=[{{name = "mt", source = "{0}"}}, {{name = "mt", source = "{0}"}}]"#,
        data.display()
    );
    let out = e.run(
        "http://127.0.0.1:9",
        &["--set", &two, "--from", "download"],
        &[],
    );
    // Refused when the config loads (issue 15), before any stage runs.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"download.datasets[1].name = "mt" is not allowed"#),
        "{err}"
    );
}
