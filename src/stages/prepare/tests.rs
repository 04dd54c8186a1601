//! Tests of the prepare stage: splits, determinism, filters, de-duplication, resuming
//! after a kill, external sources and config checks, each on a small synthetic workspace.

use super::*;
use crate::data::sample::target_json;
use crate::data::shards::fit_pixels;
use crate::pipeline::{Pipeline, RunOptions, RunReport};
use crate::stages::probe::Probe;
use crate::Config;

fn run_in(dir: &Path, toml: &str, sets: &[&str]) -> RunReport {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::from_toml(toml, Path::new("test.toml"), &sets).unwrap();
    let ws = Workspace::open(dir).unwrap();
    let p = Pipeline::new(vec![Box::new(Probe), Box::new(Prepare::default())]);
    let opts = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap()
}

const SMALL: &str = "[probe]\ndevice = \"cpu\"\n[prepare]\nshard_size = 16\ncontact_sheet_pages = 4\n[[prepare.sources]]\nkind = \"synthetic\"\ncount = 48\n";

fn read_rows(path: &Path) -> Vec<Sample> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("reports/dataset.json")).unwrap()).unwrap()
}

#[test]
fn prepare_writes_disjoint_splits_eval_rows_images_and_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let rep = run_in(dir.path(), SMALL, &[]);
    assert!(!rep.failed(), "{rep:?}");
    let mut ids = BTreeSet::new();
    let mut n = 0;
    for split in ["train", "val", "test"] {
        for row in read_rows(&dir.path().join(format!("data/splits/{split}.jsonl"))) {
            assert!(ids.insert(row.id.clone()), "{} in two splits", row.id);
            assert!(dir.path().join(&row.image).is_file(), "{}", row.image);
            assert_eq!(row.target, target_json(&row.ground_truth));
            n += 1;
        }
    }
    assert_eq!(n, 48);
    let eval = read_rows(&dir.path().join("data/eval/eval.jsonl"));
    assert_eq!(eval.len(), 5);
    assert!(eval
        .iter()
        .all(|e| !ids.contains(&e.id) && dir.path().join(&e.image).is_file()));
    let a = report(dir.path());
    assert_eq!(a["status"], "completed");
    let m = &a["metrics"];
    assert_eq!(m["sources"]["synthetic"]["read"], 48);
    assert_eq!(m["sources"]["synthetic"]["kept"], 48);
    assert_eq!(
        m["splits"]["train"]["count"].as_u64().unwrap()
            + m["splits"]["val"]["count"].as_u64().unwrap()
            + m["splits"]["test"]["count"].as_u64().unwrap(),
        48
    );
    assert_eq!(m["splits"]["test"]["sha256"].as_str().unwrap().len(), 64);
    assert!(dir
        .path()
        .join("reports/prepare_contact_sheet.png")
        .is_file());
}

#[test]
fn same_seed_gives_byte_identical_splits_and_another_seed_a_different_assignment() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    run_in(a.path(), SMALL, &[]);
    run_in(b.path(), SMALL, &[]);
    run_in(c.path(), SMALL, &["prepare.seed=7"]);
    for split in ["train", "val", "test"] {
        let f = format!("data/splits/{split}.jsonl");
        assert_eq!(
            std::fs::read(a.path().join(&f)).unwrap(),
            std::fs::read(b.path().join(&f)).unwrap(),
            "{split}"
        );
    }
    let test_ids = |d: &Path| {
        read_rows(&d.join("data/splits/test.jsonl"))
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_ne!(test_ids(a.path()), test_ids(c.path()));
}

#[test]
fn a_source_that_loses_everything_fails_naming_the_filter_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let rep = run_in(
        dir.path(),
        SMALL,
        &["prepare.filters.min_answer_chars=100000"],
    );
    assert!(rep.failed());
    let err = report(dir.path())["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("source `synthetic` ended with 0 samples"),
        "{err}"
    );
    assert!(err.contains("answer_too_short"), "{err}");

    let toml = SMALL.replace("count = 48", "count = 48\nallow_empty = true");
    let rep = run_in(
        dir.path(),
        &toml,
        &["prepare.filters.min_answer_chars=100000"],
    );
    assert!(!rep.failed(), "{rep:?}");
    let a = report(dir.path());
    assert_eq!(
        a["metrics"]["sources"]["synthetic"]["dropped"]["answer_too_short"],
        48
    );
    assert!(a["warnings"][0].as_str().unwrap().contains("0 samples"));
}

