//! Throughput of `medpipe serve` with concurrent clients against one client at a time (issue
//! 21): the release binary serves builtin:tiny on the CPU, and clients send the five rendered
//! evaluation documents round-robin to `/v1/extract` (JSON, base64), each asking for
//! `SERVE_BENCH_TOKENS` new tokens (default 32, as `medpipe bench`). Goal: ≥ 2.5x the
//! requests per second at 16 clients.
//!
//! `cargo bench --bench serve`. Knobs: `SERVE_BENCH_REQUESTS` (per phase, default 160),
//! `SERVE_BENCH_CLIENTS` (default 16), `SERVE_BENCH_TOKENS`, `SERVE_BENCH_REPS` (default 2:
//! phases alternate sequential, concurrent, sequential, … so drift hits both).
//!
//! Prints per phase: wall time, requests/s, latency p50/p95/p99 (ms), and the batch sizes the
//! server formed (from its `/metrics` histogram, differenced per phase).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use medpipe::metrics::stats::percentile_sorted;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `medpipe_batch_size_bucket` counts by upper bound, and the batch count, from `/metrics`.
fn batch_histogram(base: &str) -> (Vec<(String, u64)>, u64) {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("/metrics")
        .into_string()
        .unwrap();
    let mut buckets = Vec::new();
    let mut count = 0;
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("medpipe_batch_size_bucket{le=\"") {
            let (le, n) = rest.split_once("\"} ").unwrap();
            buckets.push((le.to_string(), n.parse().unwrap()));
        } else if let Some(n) = l.strip_prefix("medpipe_batch_size_count ") {
            count = n.parse().unwrap();
        }
    }
    (buckets, count)
}

/// Batches per size range between two histogram readings: `1: 3, 3–4: 10, …`.
fn batch_mix(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let mut lo = 1u64;
    let mut prev_n = 0u64;
    let mut parts = Vec::new();
    for ((le, a), (_, b)) in after.iter().zip(before) {
        let cum = a - b;
        let hi: Option<u64> = le.parse().ok();
        if cum > prev_n {
            let range = match hi {
                Some(h) if h == lo => format!("{h}"),
                Some(h) => format!("{lo}–{h}"),
                None => format!("≥{lo}"),
            };
            parts.push(format!("{range}: {}", cum - prev_n));
        }
        prev_n = cum;
        lo = hi.map_or(lo, |h| h + 1);
    }
    parts.join(", ")
}

struct Phase {
    clients: usize,
    wall_s: f64,
    latencies_ms: Vec<f64>,
    batches: u64,
    mix: String,
}

fn run_phase(base: &str, bodies: &[String], requests: usize, clients: usize) -> Phase {
    let (hist_before, count_before) = batch_histogram(base);
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let latencies_ms: Vec<f64> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                sc.spawn(|| {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(600))
                        .build();
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= requests {
                            break;
                        }
                        let t = Instant::now();
                        let r = agent
                            .post(&format!("{base}/v1/extract"))
                            .set("Content-Type", "application/json")
                            .send_string(&bodies[i % bodies.len()]);
                        match r {
                            Ok(r) if r.status() == 200 => {}
                            Ok(r) => panic!("status {}", r.status()),
                            Err(e) => panic!("request failed: {e}"),
                        }
                        out.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wall_s = t.elapsed().as_secs_f64();
    let (hist_after, count_after) = batch_histogram(base);
    Phase {
        clients,
        wall_s,
        latencies_ms,
        batches: count_after - count_before,
        mix: batch_mix(&hist_before, &hist_after),
    }
}

fn main() {
    let requests = env_usize("SERVE_BENCH_REQUESTS", 160);
    let clients = env_usize("SERVE_BENCH_CLIENTS", 16);
    let tokens = env_usize("SERVE_BENCH_TOKENS", 32);
    let reps = env_usize("SERVE_BENCH_REPS", 2);
    let bodies: Vec<String> = medpipe::bench::inputs::evaluation_documents()
        .expect("rendering the evaluation documents")
        .iter()
        .map(|d| {
            let mut png = Vec::new();
            d.image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
            serde_json::json!({"images": [b64], "max_new_tokens": tokens}).to_string()
        })
        .collect();

    let mut child = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args([
            "serve",
            "--model",
            "builtin:tiny",
            "--device",
            "cpu",
            "--port",
            "0",
        ])
        .args(["--max-new-tokens", &tokens.to_string()])
        .args(["--max-batch", &clients.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting medpipe serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .expect("the server listens");
    let base = first
        .split_once("listening on ")
        .map(|(_, a)| a.trim().to_string())
        .expect("the address line");
    std::thread::spawn(move || for _ in lines {});

    // Warm-up: both shapes once.
    run_phase(&base, &bodies, clients, clients);
    let mut phases = Vec::new();
    for _ in 0..reps {
        phases.push(run_phase(&base, &bodies, requests / 4, 1));
        phases.push(run_phase(&base, &bodies, requests, clients));
    }
    let _ = child.kill();
    let _ = child.wait();

    println!(
        "serve throughput, builtin:tiny, CPU, {tokens} new tokens per request, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| clients | requests | wall s | req/s | p50 ms | p95 ms | p99 ms | batches | mean batch | batch sizes (count) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rate = [Vec::new(), Vec::new()];
    for p in &phases {
        let mut ms = p.latencies_ms.clone();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let rps = n as f64 / p.wall_s;
        rate[usize::from(p.clients > 1)].push(rps);
        println!(
            "| {} | {n} | {:.1} | {rps:.2} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {} |",
            p.clients,
            p.wall_s,
            percentile_sorted(&ms, 0.5),
            percentile_sorted(&ms, 0.95),
            percentile_sorted(&ms, 0.99),
            p.batches,
            n as f64 / p.batches.max(1) as f64,
            p.mix
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ratio = mean(&rate[1]) / mean(&rate[0]);
    println!(
        "\n{clients} clients: {:.2} req/s vs 1 client: {:.2} req/s = {ratio:.2}x (goal ≥ 2.5x: {})",
        mean(&rate[1]),
        mean(&rate[0]),
        if ratio >= 2.5 { "met" } else { "NOT met" }
    );
}
