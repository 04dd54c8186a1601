//! `medpipe bench`, `medpipe generate` and the baseline stage, end to end on builtin:tiny
//! (CPU). Timings are checked for presence, type and internal consistency only, never
//! against absolute numbers.

use std::path::Path;

use serde_json::Value;

use crate::common::{medpipe, stderr, stdout};

/// Runs `medpipe` with `args`, builtin:tiny cached under `cache`.
fn bench_cmd(cache: &Path, args: &[&str]) -> std::process::Output {
    medpipe()
        .env("MEDPIPE_CACHE", cache)
        .args(args)
        .output()
        .expect("the medpipe binary runs")
}

/// JSON type names for the schema check.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "uint",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts `v[pointer]` exists with one of the allowed kinds ("number" accepts integers).
fn field(v: &Value, pointer: &str, allowed: &[&str]) {
    let got = v
        .pointer(pointer)
        .unwrap_or_else(|| panic!("missing {pointer}"));
    let k = kind(got);
    let ok = allowed.contains(&k) || (k == "uint" && allowed.contains(&"number"));
    assert!(ok, "{pointer} is {k} ({got}), expected one of {allowed:?}");
}

const SUMMARY_MS: [&str; 10] = [
    "n",
    "mean_ms",
    "std_ms",
    "min_ms",
    "max_ms",
    "ci95_low_ms",
    "ci95_high_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
];

/// builtin:tiny has 2 decoder layers: a decode step makes 7 projections a layer plus the
/// logits head, one attention, two norms and one SwiGLU a layer, q and k rotated, the final
/// norm, and one token pick; the recorded times and shares add up.
fn decode_breakdown_counts_every_kernel_call_of_a_step(d: &Value) {
    let layers = 2.0;
    let classes = d["classes"].as_array().unwrap();
    let names: Vec<&str> = classes
        .iter()
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "projections",
            "attention",
            "rms_norm",
            "rotary",
            "silu_mul",
            "sampling"
        ]
    );
    let per_step: Vec<f64> = classes
        .iter()
        .map(|c| c["calls_per_step"].as_f64().unwrap())
        .collect();
    assert_eq!(
        per_step,
        [
            7.0 * layers + 1.0,
            layers,
            2.0 * layers + 1.0,
            2.0 * layers,
            layers,
            1.0
        ],
        "{d}"
    );
    assert!(d["steps"].as_u64().unwrap() >= 1);
    let recorded = d["recorded_step_ms"].as_f64().unwrap();
    let parts: f64 = classes
        .iter()
        .map(|c| c["ms_per_step"].as_f64().unwrap())
        .sum::<f64>()
        + d["other_ms"].as_f64().unwrap();
    assert!(
        (parts - recorded).abs() <= 1e-6 * recorded.max(1.0) || parts >= recorded,
        "{d}"
    );
    let shares: f64 = classes
        .iter()
        .map(|c| c["share"].as_f64().unwrap())
        .sum::<f64>()
        + d["other_share"].as_f64().unwrap();
    assert!((shares - 1.0).abs() < 1e-6 || parts > recorded, "{d}");
    // Projections read every decoder weight once a step: more bytes than anything else.
    let bytes: Vec<u64> = classes
        .iter()
        .map(|c| c["bytes_per_step"].as_u64().unwrap())
        .collect();
    assert!(
        bytes.iter().all(|&b| b > 0) && bytes[0] == *bytes.iter().max().unwrap(),
        "{d}"
    );
    assert_eq!(
        d["bytes_per_step"].as_u64().unwrap(),
        bytes.iter().sum::<u64>()
    );
    assert!(d["step_ms"].as_f64().unwrap() > 0.0);
    assert!(d["effective_bandwidth_gb_s"].as_f64().unwrap() > 0.0);
    assert!(
        d["bandwidth_note"]
            .as_str()
            .unwrap()
            .starts_with("not meaningful on the CPU"),
        "{d}"
    );
}

