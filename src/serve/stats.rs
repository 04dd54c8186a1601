//! The server's counters, rendered as Prometheus text at `/metrics`: requests by endpoint
//! and status, a latency histogram of the model endpoints, generated tokens and the time spent
//! generating them, the batch sizes formed, and the queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// Upper bounds of the latency histogram, seconds.
const LATENCY_BUCKETS_S: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds of the batch-size histogram.
const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

#[derive(Default)]
struct Inner {
    /// (endpoint, status) → requests.
    requests: BTreeMap<(String, u16), u64>,
    /// endpoint → (bucket counts, sum of seconds, count), model endpoints only.
    latency: BTreeMap<String, (Vec<u64>, f64, u64)>,
    batch_counts: Vec<u64>,
    batches: u64,
    batch_rows: u64,
    generated_tokens: u64,
    generation_s: f64,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Stats(Arc<Mutex<Inner>>);

impl Stats {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic elsewhere while holding the lock leaves counters that are still counters.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// One answered request; `latency_s` feeds the histogram when `timed`.
    pub(crate) fn request(&self, endpoint: &str, status: u16, latency_s: f64, timed: bool) {
        self.with(|s| {
            *s.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
            if timed {
                let e = s
                    .latency
                    .entry(endpoint.to_string())
                    .or_insert_with(|| (vec![0; LATENCY_BUCKETS_S.len()], 0.0, 0));
                for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
                    if latency_s <= *le {
                        e.0[i] += 1;
                    }
                }
                e.1 += latency_s;
                e.2 += 1;
            }
        });
    }

    /// The worker formed a batch of `rows` requests.
    pub(crate) fn batch_formed(&self, rows: usize) {
        self.with(|s| {
            if s.batch_counts.is_empty() {
                s.batch_counts = vec![0; BATCH_BUCKETS.len()];
            }
            for (i, le) in BATCH_BUCKETS.iter().enumerate() {
                if rows <= *le {
                    s.batch_counts[i] += 1;
                }
            }
            s.batches += 1;
            s.batch_rows += rows as u64;
        });
    }

    /// A batch generated `tokens` new tokens in `seconds`.
    pub(crate) fn generated(&self, tokens: usize, seconds: f64) {
        self.with(|s| {
            s.generated_tokens += tokens as u64;
            s.generation_s += seconds;
        });
    }

    /// Batches formed and the mean rows per batch (for `/health`).
    pub(crate) fn batches(&self) -> (u64, f64) {
        self.with(|s| {
            let mean = if s.batches > 0 {
                s.batch_rows as f64 / s.batches as f64
            } else {
                0.0
            };
            (s.batches, mean)
        })
    }

    /// Prometheus text exposition format 0.0.4.
    pub(crate) fn render(&self, queue_depth: usize, uptime_s: f64) -> String {
        self.with(|s| {
            let mut o = String::new();
            let _ = writeln!(
                o,
                "# HELP medpipe_requests_total HTTP requests answered, by endpoint and status."
            );
            let _ = writeln!(o, "# TYPE medpipe_requests_total counter");
            for ((ep, status), n) in &s.requests {
                let _ = writeln!(
                    o,
                    "medpipe_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}"
                );
            }
            let _ = writeln!(o, "# HELP medpipe_request_duration_seconds Latency of the model endpoints, request received to answer sent.");
            let _ = writeln!(o, "# TYPE medpipe_request_duration_seconds histogram");
            for (ep, (counts, sum, count)) in &s.latency {
                for (le, c) in LATENCY_BUCKETS_S.iter().zip(counts) {
                    let _ = writeln!(
                        o,
                        "medpipe_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"{le}\"}} {c}"
                    );
                }
                let _ = writeln!(
                    o,
                    "medpipe_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"+Inf\"}} {count}"
                );
                let _ = writeln!(
                    o,
                    "medpipe_request_duration_seconds_sum{{endpoint=\"{ep}\"}} {sum}"
                );
                let _ = writeln!(
                    o,
                    "medpipe_request_duration_seconds_count{{endpoint=\"{ep}\"}} {count}"
                );
            }
            let _ = writeln!(
                o,
                "# HELP medpipe_batch_size Requests per batched generation."
            );
            let _ = writeln!(o, "# TYPE medpipe_batch_size histogram");
            for (i, le) in BATCH_BUCKETS.iter().enumerate() {
                let c = s.batch_counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(o, "medpipe_batch_size_bucket{{le=\"{le}\"}} {c}");
            }
            let _ = writeln!(o, "medpipe_batch_size_bucket{{le=\"+Inf\"}} {}", s.batches);
            let _ = writeln!(o, "medpipe_batch_size_sum {}", s.batch_rows);
            let _ = writeln!(o, "medpipe_batch_size_count {}", s.batches);
            let tps = if s.generation_s > 0.0 {
                s.generated_tokens as f64 / s.generation_s
            } else {
                0.0
            };
            let simple = [
                ("medpipe_generated_tokens_total", "counter", "New tokens generated.", s.generated_tokens as f64),
                ("medpipe_generation_seconds_total", "counter", "Seconds the model spent generating (prefill and decode).", s.generation_s),
                ("medpipe_tokens_per_second", "gauge", "New tokens per second of generation time, since start.", tps),
                ("medpipe_queue_depth", "gauge", "Requests waiting for a batch.", queue_depth as f64),
                ("medpipe_uptime_seconds", "gauge", "Seconds since the server started.", uptime_s),
            ];
            for (name, kind, help, v) in simple {
                let _ = writeln!(o, "# HELP {name} {help}");
                let _ = writeln!(o, "# TYPE {name} {kind}");
                let _ = writeln!(o, "{name} {v}");
            }
            o
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_requests_latency_buckets_and_batches_cumulatively() {
        let s = Stats::default();
        s.request("/v1/extract", 200, 0.07, true);
        s.request("/v1/extract", 200, 3.0, true);
        s.request("/v1/extract", 400, 0.001, false);
        s.batch_formed(1);
        s.batch_formed(5);
        s.generated(40, 2.0);
        let text = s.render(3, 1.5);
        for line in [
            "medpipe_requests_total{endpoint=\"/v1/extract\",status=\"200\"} 2",
            "medpipe_requests_total{endpoint=\"/v1/extract\",status=\"400\"} 1",
            "medpipe_request_duration_seconds_bucket{endpoint=\"/v1/extract\",le=\"0.05\"} 0",
            "medpipe_request_duration_seconds_bucket{endpoint=\"/v1/extract\",le=\"0.1\"} 1",
            "medpipe_request_duration_seconds_bucket{endpoint=\"/v1/extract\",le=\"5\"} 2",
            "medpipe_request_duration_seconds_count{endpoint=\"/v1/extract\"} 2",
            "medpipe_batch_size_bucket{le=\"4\"} 1",
            "medpipe_batch_size_bucket{le=\"8\"} 2",
            "medpipe_batch_size_sum 6",
            "medpipe_tokens_per_second 20",
            "medpipe_queue_depth 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert_eq!(s.batches(), (2, 3.0));
    }
}
