//! BENCHMARK_REPORT.md: the stakeholder's view of a run, rendered from the assembled
//! [`FinalReport`] and the inputs (tables need the per-type breakdowns and dataset details).

use std::fmt::Write as _;

use super::build::{bytes, pct, pct_ci, FinalReport, Inputs, VariantRow};

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a".into())
}

fn ms(v: f64) -> String {
    format!("{v:.1}")
}

/// Renders the Markdown report; `used_config` is the TOML shown under "Reproduce".
pub fn render(r: &FinalReport, inputs: &Inputs, used_config: &str) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# medpipe benchmark report\n");
    let _ = writeln!(
        w,
        "Generated at: {} · medpipe {}{}{}\n",
        r.generated_at,
        r.medpipe_version,
        opt(r.git_commit.as_deref(), |c| format!(" · commit `{c}`")).replace("n/a", ""),
        opt(r.device.as_deref(), |d| format!(" · device `{d}`")).replace("n/a", ""),
    );

    let _ = writeln!(w, "## Summary\n");
    match &r.recommendation.variant {
        Some(v) => {
            let _ = writeln!(w, "- **Recommendation: deploy `{v}`.**");
        }
        None => {
            let _ = writeln!(w, "- **No recommendation.**");
        }
    }
    if let Some(first) = r.recommendation.reasons.first() {
        let _ = writeln!(w, "- {first}");
    }
    if let Some(g) = &r.regression {
        let _ = writeln!(
            w,
            "- Fine-tune vs base: combined accuracy {:+.1} points ({}: [{:.1}, {:.1}]){}",
            100.0 * g.diff,
            g.method,
            100.0 * g.ci95_low,
            100.0 * g.ci95_high,
            if g.regression {
                " — **REGRESSION**"
            } else {
                ""
            }
        );
    }
    let done = r.stages.iter().filter(|s| s.status == "completed").count();
    let _ = writeln!(
        w,
        "- Stages completed: {done} of {}; warnings: {}\n",
        r.stages.len(),
        r.warnings.len()
    );

    let _ = writeln!(w, "## Stages\n");
    let _ = writeln!(w, "| stage | status | finished | time | key figures |");
    let _ = writeln!(w, "| --- | --- | --- | ---: | --- |");
    for st in &r.stages {
        let figures = if let Some(e) = st.error.as_ref().filter(|_| st.status != "completed") {
            format!("error: {}", cell(e))
        } else {
            st.summary
                .iter()
                .map(|(k, v)| format!("{k}: {}", cell(v)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            st.stage,
            st.status,
            st.finished_at.as_deref().unwrap_or("-"),
            opt(st.duration_s, |d| format!("{d:.1} s")),
            figures
        );
    }
    let _ = writeln!(w);

    if let Some(env) = &inputs.environment {
        let _ = writeln!(w, "## Environment\n");
        let _ = writeln!(
            w,
            "- CPU: {} ({} threads); RAM {}",
            env.cpu.model,
            env.cpu.logical_threads,
            bytes(env.memory.total_bytes)
        );
        let gpus = if env.gpu.gpus.is_empty() {
            "none".to_string()
        } else {
            env.gpu
                .gpus
                .iter()
                .map(|g| format!("{} ({})", g.name, bytes(g.memory_total_bytes)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            w,
            "- GPU: {gpus}; driver {}; CUDA {}",
            env.gpu.driver_version.as_deref().unwrap_or("n/a"),
            env.gpu.cuda_version.as_deref().unwrap_or("n/a")
        );
        let _ = writeln!(w, "- Device: `{}` ({})\n", env.device, env.device_reason);
    }

    variant_tables(w, &r.variants);
    breakdown_tables(w, &r.variants);
    dataset_section(w, inputs);
    training_section(w, inputs);

    let _ = writeln!(w, "## Charts\n");
    if r.charts.is_empty() {
        let _ = writeln!(w, "No chart: no stage produced the figures they plot.\n");
    }
    for c in r.charts.iter().filter(|c| c.ends_with(".png")) {
        let name = c
            .rsplit('/')
            .next()
            .unwrap_or(c)
            .trim_end_matches(".png")
            .replace('_', " ");
        let _ = writeln!(
            w,
            "![{name}]({c})  \n[SVG]({})\n",
            c.replace(".png", ".svg")
        );
    }

    let _ = writeln!(w, "## Recommendation\n");
    let _ = writeln!(
        w,
        "{}\n",
        r.recommendation
            .variant
            .as_deref()
            .map(|v| format!("Deploy **`{v}`**."))
            .unwrap_or_else(|| "No variant can be recommended yet.".into())
    );
    for reason in &r.recommendation.reasons {
        let _ = writeln!(w, "- {reason}");
    }
    let _ = writeln!(
        w,
        "\nRule: the most accurate variant by combined accuracy, or, among variants whose 95% interval reaches it, the one with the least peak memory, then the lowest p50 latency.\n"
    );

    let _ = writeln!(w, "## Warnings\n");
    if r.warnings.is_empty() {
        let _ = writeln!(w, "None.\n");
    } else {
        for x in &r.warnings {
            let _ = writeln!(w, "- {x}");
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Reproduce\n");
    let _ = writeln!(
        w,
        "The config below was rebuilt from the sections recorded in the artifacts and written to `{}`.\n",
        super::USED_CONFIG_FILE_REL
    );
    let _ = writeln!(w, "```sh");
    for c in &r.reproduce {
        let _ = writeln!(w, "{c}");
    }
    let _ = writeln!(w, "```\n");
    let _ = writeln!(w, "```toml\n{}```", used_config);
    s
}

/// Makes text safe inside a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn variant_tables(w: &mut String, variants: &[VariantRow]) {
    let _ = writeln!(w, "## Model variants\n");
    if variants.is_empty() {
        let _ = writeln!(
            w,
            "No variant has been measured (baseline, quantize and evaluate have not completed).\n"
        );
        return;
    }
    let _ = writeln!(w, "### Memory\n");
    let _ = writeln!(
        w,
        "Each variant's own memory: weights resident once loaded, the process RSS growth over its load and run, and its peak (the larger of the two on the CPU, the allocator's peak on a GPU).\n"
    );
    let _ = writeln!(
        w,
        "| variant | computes in | weights on disk | weights resident | RSS growth | peak memory | load time | from |"
    );
    let _ = writeln!(w, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for v in variants {
        let p = &v.performance;
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            p.compute_dtype.as_deref().unwrap_or("-"),
            opt(p.weights_bytes, bytes),
            opt(p.weights_resident_bytes, bytes),
            opt(p.rss_delta_bytes, bytes),
            opt(p.peak_memory_bytes, bytes),
            opt(p.load_time_s, |t| format!("{t:.1} s")),
            v.performance_from.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(w, "\n### Latency and throughput\n");
    let _ = writeln!(
        w,
        "Per document, end to end (prefill + decode), in ms; percentiles by linear interpolation; interval: 95% Student-t of the mean.\n"
    );
    let _ = writeln!(
        w,
        "| variant | n | mean | 95% CI of mean | p50 | p95 | p99 | first token p50 | tokens/s |"
    );
    let _ = writeln!(
        w,
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
    );
    for v in variants {
        let p = &v.performance;
        let l = p.latency_ms.as_ref();
        let ci = l.and_then(|l| Some((l.ci95_low_ms?, l.ci95_high_ms?)));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            opt(l.map(|l| l.n), |n| n.to_string()),
            opt(l.map(|l| l.mean_ms), ms),
            opt(ci, |(a, b)| format!("[{}, {}]", ms(a), ms(b))),
            opt(l.map(|l| l.p50_ms), ms),
            opt(l.map(|l| l.p95_ms), ms),
            opt(l.map(|l| l.p99_ms), ms),
            opt(p.first_token_ms.as_ref().map(|f| f.p50_ms), ms),
            opt(p.tokens_per_s, |t| format!("{t:.1}")),
        );
    }
    let _ = writeln!(w, "\n### Accuracy\n");
    let boot = variants
        .iter()
        .find_map(|v| v.breakdown.as_ref())
        .map(|b| {
            format!(
                ", {} resamples, seed {}",
                b.bootstrap_resamples, b.bootstrap_seed
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        w,
        "Pooled over ground-truth items; [95% bootstrap interval over documents{boot}].\n"
    );
    let _ = writeln!(
        w,
        "| variant | combined | term | value | unit | strict P | strict R | strict F1 | unparseable |"
    );
    let _ = writeln!(
        w,
        "| --- | --- | --- | --- | ---: | --- | --- | --- | ---: |"
    );
    for v in variants {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            opt(v.combined.as_ref(), pct_ci),
            opt(v.term_accuracy.as_ref(), pct_ci),
            opt(v.value_accuracy.as_ref(), pct_ci),
            opt(v.unit_accuracy, pct),
            opt(v.precision.as_ref(), pct_ci),
            opt(v.recall.as_ref(), pct_ci),
            opt(v.f1.as_ref(), pct_ci),
            match (v.unparseable_answers, v.documents) {
                (Some(u), Some(n)) => format!("{u} / {n}"),
                _ => "n/a".into(),
            }
        );
    }
    let _ = writeln!(w);
}

fn breakdown_tables(w: &mut String, variants: &[VariantRow]) {
    let scored: Vec<&VariantRow> = variants.iter().filter(|v| v.breakdown.is_some()).collect();
    if scored.is_empty() {
        return;
    }
    for (title, pick) in [("document type", 0usize), ("source", 1usize)] {
        let _ = writeln!(w, "### Combined accuracy per {title}\n");
        let mut keys: Vec<&String> = scored
            .iter()
            .filter_map(|v| v.breakdown.as_ref())
            .flat_map(|b| {
                if pick == 0 {
                    b.by_doc_type.keys()
                } else {
                    b.by_source.keys()
                }
            })
            .collect();
        keys.sort();
        keys.dedup();
        let _ = write!(w, "| {title} | documents |");
        for v in &scored {
            let _ = write!(w, " {} |", v.name);
        }
        let _ = write!(w, "\n| --- | ---: |");
        for _ in &scored {
            let _ = write!(w, " --- |");
        }
        let _ = writeln!(w);
        for k in keys {
            let groups: Vec<_> = scored
                .iter()
                .map(|v| {
                    v.breakdown.as_ref().and_then(|b| {
                        if pick == 0 {
                            b.by_doc_type.get(k)
                        } else {
                            b.by_source.get(k)
                        }
                    })
                })
                .collect();
            let docs = groups
                .iter()
                .flatten()
                .map(|g| g.documents)
                .max()
                .unwrap_or(0);
            let _ = write!(w, "| {} | {docs} |", cell(k));
            for g in groups {
                let _ = write!(w, " {} |", opt(g.map(|g| &g.combined), pct_ci));
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w);
    }
}

fn dataset_section(w: &mut String, inputs: &Inputs) {
    let Some(d) = &inputs.dataset else { return };
    let _ = writeln!(w, "## Dataset\n");
    let _ = writeln!(
        w,
        "Splits: train {}, val {}, test {} documents{}.\n",
        d.splits.train,
        d.splits.val,
        d.splits.test,
        opt(d.seed, |s| format!(" (seed {s})")).replace("n/a", "")
    );
    let _ = writeln!(w, "| source | offered | kept | dropped (reason: count) |");
    let _ = writeln!(w, "| --- | ---: | ---: | --- |");
    for s in &d.sources {
        let dropped = if s.dropped.is_empty() {
            "-".to_string()
        } else {
            s.dropped
                .iter()
                .map(|(r, n)| format!("{}: {n}", cell(r)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(w, "| {} | {} | {} | {dropped} |", s.name, s.offered, s.kept);
    }
    let _ = writeln!(w);
}

fn training_section(w: &mut String, inputs: &Inputs) {
    let Some(t) = &inputs.training else { return };
    let _ = writeln!(w, "## Training\n");
    let first = t.steps.first().map(|s| s.loss);
    let last = t.steps.last().map(|s| s.loss);
    let best_val = t
        .val
        .iter()
        .map(|v| v.loss)
        .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))));
    let _ = writeln!(
        w,
        "- steps: {}; train loss {} → {}; best validation loss {}",
        opt(t.total_steps.or(t.steps.last().map(|s| s.step)), |n| n
            .to_string()),
        opt(first, |x| format!("{x:.4}")),
        opt(last, |x| format!("{x:.4}")),
        opt(best_val, |x| format!("{x:.4}"))
    );
    let _ = writeln!(
        w,
        "- throughput {} tokens/s; peak memory {}; wall time {}; trainable parameters {}\n",
        opt(t.tokens_per_s, |x| format!("{x:.1}")),
        opt(t.peak_memory_bytes, bytes),
        opt(t.train_time_s, |x| format!("{x:.1} s")),
        opt(t.trainable_params, |x| x.to_string())
    );
}
