//! Benchmark of the prepare stage (issue 5, "Speed and scale"): page rendering throughput and
//! the whole stage on 5,000 synthetic documents. Targets: ≥ 400 pages/s rendered on 2 cores,
//! 5,000 documents prepared end-to-end in ≤ 30 s.
//!
//! `cargo bench --bench prepare` (release profile). Environment knobs:
//! `PREPARE_BENCH_PAGES` (pages per render repetition, default 400), `PREPARE_BENCH_REPS`
//! (render repetitions, default 5), `PREPARE_BENCH_DOCS` (end-to-end documents, default 5000),
//! `PREPARE_BENCH_E2E_REPS` (end-to-end repetitions, default 2; 0 skips it),
//! `RAYON_NUM_THREADS` (worker threads; default: all cores).
//!
//! A plain timing loop (no criterion): every repetition is timed with `Instant`, and the
//! repetitions are summarized with `medpipe::metrics::stats` (mean, std, min). Pages per
//! second are derived from each repetition's wall time, so "min" time is "best" rate.

use std::path::Path;
use std::time::Instant;

use medpipe::data::render::{self, encode_png, DegradeConfig, RenderConfig};
use medpipe::data::{synthetic, Document};
use medpipe::metrics::stats::summarize_ms;
use medpipe::pipeline::{Pipeline, RunOptions, Workspace};
use medpipe::stages::{prepare::Prepare, probe::Probe};
use medpipe::Config;
use rayon::prelude::*;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints one line: mean ± std and min of the repetition times, and the page rate they give.
fn report(label: &str, pages: usize, times_ms: &[f64]) {
    let s = summarize_ms(times_ms).expect("at least one finite repetition");
    let rate = |ms: f64| pages as f64 / (ms / 1e3);
    println!(
        "{label:<44} {:>9.1} ms ± {:>7.1} (min {:>9.1}, n={})  {:>7.0} pages/s (best {:>7.0})",
        s.mean_ms,
        s.std_ms.unwrap_or(0.0),
        s.min_ms,
        s.n,
        rate(s.mean_ms),
        rate(s.min_ms),
    );
}

/// Renders every document in parallel, optionally PNG-encoding each page; returns the bytes
/// (or pixels) produced so the work cannot be optimized away.
fn render_all(docs: &[Document], cfg: &RenderConfig, encode: bool) -> usize {
    docs.par_iter()
        .enumerate()
        .map(|(i, d)| {
            let r = render::render(d, cfg, i as u64).expect("synthetic pages fit max_pixels");
            if encode {
                encode_png(&r.image).expect("PNG encoding succeeds").len()
            } else {
                r.image.len()
            }
        })
        .sum()
}

fn bench_render(pages: usize, reps: usize) {
    let docs: Vec<Document> = synthetic::documents(5, pages).collect();
    let configs = [
        (
            "no degradation",
            RenderConfig {
                degrade: DegradeConfig::none(),
                ..RenderConfig::default()
            },
        ),
        ("default degradations", RenderConfig::default()),
    ];
    for (name, cfg) in &configs {
        for encode in [false, true] {
            render_all(&docs[..docs.len().min(16)], cfg, encode); // warm the glyph caches
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(render_all(&docs, cfg, encode));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            let what = if encode { "render+png" } else { "render" };
            report(&format!("{what}, {name}"), docs.len(), &times);
        }
    }
}

/// One `medpipe run --to prepare` (probe, then prepare) of `docs` synthetic documents in a
/// fresh workspace; returns (prepare stage seconds, whole run seconds).
fn run_end_to_end(dir: &Path, docs: usize) -> (f64, f64) {
    let toml = format!(
        "[probe]\ndevice = \"cpu\"\n[prepare]\n[[prepare.sources]]\nkind = \"synthetic\"\ncount = {docs}\n"
    );
    let cfg = Config::from_toml(&toml, Path::new("bench.toml"), &[]).expect("the config parses");
    let ws = Workspace::open(dir).expect("the temp workspace opens");
    let p = Pipeline::new(vec![Box::new(Probe), Box::new(Prepare::default())]);
    let opts = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    let t = Instant::now();
    let rep = p
        .run(&ws, &cfg, &opts, &mut |_| {})
        .expect("the pipeline runs");
    let total = t.elapsed().as_secs_f64();
    assert!(!rep.failed(), "prepare failed: {rep:?}");
    let prepare = rep
        .stages
        .iter()
        .find(|s| s.stage == "prepare")
        .expect("prepare ran")
        .duration_s;
    (prepare, total)
}

fn bench_end_to_end(docs: usize, reps: usize) {
    let mut stage_ms = Vec::new();
    let mut total_ms = Vec::new();
    for _ in 0..reps {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (stage, total) = run_end_to_end(dir.path(), docs);
        stage_ms.push(stage * 1e3);
        total_ms.push(total * 1e3);
    }
    report(
        &format!("prepare stage, {docs} docs (default config)"),
        docs,
        &stage_ms,
    );
    report(
        &format!("run --to prepare, {docs} docs (with probe)"),
        docs,
        &total_ms,
    );
}

fn main() {
    let pages = env_usize("PREPARE_BENCH_PAGES", 400);
    let reps = env_usize("PREPARE_BENCH_REPS", 5).max(1);
    let docs = env_usize("PREPARE_BENCH_DOCS", 5000);
    let e2e_reps = env_usize("PREPARE_BENCH_E2E_REPS", 2);
    println!(
        "prepare benchmark: {} rayon threads, {} cores available",
        rayon::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    bench_render(pages, reps);
    if e2e_reps > 0 && docs > 0 {
        bench_end_to_end(docs, e2e_reps);
    }
}
