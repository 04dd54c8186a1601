//! medpipe: a resumable pipeline that fine-tunes Qwen2.5-VL (QLoRA) to read clinical
//! documents, and proves with numbers whether the fine-tune helped.
//!
//! `pipeline` runs stages and keeps their artifacts; `stages` holds one file per stage;
//! `config` is the TOML the user writes.

pub mod bench;
pub mod builtin;
pub mod config;
pub mod data;
pub mod device;
pub mod hub;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod quant;
pub mod report;
pub mod stages;
pub mod train;

pub use config::Config;

#[cfg(test)]
pub(crate) mod test_util;