#[test]
fn duplicates_across_sources_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"synthetic\"\nname = \"again\"\ncount = 20\nallow_empty = true\n");
    let rep = run_in(dir.path(), &toml, &[]);
    assert!(!rep.failed(), "{rep:?}");
    let m = &report(dir.path())["metrics"];
    assert_eq!(m["sources"]["again"]["dropped"]["duplicate"], 20);
    assert_eq!(m["samples_total"], 48);
}

#[test]
fn an_interrupted_run_reuses_complete_shards_and_rebuilds_the_rest_identically() {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), SMALL, &[]);
    let before: Vec<Vec<u8>> = ["train", "val", "test"]
        .iter()
        .map(|s| std::fs::read(dir.path().join(format!("data/splits/{s}.jsonl"))).unwrap())
        .collect();
    // What a kill -9 mid-render leaves: the artifact gone, a later shard without its
    // manifest, an image missing, a temp file from an unfinished atomic write.
    std::fs::remove_file(dir.path().join("reports/dataset.json")).unwrap();
    let shards = std::fs::read_dir(dir.path().join("data/.prepare"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("synthetic");
    std::fs::remove_file(shards.join("shard-00002.json")).unwrap();
    let row = &read_rows(&dir.path().join("data/splits/train.jsonl"))[0];
    std::fs::remove_file(dir.path().join(&row.image)).unwrap();
    // A page that a power loss left empty under its final name (no fsync per page).
    // (a sample of the first shard, which is reused).
    let torn = read_rows(&dir.path().join("data/splits/train.jsonl"))
        .into_iter()
        .find(|r| r.id != row.id && r.id.as_str() < "synthetic/syn-000016")
        .unwrap();
    let torn_bytes = std::fs::read(dir.path().join(&torn.image)).unwrap();
    std::fs::write(dir.path().join(&torn.image), b"").unwrap();
    std::fs::write(
        dir.path()
            .join("data/images/synthetic/.syn-000047.png.tmp999"),
        b"half",
    )
    .unwrap();

    let rep = run_in(dir.path(), SMALL, &[]);
    assert!(!rep.failed(), "{rep:?}");
    for (s, old) in ["train", "val", "test"].iter().zip(before) {
        assert_eq!(
            std::fs::read(dir.path().join(format!("data/splits/{s}.jsonl"))).unwrap(),
            old,
            "{s}"
        );
    }
    assert!(dir.path().join(&row.image).is_file());
    assert_eq!(
        std::fs::read(dir.path().join(&torn.image)).unwrap(),
        torn_bytes,
        "a page whose hash no longer matches its manifest is redrawn"
    );
    assert!(!dir
        .path()
        .join("data/images/synthetic/.syn-000047.png.tmp999")
        .exists());
    let m = &report(dir.path())["metrics"];
    assert!(
        m["render"]["pages_rendered_this_run"].as_u64().unwrap() < 48,
        "complete shards were reused"
    );
}

#[test]
fn mtsamples_rows_are_rendered_and_bad_rows_counted_while_the_stage_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
    for i in 0..12 {
        csv.extend_from_slice(format!("\"Visit {i}.\",\" Cardiology\",\"Follow-up {i}\",\"VITALS:, Blood pressure 13{i}/80, pulse 7{i}. Metoprolol {i}5 mg twice daily.\",\"cardiology, metoprolol\"\n").as_bytes());
    }
    csv.extend_from_slice(b"d,s,n,\"bad \xff text 5 mg\",k\n");
    std::fs::write(dir.path().join("mt.csv"), csv).unwrap();
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\npath = \"mt.csv\"\n");
    let rep = run_in(dir.path(), &toml, &[]);
    assert!(!rep.failed(), "{rep:?}");
    let m = &report(dir.path())["metrics"]["sources"]["mtsamples"];
    assert_eq!(m["read"], 13);
    assert_eq!(m["kept"], 12);
    assert_eq!(m["dropped"]["encoding_error"], 1);
    let rows: Vec<Sample> = ["train", "val", "test"]
        .iter()
        .flat_map(|s| read_rows(&dir.path().join(format!("data/splits/{s}.jsonl"))))
        .filter(|r| r.source == "mtsamples")
        .collect();
    assert_eq!(rows.len(), 12);
    assert!(rows
        .iter()
        .all(|r| r.doc_type == "cardiology" && r.target.contains("Metoprolol")));
}

