//! The benchmark harness: memory sampling (more arrives with the model).

pub mod memory;
