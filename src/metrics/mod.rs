//! Evaluation figures: parsing model answers, normalizing and scoring extracted items
//! against the ground truth, and latency statistics for the benchmarks.

pub mod answer;
pub mod extraction;
pub mod normalize;
pub mod stats;
