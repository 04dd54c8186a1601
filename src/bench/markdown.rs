//! Markdown renderings of a [`BenchResult`]: the full results table (`--output X.json`
//! writes it beside the JSON as `X.md`) and one row for a community results table.

use std::fmt::Write as _;

use crate::bench::schema::{BenchResult, DecodeBreakdown};
use crate::metrics::stats::Summary;

/// `12.3` for a number, `n/a` for none.
fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.digits$}"))
}

/// Bytes as MiB with one decimal, `n/a` for none.
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".into(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

/// `mean ± std` (std omitted with one sample).
fn mean_std(s: &Summary) -> String {
    match s.std_ms {
        Some(sd) => format!("{:.2} ± {:.2}", s.mean_ms, sd),
        None => format!("{:.2}", s.mean_ms),
    }
}

/// `[low, high]` of the 95% CI, `n/a` with one sample.
fn ci(s: &Summary) -> String {
    match (s.ci95_low_ms, s.ci95_high_ms) {
        (Some(l), Some(h)) => format!("[{l:.2}, {h:.2}]"),
        _ => "n/a".into(),
    }
}

/// The full results: context lines, then one row per batch size, the grid and the soak.
pub fn results_table(r: &BenchResult) -> String {
    let mut s = String::new();
    let p = &r.platform;
    let _ = writeln!(s, "### medpipe bench: {} on {}\n", r.model.id, r.device);
    let _ = writeln!(
        s,
        "- model: `{}` ({}, dtype {}, quantization {}, adapter {}), {} parameters, weights {}",
        r.model.id,
        r.model.revision.as_deref().unwrap_or("no revision"),
        r.model.dtype,
        r.model.quantization.as_deref().unwrap_or("none"),
        r.model.adapter.as_deref().unwrap_or("none"),
        r.model.parameters,
        mib(Some(r.model.weights_bytes)),
    );
    let gpus = if p.gpus.is_empty() {
        "no GPU".to_string()
    } else {
        p.gpus
            .iter()
            .map(|g| g.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        s,
        "- platform: {} {} ({}), {} ({} threads), {} RAM, {}; medpipe {} ({}), burn {} {}",
        p.os.as_deref().unwrap_or("?"),
        p.os_version.as_deref().unwrap_or(""),
        p.arch,
        p.cpu_model.as_deref().unwrap_or("unknown CPU"),
        p.cpu_threads,
        mib(Some(p.memory_total_bytes)),
        gpus,
        r.versions.medpipe,
        r.git_commit
            .as_deref()
            .map_or("no commit", |c| &c[..c.len().min(10)]),
        r.versions.burn,
        r.versions.backend,
    );
    let g = &r.generation;
    let _ = writeln!(
        s,
        "- generation: {}, max_new_tokens {}, seed {}, KV cache {}; {} warm-up + {} measured passes over {} documents ({}); {}",
        if g.do_sample {
            format!(
                "sampling (temperature {}, top_k {}, top_p {})",
                num(g.temperature.map(f64::from), 2),
                g.top_k.map_or("off".to_string(), |k| k.to_string()),
                num(g.top_p.map(f64::from), 2)
            )
        } else {
            "greedy".into()
        },
        g.max_new_tokens,
        g.seed,
        if g.kv_cache { "on" } else { "off" },
        r.settings.warmup_runs,
        r.settings.runs,
        r.settings.inputs.len(),
        r.settings.inputs.join(", "),
        r.timestamp,
    );
    let _ = writeln!(
        s,
        "- load: {:.1} ms; RSS after load {}; peak RSS during runs {}; process peak {}; device peak {}\n",
        r.load.load_time_ms,
        mib(r.load.rss_after_load_bytes),
        mib(r.memory.peak_rss_during_runs_bytes),
        mib(r.memory.peak_rss_bytes),
        mib(r.memory.device_peak_bytes),
    );
    let cur = &r.settings.currency;
    let _ = writeln!(
        s,
        "| batch | calls | latency ms (mean ± std) | 95% CI ms | p50 ms | p95 ms | p99 ms | TTFT ms | prefill ms | decode ms | new tokens | tokens/s per request | throughput tokens/s | requests/s | cost / 1k requests ({cur}) |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for b in &r.batches {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
            b.batch_size,
            b.calls,
            mean_std(&b.latency_ms),
            ci(&b.latency_ms),
            b.latency_ms.p50_ms,
            b.latency_ms.p95_ms,
            b.latency_ms.p99_ms,
            b.ttft_ms.mean_ms,
            b.prefill_ms.mean_ms,
            b.decode_ms.mean_ms,
            b.new_tokens_mean,
            b.tokens_per_s.mean,
            b.throughput_tokens_per_s,
            b.throughput_requests_per_s,
            num(b.cost_per_1k_requests, 4),
        );
    }
    breakdown_table(&mut s, r);
    if !r.grid.is_empty() {
        let _ = writeln!(
            s,
            "\n| batch | max_new_tokens | latency ms (mean ± std) | p95 ms | throughput tokens/s |\n|---:|---:|---:|---:|---:|"
        );
        for c in &r.grid {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.1} |",
                c.batch_size,
                c.max_new_tokens,
                mean_std(&c.latency_ms),
                c.latency_ms.p95_ms,
                c.throughput_tokens_per_s
            );
        }
    }
    if let Some(k) = &r.soak {
        let tps: Vec<String> = k
            .windows
            .iter()
            .map(|w| format!("{:.1}", w.tokens_per_s))
            .collect();
        let _ = writeln!(
            s,
            "\nSoak: {:.1} s, {} requests; tokens/s per window: {}; RSS growth {} bytes/s.",
            k.duration_s,
            k.requests,
            tps.join(", "),
            num(k.memory_growth_bytes_per_s, 1)
        );
    }
    s
}

