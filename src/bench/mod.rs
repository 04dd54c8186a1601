//! The benchmark harness: one measuring loop serves the `baseline` stage (and later quantize
//! and evaluate) and the standalone `medpipe bench`.
//!
//! - `inputs`: the five evaluation documents as images with their instruction
//! - `source`: `builtin:tiny` or a model directory
//! - `run`: load time, warm-up + measured batched generation, grid, soak
//! - `memory`: RSS sampling and growth slope
//! - `schema`: the result JSON; `compare`: two results side by side with noise checks;
//!   `markdown`: tables; `charts`: latency distribution and batch sweep (SVG + PNG)

pub mod charts;
pub mod compare;
pub mod footprint;
pub mod inputs;
pub mod markdown;
pub mod memory;
pub mod oneshot;
pub mod output;
pub mod performance;
pub mod run;
pub mod schema;
pub mod source;
pub mod train;

pub use run::{parse_list, run_bench, run_bench_as, BenchError, BenchOptions};
pub use schema::BenchResult;