#[test]
fn bench_on_builtin_tiny_writes_every_schema_field_with_its_type() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench.json");
    let o = bench_cmd(
        &tmp.path().join("cache"),
        &[
            "bench",
            "--model",
            "builtin:tiny",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--batch-sizes",
            "1,2",
            "--max-new-tokens",
            "3",
            "--grid-new-tokens",
            "2",
            "--soak-seconds",
            "0.3",
            "--price-per-hour",
            "2.5",
            "--output",
            out.to_str().unwrap(),
            "--save-inputs",
            tmp.path().join("inputs").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| batch | calls |"), "{}", stdout(&o));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let s = ["string"];
    let n = ["number"];
    let u = ["uint"];
    let opt_s = ["string", "null"];
    let opt_n = ["number", "null"];
    for (p, k) in [
        ("/schema_version", &u[..]),
        ("/timestamp", &s),
        ("/git_commit", &opt_s),
        ("/platform/os", &opt_s),
        ("/platform/os_version", &opt_s),
        ("/platform/kernel", &opt_s),
        ("/platform/arch", &s),
        ("/platform/cpu_model", &opt_s),
        ("/platform/cpu_threads", &u),
        ("/platform/memory_total_bytes", &u),
        ("/platform/gpus", &["array"]),
        ("/platform/gpu_driver", &opt_s),
        ("/platform/cuda_version", &opt_s),
        ("/versions/medpipe", &s),
        ("/versions/burn", &s),
        ("/versions/backend", &s),
        ("/versions/rustc", &opt_s),
        ("/device", &s),
        ("/model/id", &s),
        ("/model/dir", &s),
        ("/model/revision", &opt_s),
        ("/model/dtype", &s),
        ("/model/quantization", &opt_s),
        ("/model/adapter", &opt_s),
        ("/model/parameters", &u),
        ("/model/weights_bytes", &u),
        ("/generation/seed", &u),
        ("/generation/do_sample", &["bool"]),
        ("/generation/temperature", &opt_n),
        ("/generation/top_p", &opt_n),
        ("/generation/max_new_tokens", &u),
        ("/generation/kv_cache", &["bool"]),
        ("/generation/batch_sizes", &["array"]),
        ("/settings/warmup_runs", &u),
        ("/settings/runs", &u),
        ("/settings/inputs", &["array"]),
        ("/settings/grid_max_new_tokens", &["array"]),
        ("/settings/soak_seconds", &n),
        ("/settings/price_per_device_hour", &n),
        ("/settings/currency", &s),
        ("/load/load_time_ms", &n),
        ("/load/rss_after_load_bytes", &u),
        ("/load/device_memory_before_load_bytes", &["null"]),
        ("/load/device_memory_after_load_bytes", &["null"]),
        ("/load/allocator_in_use_after_load_bytes", &["null"]),
        ("/load/allocator_reserved_after_load_bytes", &["null"]),
        ("/memory/peak_rss_bytes", &u),
        ("/memory/peak_rss_during_runs_bytes", &u),
        ("/memory/device_peak_bytes", &["null"]),
        ("/memory/allocator_peak_in_use_bytes", &["null"]),
        ("/memory/allocator_peak_reserved_bytes", &["null"]),
        ("/memory/samples", &u),
        ("/memory/device_samples", &u),
        ("/memory/device_memory_note", &s),
        ("/soak/memory_samples/0/device_used_bytes", &["null"]),
        ("/soak/duration_s", &n),
        ("/soak/requests", &u),
        ("/soak/windows/0/tokens_per_s", &n),
        ("/soak/memory_growth_bytes_per_s", &n),
        ("/soak/memory_samples/0/rss_bytes", &u),
        ("/grid/0/max_new_tokens", &u),
        ("/grid/0/throughput_tokens_per_s", &n),
    ] {
        field(&v, p, k);
    }
    assert_eq!(v["device"], "cpu");
    assert!(
        v["memory"]["device_memory_note"]
            .as_str()
            .unwrap()
            .starts_with("cpu run"),
        "{}",
        v["memory"]["device_memory_note"]
    );
    assert_eq!(v["settings"]["inputs"].as_array().unwrap().len(), 5);
    let batches = v["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    for (i, b) in batches.iter().enumerate() {
        for s in ["prefill_ms", "decode_ms", "ttft_ms", "latency_ms"] {
            for k in SUMMARY_MS {
                field(b, &format!("/{s}/{k}"), &["number"]);
            }
        }
        for k in ["mean", "std", "ci95_low", "ci95_high", "p50", "p95", "p99"] {
            field(b, &format!("/tokens_per_s/{k}"), &["number"]);
        }
        for k in [
            "new_tokens_mean",
            "prompt_tokens_mean",
            "throughput_tokens_per_s",
            "throughput_requests_per_s",
            "cost_per_1k_requests",
        ] {
            field(b, &format!("/{k}"), &["number"]);
        }
        // 2 runs over 5 documents: 5 calls at batch 1, 3 at batch 2 (wrapping around).
        assert_eq!(b["calls"], [10, 6][i]);
        let lat = &b["latency_ms"];
        let (lo, mean, hi) = (
            lat["ci95_low_ms"].as_f64().unwrap(),
            lat["mean_ms"].as_f64().unwrap(),
            lat["ci95_high_ms"].as_f64().unwrap(),
        );
        assert!(lo <= mean && mean <= hi && lat["min_ms"].as_f64().unwrap() > 0.0);
        decode_breakdown_counts_every_kernel_call_of_a_step(&b["decode_breakdown"]);
    }
    let reqs = v["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 10 + 12);
    for r in reqs {
        let total = r["total_ms"].as_f64().unwrap();
        let parts = r["prefill_ms"].as_f64().unwrap() + r["decode_ms"].as_f64().unwrap();
        assert!((total - parts).abs() < 1e-6 * total.max(1.0), "{r}");
        assert!(r["new_tokens"].as_u64().unwrap() <= 3);
    }
    for f in [
        "bench.md",
        "bench_latency.png",
        "bench_latency.svg",
        "bench_batch_sweep.png",
        "bench_batch_sweep.svg",
    ] {
        assert!(tmp.path().join(f).is_file(), "{f} missing");
    }
    // The measured inputs can be looked at: the five rendered documents.
    let saved = std::fs::read_dir(tmp.path().join("inputs"))
        .unwrap()
        .count();
    assert_eq!(saved, 5);
    let md = std::fs::read_to_string(tmp.path().join("bench.md")).unwrap();
    assert!(md.contains("Community results row"), "{md}");
}

#[test]
fn bad_bench_flags_exit_2_with_a_message_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (&["bench", "--runs", "0"][..], "--runs"),
        (&["bench", "--batch-sizes", "1;2"], "--batch-sizes"),
        (&["bench", "--batch-sizes", "0,1"], "--batch-sizes"),
        (&["bench", "--grid-new-tokens", "x"], "--grid-new-tokens"),
        (&["bench", "--soak-seconds=-1"], "soak"),
        (&["bench", "--device", "cuda"], "--device cuda"),
        (
            &["bench", "--model", "/nonexistent/model"],
            "not a directory with a config.json",
        ),
        (&["bench", "--compare", "only-one.json"], "--compare"),
    ] {
        let o = bench_cmd(tmp.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn compare_of_two_crafted_results_flags_the_latency_change_beyond_noise() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bench");
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    let o = bench_cmd(
        dir.as_path(),
        &[
            "bench",
            "--compare",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // a: latencies 99/100/101 ms, b: 119/120/121 ms (CI half width 2.48 ms).
    assert!(
        out.contains(
            "| batch 1 latency mean, ms | 100.00 | 120.00 | +20.00 | +20.0% | yes (CIs disjoint) |"
        ),
        "{out}"
    );
    assert!(
        out.contains("| load time, ms | 10.00 | 10.00 | +0.00 | +0.0% | n/a (no CI) |"),
        "{out}"
    );
    let same = bench_cmd(
        dir.as_path(),
        &[
            "bench",
            "--compare",
            a.to_str().unwrap(),
            a.to_str().unwrap(),
        ],
    );
    assert!(
        stdout(&same).contains("no (CIs overlap)"),
        "{}",
        stdout(&same)
    );
    let bad = bench_cmd(
        dir.as_path(),
        &[
            "bench",
            "--compare",
            a.to_str().unwrap(),
            "/nonexistent.json",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("/nonexistent.json"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn run_to_baseline_writes_baseline_json_that_the_report_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let sets = [
        "--set",
        "baseline.runs=2",
        "--set",
        "baseline.warmup_runs=0",
        "--set",
        "baseline.max_new_tokens=2",
        "--set",
        "baseline.batch_sizes=[1]",
    ];
    let o = medpipe()
        .args(["run", "--quiet"])
        .args(sets)
        .args(["--to", "baseline", "--workspace"])
        .arg(ws)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    // The report alone, on what ran so far (its upstream stages are all optional), with the
    // same config: `--only` refuses an upstream that this config would re-run.
    let r = medpipe()
        .args(["run", "--quiet", "--only", "report"])
        .args(sets)
        .arg("--workspace")
        .arg(ws)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}\n{}", stdout(&r), stderr(&r));
    let art: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.join("reports/baseline.json")).unwrap())
            .unwrap();
    assert_eq!(art["status"], "completed", "{art}");
    let m = &art["metrics"];
    assert_eq!(m["dtype"], "f32");
    assert_eq!(m["documents"], 5);
    assert_eq!(m["latency_ms"]["n"], 10);
    assert!(m["load_time_s"].as_f64().unwrap() > 0.0);
    assert!(m["tokens_per_s"].as_f64().is_some(), "{m}");
    assert_eq!(m["bench"]["schema_version"], 2);
    assert_eq!(m["bench"]["model"]["id"], "builtin:tiny");
    assert!(ws.join("reports/baseline.md").is_file());
    assert!(ws.join("reports/baseline_batch_sweep.svg").is_file());
    // The report stage picked the baseline figures up.
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(ws.join("reports/FINAL_REPORT.json")).unwrap(),
    )
    .unwrap();
    let base = &report["variants"][0];
    assert_eq!(base["name"], "base", "{report}");
    assert_eq!(base["performance"]["latency_ms"]["n"], 10, "{report}");
}

#[test]
fn generate_answers_about_an_image_and_prints_its_timing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("page.png");
    image::RgbImage::from_pixel(120, 90, image::Rgb([240, 240, 240]))
        .save(&img)
        .unwrap();
    let o = bench_cmd(
        &tmp.path().join("cache"),
        &[
            "generate",
            "--model",
            "builtin:tiny",
            "--image",
            img.to_str().unwrap(),
            "--prompt",
            "List the lab values",
            "--max-new-tokens",
            "4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("time to first token") && err.contains("tokens/s"),
        "{err}"
    );
    let missing = bench_cmd(
        &tmp.path().join("cache"),
        &[
            "generate",
            "--model",
            "builtin:tiny",
            "--image",
            "/nonexistent.png",
            "--prompt",
            "x",
        ],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("/nonexistent.png"),
        "{}",
        stderr(&missing)
    );
}

/// `generate --do-sample` draws on the device: the same seed gives the same answer, and a
/// setting out of range is a usage error before any work.
#[test]
fn generate_samples_reproducibly_with_a_seed_and_refuses_a_bad_top_p() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = |top_p: &str, seed: &str| {
        let args = [
            "generate",
            "--model",
            "builtin:tiny",
            "--prompt",
            "List the lab values",
            "--max-new-tokens",
            "12",
            "--do-sample",
            "--temperature",
            "1.5",
            "--top-k",
            "40",
            "--top-p",
            top_p,
            "--seed",
            seed,
        ];
        bench_cmd(&tmp.path().join("cache"), &args)
    };
    let a = sample("0.95", "7");
    let b = sample("0.95", "7");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!stdout(&a).trim().is_empty());
    assert_eq!(stdout(&a), stdout(&b), "same seed, same answer");
    let bad = sample("1.5", "7");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("top_p 1.5"), "{}", stderr(&bad));
}