/// The decode step by kernel class, one row per batch size that has a breakdown.
fn breakdown_table(s: &mut String, r: &BenchResult) {
    let rows: Vec<(usize, &DecodeBreakdown)> = r
        .batches
        .iter()
        .filter_map(|b| b.decode_breakdown.as_ref().map(|d| (b.batch_size, d)))
        .collect();
    let Some((_, first)) = rows.first() else {
        return;
    };
    let classes: Vec<&str> = first.classes.iter().map(|c| c.class.as_str()).collect();
    let _ = writeln!(
        s,
        "\nDecode step by kernel class, ms per step (share of a recorded step). Recording waits for \
         the device around every kernel call, so a recorded step is slower than a measured one: \
         read the shares.\n"
    );
    let _ = writeln!(
        s,
        "| batch | step ms | recorded step ms | {} | other | read per step | effective bandwidth |",
        classes.join(" | ")
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|{}---:|---:|---:|",
        "---:|".repeat(classes.len())
    );
    for (b, d) in &rows {
        let cells: Vec<String> = d
            .classes
            .iter()
            .map(|c| format!("{:.3} ({:.0}%)", c.ms_per_step, c.share * 100.0))
            .collect();
        let _ = writeln!(
            s,
            "| {b} | {:.3} | {:.3} | {} | {:.3} ({:.0}%) | {} | {:.2} GB/s |",
            d.step_ms,
            d.recorded_step_ms,
            cells.join(" | "),
            d.other_ms,
            d.other_share * 100.0,
            mib(Some(d.bytes_per_step)),
            d.effective_bandwidth_gb_s,
        );
    }
    let _ = writeln!(s, "\nEffective bandwidth: {}.", first.bandwidth_note);
}

/// Header of the community results table (matches [`community_row`]).
pub const COMMUNITY_HEADER: &str = "| model | dtype | quant | device | hardware | batch | p50 latency ms | tokens/s per request | throughput tokens/s | peak RSS | load ms | medpipe |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|";

/// One community-table row per batch size.
pub fn community_rows(r: &BenchResult) -> String {
    let hw = r
        .platform
        .gpus
        .first()
        .map(|g| g.name.clone())
        .or_else(|| r.platform.cpu_model.clone())
        .unwrap_or_else(|| "unknown".into());
    r.batches
        .iter()
        .map(|b| {
            format!(
                "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {} |",
                r.model.id,
                r.model.dtype,
                r.model.quantization.as_deref().unwrap_or("none"),
                r.device,
                hw,
                b.batch_size,
                b.latency_ms.p50_ms,
                b.tokens_per_s.mean,
                b.throughput_tokens_per_s,
                mib(r.memory.peak_rss_bytes),
                r.load.load_time_ms,
                r.versions.medpipe,
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::schema::tests::crafted;

    #[test]
    fn results_table_has_a_row_per_batch_size_with_the_figures() {
        let r = crafted(100.0);
        let md = results_table(&r);
        assert!(md.contains("| 1 | 3 | 100.00 ± 1.00 |"), "{md}");
        assert!(md.contains("| 2 | 3 |"), "{md}");
        assert!(md.contains("builtin:tiny"));
        assert!(md.contains("TTFT ms"));
    }

    #[test]
    fn community_rows_match_the_header_column_count() {
        let r = crafted(100.0);
        let cols = |l: &str| l.matches('|').count();
        let header_cols = cols(COMMUNITY_HEADER.lines().next().unwrap());
        for row in community_rows(&r).lines() {
            assert_eq!(cols(row), header_cols, "{row}");
        }
    }
}