/// Stands in for the download stage: completes with a fixed `datasets` list.
struct FakeDownload(Value);

impl Stage for FakeDownload {
    const NAME: &'static str = "download";
    // Reads [download] as the real stage does, so an edit there re-runs it.
    type Config = crate::stages::download::DownloadConfig;
    type Metrics = Value;

    fn description(&self) -> &'static str {
        "test stand-in for download"
    }
    fn artifact_file(&self) -> &'static str {
        "download.json"
    }
    fn upstream(&self) -> &[&'static str] {
        &["probe"]
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn run(
        &self,
        _: &crate::stages::download::DownloadConfig,
        _: &mut StageCtx<'_>,
    ) -> anyhow::Result<StageOutput> {
        Ok(StageOutput {
            metrics: json!({"model_dir": "checkpoints/base", "datasets": self.0}),
            ..StageOutput::default()
        })
    }
}

/// Writes an MTSamples CSV of 12 cardiology rows to `path`.
fn write_mtsamples(path: &Path) {
    let mut csv = b"description,medical_specialty,sample_name,transcription,keywords\n".to_vec();
    for i in 0..12 {
        csv.extend_from_slice(format!("\"Visit {i}.\",\" Cardiology\",\"Follow-up {i}\",\"VITALS:, Blood pressure 13{i}/80, pulse 7{i}. Metoprolol {i}5 mg twice daily.\",\"cardiology, metoprolol\"\n").as_bytes());
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, csv).unwrap();
}

/// Runs probe → a download listing one dataset (`someone/mtsamples` at `revision`, its
/// CSV in `<dir>/hub/mt/data/mt.csv`) → prepare with `toml`.
fn run_with_download(dir: &Path, toml: &str, revision: &str) -> RunReport {
    let ds = dir.join("hub/mt");
    write_mtsamples(&ds.join("data/mt.csv"));
    let datasets = json!([{
        "name": "mt",
        "source": format!("hf-dataset:someone/mtsamples@{revision}"),
        "revision": revision,
        "dir": ds,
        "files": ["README.md", "data/mt.csv"],
    }]);
    let cfg = Config::from_toml(toml, Path::new("test.toml"), &[]).unwrap();
    let ws = Workspace::open(dir).unwrap();
    let p = Pipeline::new(vec![
        Box::new(Probe),
        Box::new(FakeDownload(datasets)),
        Box::new(Prepare::new(&["probe", "download"])),
    ]);
    let opts = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap()
}

#[test]
fn a_source_reads_a_downloaded_dataset_named_by_its_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"someone/mtsamples\"\n"
    );
    let rep = run_with_download(dir.path(), &toml, "r1");
    assert!(!rep.failed(), "{rep:?}");
    let m = &report(dir.path())["metrics"];
    assert_eq!(m["sources"]["mtsamples"]["read"], 12);
    assert_eq!(m["sources"]["mtsamples"]["kept"], 12);
    let a = report(dir.path());
    assert!(
        a["upstream"].get("download").is_some(),
        "download is hashed into prepare's input: {}",
        a["upstream"]
    );
}

#[test]
fn a_changed_download_re_runs_prepare_and_a_new_revision_redraws_its_pages() {
    let dir = tempfile::tempdir().unwrap();
    // A [download] edit makes download (and so prepare) run again.
    let toml = |download_seed: u32| {
        format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"mt\"\n[download]\nseed = {download_seed}\n")
    };
    assert!(!run_with_download(dir.path(), &toml(1), "r1").failed());
    let rendered = |d: &Path| report(d)["metrics"]["render"]["pages_rendered_this_run"].as_u64();

    let rep = run_with_download(dir.path(), &toml(2), "r1");
    let prep = rep.stages.iter().find(|s| s.stage == "prepare").unwrap();
    assert_eq!(prep.action, "ran", "{prep:?}");
    assert!(prep.reason.contains("download"), "{}", prep.reason);
    assert_eq!(
        rendered(dir.path()),
        Some(0),
        "same revision: shards reused"
    );

    assert!(!run_with_download(dir.path(), &toml(3), "r2").failed());
    assert_eq!(
        rendered(dir.path()),
        Some(60),
        "another revision: every page redrawn"
    );
}

