//! medpipe: a resumable pipeline that fine-tunes Qwen2.5-VL (QLoRA) to read clinical
//! documents, and proves with numbers whether the fine-tune helped.
//!
//! `pipeline` runs stages and keeps their artifacts; `stages` holds one file per stage;
//! `config` is the TOML the user writes. `fs`, `build_info` and `json` are leaves that
//! import nothing from the crate; everything may use them.

pub mod bench;
pub mod build_info;
pub mod builtin;
pub mod charts;
pub mod config;
pub mod data;
pub mod device;
pub mod fs;
pub mod hub;
pub mod json;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod quant;
pub mod serve;
pub mod stages;
pub mod train;

pub use config::Config;

#[cfg(test)]
pub(crate) mod test_util;