#[test]
fn a_dataset_download_json_lacks_fails_naming_it_and_listing_those_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{SMALL}[[prepare.sources]]\nkind = \"parquet\"\npreset = \"pathvqa\"\ndataset = \"other/pathvqa\"\n"
    );
    let rep = run_with_download(dir.path(), &toml, "r1");
    assert!(rep.failed());
    let err = rep.stages.last().unwrap().error.clone().unwrap();
    assert!(
        err.contains("dataset `other/pathvqa` is not in reports/download.json"),
        "{err}"
    );
    assert!(
        err.contains("`mt` (hf-dataset:someone/mtsamples@r1)"),
        "{err}"
    );
}

#[test]
fn a_dataset_source_without_the_download_stage_or_a_source_without_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\ndataset = \"mt\"\n");
    let rep = run_in(dir.path(), &toml, &[]);
    let err = rep.stages.last().unwrap().error.clone().unwrap();
    assert!(
        err.contains("dataset `mt` needs the download stage") && err.contains("has not completed"),
        "{err}"
    );
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\n");
    let rep = run_in(dir.path(), &toml, &[]);
    let err = rep.stages.last().unwrap().error.clone().unwrap();
    assert!(
        err.contains("source `mtsamples` needs `path` (a local file) or `dataset`"),
        "{err}"
    );
}

#[test]
fn a_missing_source_file_fails_the_stage_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let toml =
        format!("{SMALL}[[prepare.sources]]\nkind = \"mtsamples\"\npath = \"nope/mt.csv\"\n");
    let rep = run_in(dir.path(), &toml, &[]);
    assert!(rep.failed());
    let err = rep.stages.last().unwrap().error.clone().unwrap();
    assert!(
        err.contains("opening source `mtsamples`") && err.contains("nope/mt.csv"),
        "{err}"
    );
}

#[test]
fn a_parquet_row_with_corrupt_image_bytes_is_counted_as_decode_error_and_the_stage_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    crate::data::parquet::tests::write_pathvqa(&dir.path().join("pvqa.parquet"));
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"parquet\"\nname = \"pathvqa\"\npreset = \"pathvqa\"\npath = \"pvqa.parquet\"\n");
    let rep = run_in(dir.path(), &toml, &[]);
    assert!(!rep.failed(), "{rep:?}");
    let m = &report(dir.path())["metrics"]["sources"]["pathvqa"];
    assert_eq!(m["read"], 3);
    assert_eq!(m["kept"], 2);
    assert_eq!(m["dropped"]["decode_error"], 1);
}

#[test]
fn oversized_external_images_shrink_to_max_pixels_with_sides_multiple_of_28() {
    assert_eq!(fit_pixels(448, 448, 448 * 448), None);
    let (w, h) = fit_pixels(2000, 1000, 448 * 448).unwrap();
    assert!(w as u64 * h as u64 <= 448 * 448, "{w}x{h}");
    assert_eq!((w % 28, h % 28), (0, 0));
    assert!(
        (w as f64 / h as f64 - 2.0).abs() < 0.1,
        "aspect kept: {w}x{h}"
    );
}

#[test]
fn bad_split_fractions_and_duplicate_source_names_are_refused_when_the_config_loads() {
    let load = |toml: &str, sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml(toml, Path::new("test.toml"), &sets)
            .and_then(|c| crate::stages::check(&c).map(|()| c))
            .unwrap_err()
            .to_string()
    };
    let err = load(SMALL, &["prepare.split.val=0.5"]);
    assert!(
        err.contains("prepare.split = train 0.8 + val 0.5 + test 0.1"),
        "{err}"
    );
    assert!(err.contains("must sum to 1"), "{err}");
    let toml = format!("{SMALL}[[prepare.sources]]\nkind = \"synthetic\"\ncount = 2\n");
    let err = load(&toml, &[]);
    assert!(
        err.contains("prepare.sources[1].name = \"synthetic\""),
        "{err}"
    );
}
